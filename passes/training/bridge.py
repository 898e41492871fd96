"""The graph-to-torch bridge: an ``onnx_ir`` model run as a ``torch.nn.Module`` whose weights train,
written back into the same graph.

:class:`GraphModule` interprets the graph node by node with the torch functions of :mod:`.ops`
(eagerly, so dynamic axes stay dynamic). Every float constant that feeds a weighted layer's weight
or bias slot (Conv, ConvTranspose, Gemm, MatMul, BatchNormalization's scale and bias,
InstanceNormalization, LayerNormalization, PRelu, the constant bias Add after a layer) is a
``torch.nn.Parameter``, whether it is stored as an initializer or in a Constant node (paddle2onnx).
A weight may reach its layer through the ops that store it compactly; the bridge follows them back:

* ``DequantizeLinear`` of integer codes (the quantize pass's int8 weights, int32 biases, weight-only
  int8/int4 and binary/ternary): the latent float weight trains under the projection (fake
  quantization with a straight-through estimator; sign·α or {-α, 0, α} recomputed per step for
  binary/ternary) and is re-quantized into the *same* integer initializer at the end;
* ``Gather(codebook, indices)`` (the codebook pass): the shared levels train, the indices stay,
  an exact-zero level stays zero;
* ``Cast`` (fp16 weights), ``Reshape``, ``Transpose``, ``Identity``.

Activation ``QuantizeLinear → DequantizeLinear`` pairs are fake quantization; with
``learn_scales`` their float scales (and the weights') are parameters too, with LSQ's gradient
(Esser et al. 2020). Weights that contain exact zeros (sparsify, framework masks) keep them.

:meth:`GraphModule.write_back` puts the trained values into the constants they came from: the
node list, names, dtypes and dynamic axes of the graph are unchanged.

torch is imported by this module: only the ``train`` extra installs it, and nothing in the core
imports this module (the distill pass imports it when it runs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from onnxcc.compiler.errors import BadInputError
from onnxcc.compiler.ir_utils import c_order
from onnxcc.passes.training import ops as O

#: the inputs of a weighted layer that are its weights (trainable when they are float constants)
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1), "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2), "PRelu": (1,), "LSTM": (1, 2, 3),
}
#: ops whose output is a layer's (bias) output, so a constant Add after them is a bias
_LAYERS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
#: ops a stored weight passes through on its way to the layer (input 0 is the weight)
_STORAGE = {"Identity", "Cast", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "DequantizeLinear"}
#: ops that are not interpreted: already-lowered integer kernels have no float weights to train
UNTRAINABLE = {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear",
               "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearConcat", "DynamicQuantizeLSTM"}


class UnsupportedGraph(BadInputError):
    """The bridge cannot run this graph in torch (an op without a mapping, a subgraph, strings)."""


def _np(value: ir.Value) -> np.ndarray:
    arr = value.const_value.numpy() if value.const_value is not None else _constant_node_array(value.producer())
    return _plain(arr)


def _plain(arr: np.ndarray) -> np.ndarray:
    if arr.dtype in (ml_dtypes.int4,):
        return arr.astype(np.int8)
    if arr.dtype in (ml_dtypes.uint4,):
        return arr.astype(np.uint8)
    if arr.dtype == ml_dtypes.bfloat16:
        return arr.astype(np.float32)
    return arr


def _constant_node_array(node: ir.Node) -> np.ndarray:
    a = node.attributes
    if "value" in a:
        return a["value"].as_tensor().numpy()
    for key in ("value_float", "value_int"):
        if key in a:
            return np.array(a[key].value, np.float32 if key == "value_float" else np.int64)
    for key in ("value_floats", "value_ints"):
        if key in a:
            return np.array(a[key].value, np.float32 if key == "value_floats" else np.int64)
    raise UnsupportedGraph(f"training: Constant node '{node.name}' holds a {', '.join(a)} attribute, which the bridge does not read")


def _is_const(value: ir.Value | None) -> bool:
    if value is None:
        return False
    if value.const_value is not None and not value.is_graph_input():
        return True
    p = value.producer()
    return p is not None and p.op_type == "Constant" and p.domain in ("", "ai.onnx")


def _to_torch(arr: np.ndarray) -> torch.Tensor:
    arr = _plain(np.asarray(arr))
    if arr.dtype == np.uint16 or arr.dtype == np.uint32 or arr.dtype == np.uint64:
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.array(arr, copy=True))


@dataclasses.dataclass
class FloatWeight:
    """A float constant that trains: an initializer or a Constant node's tensor."""

    value: ir.Value
    param: str
    dtype: Any
    mask: torch.Tensor | None  # exact zeros kept zero


@dataclasses.dataclass
class CodebookWeight:
    """A weight stored as ``Gather(levels, indices)``: latent floats assigned to the nearest level."""

    node: ir.Node  # the Gather
    book: ir.Value
    indices: ir.Value  # the stored (uint4/uint8) indices
    param: str  # latent float weight
    levels: str  # the shared levels
    mask: torch.Tensor | None  # 0 where the weight stays on the zero level
    zero_level: int  # index of the exact-zero level, -1 if none


@dataclasses.dataclass
class QuantWeight:
    """Integer codes behind a DequantizeLinear: a latent float weight trained under the projection."""

    node: ir.Node  # the DequantizeLinear
    codes: ir.Value
    param: str
    kind: str  # "int" | "bias" | "ternary" | "binary"
    qmin: int
    qmax: int
    axis: int
    block: int
    mask: torch.Tensor | None
    last_scale: torch.Tensor | None = None


class GraphModule(torch.nn.Module):
    """Run ``model`` in torch with its weights as parameters; :meth:`write_back` stores them.

    ``init_weights`` maps (layer node name, input slot) to a float array: the latent float weight of
    a binary/ternary layer starts there (the original model's weight) instead of at α·codes.
    """

    def __init__(self, model: ir.Model, *, learn_scales: bool = False, ternary_threshold: float = 0.7,
                 init_weights: Mapping[tuple[str, int], np.ndarray] | None = None, train_weights: bool = True):
        super().__init__()
        self.model = model
        graph = model.graph
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
        self.ternary_threshold = ternary_threshold
        self._check_supported(graph)
        self.nodes = [n for n in graph if not (n.op_type == "Constant" and n.domain in ("", "ai.onnx"))]
        for n in self.nodes:
            n.meta["opset"] = self.opset
        self.inputs = [v for v in graph.inputs if v.const_value is None or v.name not in graph.initializers]
        self.outputs = list(graph.outputs)
        self.consts: dict[ir.Value, torch.Tensor] = {}
        self.float_weights: dict[ir.Value, FloatWeight] = {}
        self.quant_weights: dict[ir.Node, QuantWeight] = {}
        self.codebooks: dict[ir.Node, CodebookWeight] = {}
        self.scale_params: dict[ir.Value, str] = {}
        self.skipped: list[tuple[str, str]] = []
        self._names: dict[str, int] = {}
        for v in list(graph.initializers.values()):
            if v.const_value is not None and not (v.is_graph_input() and v in self.inputs):
                self.consts[v] = self._const_tensor(v)
        for n in graph:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                self.consts[n.outputs[0]] = _to_torch(_constant_node_array(n))
        if train_weights:
            self._find_weights(graph, dict(init_weights or {}))
        if learn_scales:
            self._find_scales(graph)

    # ------------------------------------------------------------------ building
    def _check_supported(self, graph: ir.Graph) -> None:
        bad: dict[str, str] = {}
        for n in graph:
            if n.domain not in ("", "ai.onnx"):
                bad.setdefault(f"{n.domain}::{n.op_type}", n.name)
            elif n.op_type in UNTRAINABLE:
                bad.setdefault(n.op_type, n.name)
            elif n.op_type != "Constant" and n.op_type not in O.OPS:
                bad.setdefault(n.op_type, n.name)
            elif any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in n.attributes.values()):
                bad.setdefault(n.op_type, n.name)
        if bad:
            what = ", ".join(f"{op} (node '{name}')" for op, name in sorted(bad.items()))
            lowered = " (lowered integer kernels: train the QDQ model before lower-int8)" if set(bad) & UNTRAINABLE else ""
            raise UnsupportedGraph(f"training: the torch bridge has no mapping for {what}{lowered}")

    def _const_tensor(self, v: ir.Value) -> torch.Tensor:
        try:
            return _to_torch(_np(v))
        except TypeError as e:
            raise UnsupportedGraph(f"training: constant '{v.name}' of type {v.const_value.dtype} has no torch type") from e

    def _register(self, base: str, t: torch.Tensor) -> str:
        name = "".join(c if c.isalnum() else "_" for c in (base or "w")) or "w"
        k = self._names.get(name, 0)
        self._names[name] = k + 1
        name = f"{name}_{k}" if k else name
        self.register_parameter(name, torch.nn.Parameter(t.detach().clone().float()))
        return name

    def _weight_sources(self, graph: ir.Graph) -> Iterable[tuple[ir.Node, int, ir.Value]]:
        for n in graph:
            if n.op_type in WEIGHT_SLOTS:
                for i in WEIGHT_SLOTS[n.op_type]:
                    if i < len(n.inputs) and n.inputs[i] is not None:
                        yield n, i, n.inputs[i]
            elif n.op_type == "Add" and len(n.inputs) == 2:
                for i, other in ((0, 1), (1, 0)):
                    p = n.inputs[other].producer() if n.inputs[other] is not None else None
                    if p is not None and p.op_type in _LAYERS and _is_const(n.inputs[i]):
                        yield n, i, n.inputs[i]

    def _find_weights(self, graph: ir.Graph, init: dict[tuple[str, int], np.ndarray]) -> None:
        for layer, slot, v in self._weight_sources(graph):
            through_gather = False
            while True:
                if _is_const(v):
                    arr = _np(v)
                    if v in self.float_weights or not np.issubdtype(arr.dtype, np.floating):
                        break
                    if arr.ndim == 0 or arr.size < 2 and layer.op_type != "PRelu":
                        break
                    t = torch.from_numpy(arr.astype(np.float32))
                    zeros = t == 0
                    mask = (~zeros).float() if (through_gather and zeros.any()) or zeros.float().mean() >= 0.05 else None
                    self.float_weights[v] = FloatWeight(v, self._register(v.name, t), arr.dtype, mask)
                    break
                p = v.producer()
                if p is None or p.op_type not in _STORAGE:
                    break
                if p.op_type == "DequantizeLinear":
                    self._quant_weight(layer, slot, p, init)
                    break
                if p.op_type == "Gather":
                    if _is_const(p.inputs[0]) and self._codebook(layer, slot, p, init):
                        break
                    if not _is_const(p.inputs[1]):
                        break
                    through_gather = True
                elif any(_x is not None and not _is_const(_x) for _x in p.inputs[1:]):
                    break
                v = p.inputs[0]

    def _quant_weight(self, layer: ir.Node, slot: int, dq: ir.Node, init: dict) -> None:
        codes = dq.inputs[0]
        if dq in self.quant_weights:
            return
        if not _is_const(codes):
            p = codes.producer()
            if p is not None and p.op_type == "Gather":
                self.skipped.append((layer.name, "its int8 weight is a codebook of integer levels: the levels stay as they are"))
            return
        arr = _np(codes)
        if not np.issubdtype(arr.dtype, np.integer):
            return
        scale_v, zp_v = dq.inputs[1], (dq.inputs[2] if len(dq.inputs) > 2 else None)
        dtype = codes.const_value.dtype if codes.const_value is not None else None
        info = np.iinfo(arr.dtype)
        qmin, qmax = int(info.min), int(info.max)
        if dtype in (ir.DataType.INT4,):
            qmin, qmax = -8, 7
        elif dtype in (ir.DataType.UINT4,):
            qmin, qmax = 0, 15
        axis, block = O.attr(dq, "axis", 1), O.attr(dq, "block_size", 0)
        zp_arr = _np(zp_v) if zp_v is not None else None
        if arr.dtype == np.int8 and (zp_arr is None or not zp_arr.any()):
            # symmetric int8 codes keep their width: 7-bit weights (the quantize pass's default, so
            # onnxruntime's u8s8 kernels on AVX2 never saturate) stay within ±63
            m = int(np.abs(arr.astype(np.int32)).max()) if arr.size else 127
            qmax = 63 if m <= 63 else 127
            qmin = -qmax
        kind = "int"
        if arr.dtype == np.int32 and layer.op_type in ("Conv", "ConvTranspose", "Gemm") and slot == 2:
            kind = "bias"
        elif dtype == ir.DataType.INT4 and not block and zp_v is None and set(np.unique(arr).tolist()) <= {-1, 0, 1}:
            kind = "ternary" if (arr == 0).any() or codes.name.endswith("_ternary") else "binary"
        scale = self._static(scale_v)
        zp = self._static(zp_v) if zp_v is not None else None
        codes_t = torch.from_numpy(arr.astype(np.float32))
        latent = (codes_t - (O.broadcast_param(zp.float(), codes_t, axis, block) if zp is not None else 0.0)) * O.broadcast_param(scale.float(), codes_t, axis, block)
        # Integer codes start where they are (on the grid: a step must move a weight half a step of
        # the scale before its code changes, and the PTQ rounding is kept); a binary/ternary weight's
        # latent float starts at the original model's weight, which the projection alone cannot give.
        start = init.get((layer.name, slot)) if kind in ("ternary", "binary") else None
        if start is not None and tuple(start.shape) == tuple(latent.shape):
            latent = torch.from_numpy(np.array(start, np.float32))
        zeros = codes_t == (O.broadcast_param(zp.float(), codes_t, axis, block) if zp is not None else 0.0)
        mask = None
        if kind == "int" and zeros.float().mean() >= 0.05 and start is None:
            mask = (~zeros).float()
        if mask is not None:
            latent = latent * mask
        self.quant_weights[dq] = QuantWeight(dq, codes, self._register(codes.name, latent), kind, qmin, qmax, axis, block, mask)

    def _codebook(self, layer: ir.Node, slot: int, gather: ir.Node, init: dict) -> bool:
        """``Gather(levels, Cast(indices))`` (the codebook pass): a latent float weight assigned to
        its nearest level every step (straight-through), the levels trained too; the weights that
        were exact zeros (sparsity) stay on the zero level. False when this is not that pattern."""
        if gather in self.codebooks:
            return True
        book_v, idx_v = gather.inputs[0], gather.inputs[1]
        if O.attr(gather, "axis", 0) != 0:
            return False
        book = _np(book_v)
        if book.ndim != 1 or not np.issubdtype(book.dtype, np.floating):
            return False
        idx_store = idx_v if _is_const(idx_v) else None
        cast = idx_v.producer()
        if idx_store is None and cast is not None and cast.op_type == "Cast" and _is_const(cast.inputs[0]):
            idx_store = cast.inputs[0]
        if idx_store is None:
            return False
        idx = _np(idx_store).astype(np.int64)
        weight = book[idx].astype(np.float32)
        start = init.get((layer.name, slot))
        latent = np.array(start, np.float32) if start is not None and start.shape == weight.shape else weight
        zero = np.flatnonzero(book == 0)
        mask = torch.from_numpy((book[idx] != 0).astype(np.float32)) if zero.size else None
        if mask is not None:
            latent = latent * mask.numpy()
        name = self._register(book_v.name, torch.from_numpy(latent))
        levels = self._register(book_v.name + "_levels", torch.from_numpy(book.astype(np.float32)))
        self.codebooks[gather] = CodebookWeight(gather, book_v, idx_store, name, levels, mask,
                                                int(zero[0]) if zero.size else -1)
        return True

    def _find_scales(self, graph: ir.Graph) -> None:
        """Float scales of Q/DQ nodes (activations and integer weights) become parameters; a
        binary/ternary weight's α is a function of the weight, not a parameter."""
        for n in graph:
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(n.inputs) < 2:
                continue
            qw = self.quant_weights.get(n)
            if qw is not None and qw.kind in ("ternary", "binary", "bias"):
                continue
            s = n.inputs[1]
            if s in self.scale_params or not _is_const(s) or s in self.float_weights:
                continue
            arr = _np(s)
            if np.issubdtype(arr.dtype, np.floating):
                self.scale_params[s] = self._register(s.name + "_scale", torch.from_numpy(arr.astype(np.float32)))

    def _static(self, v: ir.Value, learned: bool = False) -> torch.Tensor:
        """The value of a tensor computed from constants only (a bias scale ``Mul(s_x, s_w)``);
        with ``learned``, learned scales at their current value."""
        if learned and v in self.scale_params:
            return torch.clamp(getattr(self, self.scale_params[v]), min=1e-12)
        if v in self.consts:
            return self.consts[v]
        p = v.producer()
        if p is None:
            raise UnsupportedGraph(f"training: '{v.name}' is not a constant")
        outs = O.OPS[p.op_type](p, [self._static(x, learned) if x is not None else None for x in p.inputs])
        return outs[list(p.outputs).index(v)]

    # ------------------------------------------------------------------ running
    def _value_of(self, v: ir.Value, env: dict) -> torch.Tensor | None:
        if v is None:
            return None
        t = env.get(v)
        if t is not None:
            return t
        raise UnsupportedGraph(f"training: '{v.name}' is used before it is computed (graph not in topological order)")

    def forward(self, feeds: Mapping[str, Any], capture: Sequence[ir.Value] = ()) -> Any:
        """Outputs in graph order; with ``capture``, also a dict value → tensor of those values."""
        env: dict[ir.Value, torch.Tensor] = dict(self.consts)
        for v, s in self.scale_params.items():
            env[v] = torch.clamp(getattr(self, s), min=1e-12)
        for v, fw in self.float_weights.items():
            p = getattr(self, fw.param)
            env[v] = (p * fw.mask if fw.mask is not None else p).to(O.torch_dtype(_onnx_type(fw.dtype)))
        for v in self.inputs:
            if v.name not in feeds:
                raise BadInputError(f"training: no data for input '{v.name}'")
            x = feeds[v.name]
            env[v] = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        for n in self.nodes:
            qw = self.quant_weights.get(n)
            cb = self.codebooks.get(n) if qw is None else None
            if qw is not None:
                outs = [self._project(qw, env)]
            elif cb is not None:
                outs = [self._assign(cb)]
            else:
                try:
                    outs = O.OPS[n.op_type](n, [self._value_of(x, env) if x is not None else None for x in n.inputs])
                except (RuntimeError, IndexError, ValueError, NotImplementedError) as e:
                    raise UnsupportedGraph(f"training: node '{n.name}' ({n.op_type}) fails in torch: {str(e).splitlines()[0]}") from e
            for v, t in zip(n.outputs, outs):
                if v is not None:
                    env[v] = t
        out = [env[v] for v in self.outputs]
        if capture:
            return out, {v: env[v] for v in capture}
        return out

    def _project(self, qw: QuantWeight, env: dict) -> torch.Tensor:
        w = getattr(self, qw.param)
        if qw.mask is not None:
            w = w * qw.mask
        scale_v = qw.node.inputs[1]
        if qw.kind in ("ternary", "binary"):
            return self._ternary(w, qw)
        scale = env[scale_v] if scale_v in env else self._static(scale_v)
        qw.last_scale = scale.detach()
        zp_v = qw.node.inputs[2] if len(qw.node.inputs) > 2 else None
        zp = env[zp_v] if zp_v is not None else None
        return O.fake_quant(w, scale.float(), zp, qw.qmin, qw.qmax, qw.axis, qw.block)

    def _nearest(self, cb: CodebookWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latent, levels, index of each weight's nearest level; the masked ones on the zero level)."""
        w, levels = getattr(self, cb.param), getattr(self, cb.levels)
        if cb.zero_level >= 0:  # the zero level stays exactly zero
            keep = torch.ones_like(levels)
            keep[cb.zero_level] = 0
            levels = levels * keep
        idx = (w.detach().unsqueeze(-1) - levels.detach()).abs().argmin(-1)
        if cb.mask is not None:
            idx = torch.where(cb.mask > 0, idx, torch.full_like(idx, cb.zero_level))
        return w, levels, idx

    def _assign(self, cb: CodebookWeight) -> torch.Tensor:
        w, levels, idx = self._nearest(cb)
        if cb.mask is not None:
            w = w * cb.mask
        wq = levels[idx]
        return wq + (w - w.detach())  # forward: the levels (their gradient too); backward: also to the latent

    def _ternary(self, w: torch.Tensor, qw: QuantWeight) -> torch.Tensor:
        codes, alpha = self.binary_ternary(w, qw)
        wq = codes * O.broadcast_param(alpha, w, qw.axis)
        return w + (wq - w).detach()

    def binary_ternary(self, w: torch.Tensor, qw: QuantWeight) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes in {-1, 0, 1}, α per output channel): the weight-only pass's projection."""
        axis = qw.axis % w.dim()
        red = tuple(i for i in range(w.dim()) if i != axis)
        a = w.detach().abs()
        if qw.kind == "binary":
            codes = torch.where(w.detach() >= 0, 1.0, -1.0)
            alpha = a.mean(red)
        else:
            delta = self.ternary_threshold * a.mean(red, keepdim=True)
            keep = (a > delta).float()
            codes = torch.sign(w.detach()) * keep
            alpha = (a * keep).sum(red) / keep.sum(red).clamp(min=1)
        alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
        return codes, alpha

    # ------------------------------------------------------------------ writing back
    def write_back(self) -> dict[str, Any]:
        """Store the trained values into the graph's own constants (same names, shapes, dtypes)."""
        with torch.no_grad():
            for v, s in self.scale_params.items():
                arr = torch.clamp(getattr(self, s), min=1e-12).numpy()
                _store(v, arr.astype(_np(v).dtype).reshape(_np(v).shape))
            for v, fw in self.float_weights.items():
                p = getattr(self, fw.param)
                arr = (p * fw.mask if fw.mask is not None else p).numpy()
                _store(v, arr.astype(fw.dtype))
            for cb in self.codebooks.values():
                _, levels, idx = self._nearest(cb)
                _store(cb.book, levels.numpy().astype(_np(cb.book).dtype))
                _store(cb.indices, idx.numpy().astype(np.int64).astype(_np_storage(cb.indices)))
            for qw in self.quant_weights.values():
                w = getattr(self, qw.param)
                if qw.mask is not None:
                    w = w * qw.mask
                if qw.kind in ("ternary", "binary"):
                    codes, alpha = self.binary_ternary(w, qw)
                    _store(qw.codes, codes.numpy().astype(np.int8).astype(_np_storage(qw.codes)))
                    sv = qw.node.inputs[1]
                    _store(sv, alpha.numpy().astype(_np(sv).dtype).reshape(_np(sv).shape))
                    continue
                scale_v = qw.node.inputs[1]
                scale = self._static(scale_v, learned=True)
                zp_v = qw.node.inputs[2] if len(qw.node.inputs) > 2 else None
                zp = self._static(zp_v).float() if zp_v is not None else None
                s = O.broadcast_param(scale.float(), w, qw.axis, qw.block)
                z = O.broadcast_param(zp, w, qw.axis, qw.block) if zp is not None else 0.0
                q = torch.clamp(torch.round(w / s) + z, qw.qmin, qw.qmax)
                _store(qw.codes, q.numpy().astype(np.int64).astype(_np_storage(qw.codes)))
        return {"float_weights": len(self.float_weights), "quantized_weights": len(self.quant_weights),
                "codebooks": len(self.codebooks), "scales": len(self.scale_params)}

    def trainable_summary(self) -> dict[str, int]:
        return {"float": len(self.float_weights), "quantized": len(self.quant_weights) + len(self.codebooks), "scales": len(self.scale_params),
                "parameters": int(sum(p.numel() for p in self.parameters()))}


def _onnx_type(np_dtype: Any) -> int:
    import onnx

    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(np_dtype))


def _np_storage(v: ir.Value) -> Any:
    """The numpy dtype a constant is stored in (ml_dtypes for 4-bit)."""
    if v.const_value is not None:
        return v.const_value.dtype.numpy()
    return _constant_node_array(v.producer()).dtype


def _store(v: ir.Value, arr: np.ndarray) -> None:
    """Replace the contents of a constant (initializer or Constant node), keeping name and shape."""
    arr = c_order(arr)
    if v.const_value is not None:
        v.const_value = ir.tensor(arr, name=v.name)
        return
    node = v.producer()
    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(arr, name=v.name))
