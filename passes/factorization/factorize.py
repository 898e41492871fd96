"""The ``factorize`` pass: low-rank or depthwise-separable replacements for Conv, Gemm and MatMul.

Methods (see :mod:`passes.factorization.decompose` for the algebra):

=============  =====================================================  ====================================
method         replaces                                               with
=============  =====================================================  ====================================
svd            Gemm / MatMul with a constant 2-D weight; 1×1 Conv     two matrix products (two 1×1 convs)
spatial-svd    k×k Conv (k > 1 both ways)                             k×1 conv (r channels) → 1×k conv
tucker         k×k Conv                                               1×1 → k×k core → 1×1
cp             k×k Conv (k > 1 both ways)                             1×1 → depthwise k×1 → depthwise 1×k → 1×1
depthwise      k×k Conv                                               depthwise k×k (multiplier m) → 1×1
=============  =====================================================  ====================================

Stride, padding (asymmetric too), dilation and bias are split exactly between
the factors: a factor without bias maps zero padding to zero, so padding moves
to the factor that applies the spatial kernel on that axis, and the bias goes
to the last factor. At full rank every method reproduces the layer to float
rounding. Grouped/depthwise convs, ``auto_pad`` on unknown shapes, 3-D convs,
non-constant or shared weights are skipped, each with its reason.

Ranks: ``rank`` ≥ 1 is an absolute rank (Tucker: both ranks; depthwise: the
channel multiplier); 0 < ``rank`` < 1 is the fraction of the layer's MACs to
keep; ``energy`` keeps that fraction of the squared singular values; ``vbmf``
estimates ranks by empirical VBMF (Kim et al. 2016); ``target_macs`` finds the
one per-layer MAC fraction that brings the whole model to that ratio.
``layer_rank`` overrides per node-name pattern. A rank that would not reduce a
layer's MACs leaves it alone.

With calibration data and ``refit`` (default), the last factor of every
layer is re-solved by ridge least squares so its output on calibration data
matches the original layer's output, layer by layer in topological order
(:func:`passes.refit.reconstruct`); the dense layers left whole
after the first factorized one are refit the same way, so the error that
reaches them is absorbed too.

``keep_if_faster`` profiles the original and the factorized model in
onnxruntime (per-kernel, twice, interleaved) and keeps only the layers whose
factors take less than 0.95× the original layer's time; the whole model is
then timed against the input and given back unchanged unless it is at least 5% faster.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxcc.compiler.analysis import layer_macs
from onnxcc.compiler.ir_utils import attr, add_initializer, clone_model, const_array, exclude_match, gemm_as_matmul, infer_shapes, node_label, replace_contents
from onnxcc.compiler import progress, speed
from onnxcc.compiler.passbase import OnnxccPass, PassReport, Skipped, scaled_overrides
from onnxcc.passes.factorization import decompose as D

logger = logging.getLogger(__name__)

METHODS = ("svd", "spatial-svd", "tucker", "cp", "depthwise")


# ----------------------------------------------------------------------------- layer geometry
@dataclasses.dataclass
class _Layer:
    node: ir.Node
    kind: Literal["conv", "linear"]
    w: np.ndarray  # conv: [O, I, kh, kw]; linear: [K, N] (alpha and transB applied)
    bias: np.ndarray | None
    macs: int
    # conv only
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    strides: tuple[int, int] = (1, 1)
    dilations: tuple[int, int] = (1, 1)
    in_hw: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    rows: int = 1  # linear: rows of the input (batch 1)

    @property
    def name(self) -> str:
        return node_label(self.node)

    @property
    def mid_rows(self) -> int:
        """Rows after the vertical kernel alone (spatial SVD, CP): output height at input width."""
        return self.out_hw[0]

    def factored_macs(self, method: str, r: int | tuple[int, int]) -> int:
        if self.kind == "linear":
            k, n = self.w.shape
            return self.rows * r * (k + n)
        o, i, kh, kw = self.w.shape
        (hi, wi), (ho, wo) = self.in_hw, self.out_hw
        if method == "svd":  # 1×1 conv: strides applied by the first
            return (i * r + r * o) * ho * wo
        if method == "spatial-svd":
            return r * i * kh * ho * wi + o * r * kw * ho * wo
        if method == "tucker":
            r_out, r_in = r
            return i * r_in * hi * wi + r_out * r_in * kh * kw * ho * wo + r_out * o * ho * wo
        if method == "cp":
            return i * r * hi * wi + r * kh * ho * wi + r * kw * ho * wo + r * o * ho * wo
        if method == "depthwise":
            return i * r * kh * kw * ho * wo + i * r * o * ho * wo
        raise ValueError(method)

    def full_rank(self, method: str) -> int | tuple[int, int]:
        if self.kind == "linear" or method == "svd":
            return min(self.w.shape[:2])
        o, i, kh, kw = self.w.shape
        return {
            "spatial-svd": min(i * kh, o * kw),
            "tucker": (o, i),
            "cp": o * i * kh * kw,  # an upper bound; CP is never run there
            "depthwise": min(o, kh * kw),
        }[method]


def _static(shape) -> tuple[int, ...] | None:
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)


def _explicit_pads(node: ir.Node, in_hw, k, s, d) -> tuple[int, int, int, int] | None:
    auto = attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "NOTSET":
        p = attr(node, "pads", [0, 0, 0, 0])
        return (int(p[0]), int(p[1]), int(p[2]), int(p[3]))
    if auto == "VALID":
        return (0, 0, 0, 0)
    if in_hw is None:
        return None
    out = []
    for ax in range(2):
        o = -(-in_hw[ax] // s[ax])
        total = max(0, (o - 1) * s[ax] + (k[ax] - 1) * d[ax] + 1 - in_hw[ax])
        small, big = total // 2, total - total // 2
        out.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return (out[0][0], out[1][0], out[0][1], out[1][1])


def _layer(node: ir.Node, method: str) -> tuple[_Layer | None, str]:
    """The layer's weights and geometry, or why ``method`` does not apply to it."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return None, ""
    if op in ("Gemm", "MatMul"):
        if method != "svd":
            return None, f"{op} is factorized by --method svd only"
        w = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            return None, "weight is not a constant float32 matrix"
        if const_array(node.inputs[0]) is not None:
            return None, "both operands are constants"
        if len(node.inputs[1].uses()) > 1:
            return None, "weight is shared with another node"
        bias = None
        if op == "Gemm":
            w, bias, why = gemm_as_matmul(node)
            if why:
                return None, why
        macs = layer_macs(node)
        x = _static(node.inputs[0].shape[1:-1]) if node.inputs[0].shape is not None else None
        rows = int(np.prod(x)) if x else 1
        return _Layer(node, "linear", w, bias, macs or w.size * rows, rows=rows), ""
    if op != "Conv":
        return None, ""
    w = const_array(node.inputs[1])
    if w is None or w.dtype != np.float32:
        return None, "weight is not a constant float32 tensor"
    if w.ndim != 4:
        return None, f"{w.ndim - 2}-D conv (only 2-D convs are factorized)"
    if attr(node, "group", 1) != 1:
        return None, "grouped or depthwise conv: already factored"
    if len(node.inputs[1].uses()) > 1:
        return None, "weight is shared with another node"
    o, i, kh, kw = w.shape
    if method == "svd" and (kh, kw) != (1, 1):
        return None, f"{kh}x{kw} conv: --method svd factorizes 1x1 convs (use spatial-svd, tucker, cp or depthwise)"
    if method in ("spatial-svd", "cp") and (kh == 1 or kw == 1):
        return None, f"{kh}x{kw} kernel: {method} needs k>1 on both axes"
    if method in ("tucker", "depthwise") and (kh, kw) == (1, 1):
        return None, f"1x1 conv: use --method svd"
    bias = None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = const_array(node.inputs[2])
        if bias is None:
            return None, "bias is not a constant"
    x_shape, y_shape = _static(node.inputs[0].shape), _static(node.outputs[0].shape)
    if x_shape is None or y_shape is None:
        in_hw = _static(node.inputs[0].shape[2:]) if node.inputs[0].shape is not None and len(node.inputs[0].shape) == 4 else None
        out_hw = _static(node.outputs[0].shape[2:]) if node.outputs[0].shape is not None and len(node.outputs[0].shape) == 4 else None
        if in_hw is None or out_hw is None:
            return None, "spatial size unknown (give --input-shape)"
    else:
        in_hw, out_hw = x_shape[2:], y_shape[2:]
    s = tuple(attr(node, "strides", [1, 1]))
    d = tuple(attr(node, "dilations", [1, 1]))
    pads = _explicit_pads(node, in_hw, (kh, kw), s, d)
    if pads is None:
        return None, "auto_pad SAME with unknown input size"
    macs = o * i * kh * kw * out_hw[0] * out_hw[1]
    return _Layer(node, "conv", w, bias, macs, pads, s, d, in_hw, out_hw), ""


# ----------------------------------------------------------------------------- ranks
def _singular_values(layer: _Layer, method: str) -> list[np.ndarray]:
    w = layer.w
    if layer.kind == "linear" or method == "svd":
        m = w if layer.kind == "linear" else w[:, :, 0, 0]
        return [np.linalg.svd(m, compute_uv=False)]
    if method == "spatial-svd":
        return [np.linalg.svd(D.spatial_matrix(w), compute_uv=False)]
    o, i = w.shape[:2]
    unfold0, unfold1 = w.reshape(o, -1), w.transpose(1, 0, 2, 3).reshape(i, -1)
    if method in ("tucker", "cp"):
        return [np.linalg.svd(unfold0, compute_uv=False), np.linalg.svd(unfold1, compute_uv=False)]
    return [np.linalg.svd(w[:, c].reshape(o, -1), compute_uv=False) for c in range(i)]  # depthwise


def _matrices(layer: _Layer, method: str) -> list[np.ndarray]:
    w = layer.w
    if layer.kind == "linear" or method == "svd":
        return [w if layer.kind == "linear" else w[:, :, 0, 0]]
    if method == "spatial-svd":
        return [D.spatial_matrix(w)]
    o, i = w.shape[:2]
    if method in ("tucker", "cp"):
        return [w.reshape(o, -1), w.transpose(1, 0, 2, 3).reshape(i, -1)]
    return [w[:, c].reshape(o, -1) for c in range(i)]


def _rank_for_ratio(layer: _Layer, method: str, ratio: float):
    """The largest rank whose factored MACs are at most ``ratio`` of the layer's."""
    budget = ratio * layer.macs
    full = layer.full_rank(method)
    if method == "tucker":
        o, i = full
        best = (1, 1)
        for t in np.linspace(1.0 / max(o, i), 1.0, 200):  # ranks in proportion to the channel counts
            r = (max(1, int(round(t * o))), max(1, int(round(t * i))))
            if layer.factored_macs(method, r) <= budget:
                best = r
        return best
    hi = full if method != "cp" else max(1, int(budget // max(1, layer.factored_macs(method, 1))) + 1)
    best = 1
    for r in range(1, int(hi) + 1):
        if layer.factored_macs(method, r) <= budget:
            best = r
        else:
            break
    return best


def _choose_rank(layer: _Layer, method: str, rank: float, energy: float | None, vbmf: bool):
    if vbmf or energy is not None:
        if vbmf:
            ranks = [D.vbmf_rank(m) for m in _matrices(layer, method)]
        else:
            ranks = [D.rank_for_energy(s, energy) for s in _singular_values(layer, method)]
        if method == "tucker":
            return (ranks[0], ranks[1])
        if method == "depthwise":
            return max(ranks)
        return max(ranks)
    if rank >= 1:
        r = int(rank)
        return (r, r) if method == "tucker" else r
    return _rank_for_ratio(layer, method, rank)


def _clip_rank(layer: _Layer, method: str, r):
    full = layer.full_rank(method)
    if method == "tucker":
        return (max(1, min(r[0], full[0])), max(1, min(r[1], full[1])))
    return max(1, min(int(r), full)) if method != "cp" else max(1, int(r))


# ----------------------------------------------------------------------------- graph rewrite
def _conv(graph, x, w, name, *, bias=None, kernel, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1):
    inputs = [x, add_initializer(graph, f"{name}_W", w)]
    if bias is not None:
        inputs.append(add_initializer(graph, f"{name}_B", bias))
    attrs = {"kernel_shape": list(kernel), "strides": list(strides), "pads": list(pads), "dilations": list(dilations), "group": group}
    return ir.node("Conv", inputs, attributes=attrs, name=name)


def _factor_nodes(graph: ir.Graph, layer: _Layer, method: str, factors: tuple[np.ndarray, ...]) -> list[ir.Node]:
    node, x, base = layer.node, layer.node.inputs[0], layer.node.name or layer.name
    names = [f"{base}_f{i + 1}" for i in range(len(factors))]
    if layer.kind == "linear":
        a, b = factors
        if node.op_type == "Gemm":
            n1 = ir.node("Gemm", [x, add_initializer(graph, f"{names[0]}_W", a)], name=names[0])
            ins = [n1.outputs[0], add_initializer(graph, f"{names[1]}_W", b)]
            if layer.bias is not None:
                ins.append(add_initializer(graph, f"{names[1]}_B", layer.bias))
            n2 = ir.node("Gemm", ins, name=names[1])
        else:
            n1 = ir.node("MatMul", [x, add_initializer(graph, f"{names[0]}_W", a)], name=names[0])
            n2 = ir.node("MatMul", [n1.outputs[0], add_initializer(graph, f"{names[1]}_W", b)], name=names[1])
        return [n1, n2]
    t, l, btm, rgt = layer.pads
    (sh, sw), (dh, dw) = layer.strides, layer.dilations
    o, i, kh, kw = layer.w.shape
    if method == "svd":
        first, last = factors
        n1 = _conv(graph, x, first, names[0], kernel=(1, 1), strides=layer.strides, pads=layer.pads)
        n2 = _conv(graph, n1.outputs[0], last, names[1], bias=layer.bias, kernel=(1, 1))
        return [n1, n2]
    if method == "spatial-svd":
        vert, horiz = factors
        n1 = _conv(graph, x, vert, names[0], kernel=(kh, 1), strides=(sh, 1), pads=(t, 0, btm, 0), dilations=(dh, 1))
        n2 = _conv(graph, n1.outputs[0], horiz, names[1], bias=layer.bias, kernel=(1, kw), strides=(1, sw), pads=(0, l, 0, rgt), dilations=(1, dw))
        return [n1, n2]
    if method == "tucker":
        first, core, last = factors
        n1 = _conv(graph, x, first, names[0], kernel=(1, 1))
        n2 = _conv(graph, n1.outputs[0], core, names[1], kernel=(kh, kw), strides=layer.strides, pads=layer.pads, dilations=layer.dilations)
        n3 = _conv(graph, n2.outputs[0], last, names[2], bias=layer.bias, kernel=(1, 1))
        return [n1, n2, n3]
    if method == "cp":
        first, vert, horiz, last = factors
        r = first.shape[0]
        n1 = _conv(graph, x, first, names[0], kernel=(1, 1))
        n2 = _conv(graph, n1.outputs[0], vert, names[1], kernel=(kh, 1), strides=(sh, 1), pads=(t, 0, btm, 0), dilations=(dh, 1), group=r)
        n3 = _conv(graph, n2.outputs[0], horiz, names[2], kernel=(1, kw), strides=(1, sw), pads=(0, l, 0, rgt), dilations=(1, dw), group=r)
        n4 = _conv(graph, n3.outputs[0], last, names[3], bias=layer.bias, kernel=(1, 1))
        return [n1, n2, n3, n4]
    dwk, pw = factors  # depthwise
    n1 = _conv(graph, x, dwk, names[0], kernel=(kh, kw), strides=layer.strides, pads=layer.pads, dilations=layer.dilations, group=i)
    n2 = _conv(graph, n1.outputs[0], pw, names[1], bias=layer.bias, kernel=(1, 1))
    return [n1, n2]


def _decompose(layer: _Layer, method: str, r, seed: int) -> tuple[tuple[np.ndarray, ...], np.ndarray, str]:
    """(factors in op layout, rebuilt weight for the error, why-not)."""
    w = layer.w
    if layer.kind == "linear":
        a, b = D.svd_matrix(w, r)
        return (a, b), a @ b, ""
    if method == "svd":
        a, b = D.svd_matrix(w[:, :, 0, 0].T, r)  # a[I, r], b[r, O]
        first, last = np.ascontiguousarray(a.T[:, :, None, None]), np.ascontiguousarray(b.T[:, :, None, None])
        return (first, last), (b.T @ a.T)[:, :, None, None], ""
    if method == "spatial-svd":
        v, h = D.spatial_svd(w, r)
        return (v, h), D.spatial_svd_rebuild(v, h), ""
    if method == "tucker":
        f, c, l = D.tucker2(w, r[0], r[1], seed=seed)
        return (f, c, l), D.tucker2_rebuild(f, c, l), ""
    if method == "cp":
        try:
            factors, err = D.cp(w, r, seed=seed)
        except (np.linalg.LinAlgError, ValueError) as e:  # ALS on tiny or rank-deficient tensors
            return (), None, f"CP fit failed ({str(e).splitlines()[0][:80]})"
        norms = np.linalg.norm(factors[0].reshape(factors[0].shape[0], -1), axis=1) * np.linalg.norm(factors[3].reshape(factors[3].shape[0], -1), axis=0)
        if not np.isfinite(err) or err >= 1.0:
            return factors, None, f"CP fit degenerate (relative error {err:.2f})"
        # Diverging components that cancel each other (a known CP failure): the components' energy
        # is far above the energy of their sum (for orthogonal components the two are equal).
        rebuilt = D.cp_rebuild(*factors)
        if float(np.sqrt(np.sum(norms**2))) > 10.0 * max(float(np.linalg.norm(rebuilt)), 1e-30):
            return factors, None, "CP fit degenerate (components cancel each other)"
        return factors, rebuilt, ""
    dwk, pw = D.depthwise_separable(w, r)
    return (dwk, pw), D.depthwise_rebuild(dwk, pw, w.shape[1]), ""


def _replace(graph: ir.Graph, layer: _Layer, nodes: list[ir.Node]) -> None:
    node = layer.node
    for n_ in nodes[:-1]:
        n_.outputs[0].name = f"{n_.name}_out"
    old, final = node.outputs[0], nodes[-1].outputs[0]
    graph.insert_before(node, nodes)
    name = old.name
    old.name = f"{name}_unfactored"
    final.name = name
    final.dtype, final.shape = old.dtype, old.shape
    old.replace_all_uses_with(final, replace_graph_outputs=True)
    graph.remove(node, safe=True)


def factorize_layer(graph: ir.Graph, layer: _Layer | ir.Node, method: str, r, seed: int = 0, cache: dict | None = None) -> dict | str:
    """Replace one layer by its factors at rank ``r``; returns what was done, or why not (a string).

    ``layer`` may be a node (its geometry is read here). No MAC check: callers
    (and tests at full rank) choose the rank. ``cache``: decompositions already computed, by
    layer, method and rank (keep-if-faster applies the kept layers a second time).
    """
    if isinstance(layer, ir.Node):
        layer, why = _layer(layer, method)
        if layer is None:
            return why or "not a factorizable layer"
    r = _clip_rank(layer, method, r)
    key = (layer.node.name, method, r, seed)
    if cache is not None and key in cache:
        factors, rebuilt, why = cache[key]
    else:
        factors, rebuilt, why = _decompose(layer, method, r, seed)
        if cache is not None:
            cache[key] = (factors, rebuilt, why)
    if why:
        return why
    nodes = _factor_nodes(graph, layer, method, factors)
    _replace(graph, layer, nodes)
    return {
        "op": layer.node.op_type,
        "rank": list(r) if isinstance(r, tuple) else int(r),
        "macs_before": int(layer.macs),
        "macs_after": int(layer.factored_macs(method, r)),
        "weight_rel_error": round(D.relative_error(layer.w, rebuilt), 5),
        "factors": [n_.name for n_ in nodes],
    }


def _parse_overrides(items) -> list[tuple[str, float]]:
    out = []
    for item in items:
        pat, sep, val = item.rpartition("=")
        if not sep or not pat:
            raise ValueError(f"layer_rank '{item}': expected PATTERN=R")
        out.append((pat, float(val)))
    return out


class FactorizePass(OnnxccPass):
    name = "factorize"
    exact = False
    summary = "low-rank (SVD, spatial SVD, Tucker-2, CP) or depthwise-separable factorization, optional least-squares refit"

    @dataclasses.dataclass(frozen=True)
    class Config:
        method: Literal["svd", "spatial-svd", "tucker", "cp", "depthwise"] = dataclasses.field(default="tucker", metadata={"help": "decomposition"})
        rank: float = dataclasses.field(default=0.5, metadata={"help": ">=1: absolute rank (depthwise: channel multiplier); <1: fraction of each layer's MACs kept"})
        energy: float | None = dataclasses.field(default=None, metadata={"help": "rank keeping this fraction of the squared singular values"})
        vbmf: bool = dataclasses.field(default=False, metadata={"help": "ranks by empirical VBMF (Kim et al. 2016)"})
        target_macs: float | None = dataclasses.field(default=None, metadata={"help": "whole-model MACs ratio to reach (one per-layer fraction for all)"})
        layer_rank: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "PATTERN=R per-layer rank overrides"})
        exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "node-name patterns left alone"})
        min_macs: int = dataclasses.field(default=0, metadata={"help": "leave layers with fewer MACs alone"})
        refit: bool = dataclasses.field(default=True, metadata={"help": "with calibration data: re-solve each layer's last factor by least squares"})
        calib_samples: int = dataclasses.field(default=64, metadata={"help": "refit: calibration samples"})
        keep_if_faster: bool = dataclasses.field(default=False, metadata={"help": "keep only factorizations onnxruntime measures faster (timing-dependent)"})

        def __post_init__(self):
            if self.rank <= 0:
                raise ValueError("rank must be > 0")
            if self.energy is not None and not 0 < self.energy <= 1:
                raise ValueError("energy must be in (0, 1]")
            if self.target_macs is not None and not 0 < self.target_macs < 1:
                raise ValueError("target_macs must be in (0, 1)")
            _parse_overrides(self.layer_rank)

    @classmethod
    def milder(cls, config: "FactorizePass.Config", strength: float) -> "FactorizePass.Config | None":
        """A kept fraction f (of MACs, of energy, of the model's MACs) → 1 − (1 − f) × strength;
        absolute ranks and VBMF have nothing to weaken."""
        def keep(f):
            return min(0.999, 1 - (1 - f) * strength)

        overrides = scaled_overrides(config.layer_rank, lambda r: keep(r) if r < 1 else r)
        if config.target_macs is not None:
            return dataclasses.replace(config, target_macs=keep(config.target_macs), layer_rank=overrides)
        if config.energy is not None:
            return dataclasses.replace(config, energy=min(1.0, 1 - (1 - config.energy) * strength), layer_rank=overrides)
        if config.vbmf or config.rank >= 1:
            return None
        return dataclasses.replace(config, rank=keep(config.rank), layer_rank=overrides)

    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        infer_shapes(model)
        original = clone_model(model)
        plan, skipped, stats = self._plan(model)
        cache: dict = {}
        changed = self._apply(model, plan, stats, skipped, cache)
        if cfg.keep_if_faster and changed:
            slower = self._slower_layers(original, model, plan, stats)
            if slower:
                replace_contents(model, clone_model(original))
                infer_shapes(model)
                plan2 = {k: v for k, v in self._plan(model)[0].items() if k not in slower}
                changed = self._apply(model, plan2, stats, [], cache)
                for k in slower:
                    t = stats["layers"][k]["timing"]
                    skipped.append(Skipped(k, f"factorized form measured {t['factored_us']:.0f} us vs {t['original_us']:.0f} us: kept whole"))
        if changed and cfg.refit and self.context.calibration is not None:
            from onnxcc.passes.refit import ReconstructOptions, reconstruct

            infer_shapes(model)
            last = {stats["layers"][k]["factors"][-1]: None for k in changed}
            # The unfactorized dense layers after the first factorized one are refit too: their inputs
            # carry the factorization error, and re-solving them against the original outputs absorbs it
            # (without them, a partly factorized network loses what the refit of its factors won).
            factor_nodes = {f for k in changed for f in stats["layers"][k]["factors"]}
            nodes = list(model.graph)
            first = min(i for i, n in enumerate(nodes) if n.name in factor_nodes)
            for n in nodes[first:]:
                if n.name and n.name not in factor_nodes and n.op_type in ("Conv", "Gemm", "MatMul") and attr(n, "group", 1) == 1 and const_array(n.inputs[1]) is not None:
                    last[n.name] = None
            refit, refit_skipped, refit_stats = reconstruct(original, model, self.context.calibration, last, ReconstructOptions(samples=cfg.calib_samples, seed=self.context.seed))
            skipped.extend(s for s in refit_skipped if s.layer not in last or s.layer in factor_nodes or "max_dim" not in s.reason)
            stats["refit"] = {"layers": refit, "residuals": refit_stats}
        if cfg.keep_if_faster and changed:
            ratio = speed.worst_ratio(speed.median_ms([("original", original), ("factorized", model)], speed.FACTORIZED), 1)
            stats["latency_ratio_batch1"] = round(ratio, 3)
            if ratio > speed.FACTORIZED.model_ratio:
                replace_contents(model, original)
                skipped.append(Skipped("model", f"factorized model measured {ratio:.2f}x the original latency (not 5% faster): the input is returned unchanged"))
                return PassReport(model, False, skipped=skipped, stats=stats)
        stats["factorized_layers"] = len(changed)
        stats["macs_before"] = int(sum(v["macs_before"] for k, v in stats["layers"].items() if k in changed)) if changed else 0
        stats["macs_after"] = int(sum(v["macs_after"] for k, v in stats["layers"].items() if k in changed)) if changed else 0
        return PassReport(model, bool(changed), changed=changed, skipped=skipped, stats=stats)

    # -------------------------------------------------------------------------
    def _plan(self, model: ir.Model) -> tuple[dict[str, tuple[_Layer, object]], list[Skipped], dict]:
        cfg = self.config
        overrides = _parse_overrides(cfg.layer_rank)
        layers: list[_Layer] = []
        skipped: list[Skipped] = []
        for node in model.graph:
            if node.op_type not in ("Conv", "Gemm", "MatMul"):
                continue
            if exclude_match(node, cfg.exclude):
                skipped.append(Skipped(node_label(node), "excluded by pattern"))
                continue
            layer, why = _layer(node, cfg.method)
            if layer is None:
                if why:
                    skipped.append(Skipped(node_label(node), why))
                continue
            if layer.macs < cfg.min_macs:
                skipped.append(Skipped(layer.name, f"{layer.macs} MACs < min_macs {cfg.min_macs}"))
                continue
            layers.append(layer)
        ratio = cfg.rank
        stats: dict = {"method": cfg.method, "layers": {}}
        if cfg.target_macs is not None and layers:
            ratio = self._ratio_for_target(model, layers)
            stats["per_layer_macs_ratio"] = round(ratio, 4)
        plan: dict[str, tuple[_Layer, object]] = {}
        for layer in layers:
            r_spec = next((v for p, v in overrides if fnmatch.fnmatchcase(layer.node.name or "", p)), None)
            if r_spec is not None:
                r = _choose_rank(layer, cfg.method, r_spec, None, False)
            elif cfg.target_macs is not None:
                r = _rank_for_ratio(layer, cfg.method, ratio)
            else:
                r = _choose_rank(layer, cfg.method, ratio, cfg.energy, cfg.vbmf)
            r = _clip_rank(layer, cfg.method, r)
            after = layer.factored_macs(cfg.method, r)
            if after >= layer.macs:
                skipped.append(Skipped(layer.name, f"rank {r} would not reduce MACs ({after} >= {layer.macs})"))
                continue
            plan[layer.name] = (layer, r)
        return plan, skipped, stats

    def _ratio_for_target(self, model: ir.Model, layers: list[_Layer]) -> float:
        cfg = self.config
        total = sum(layer_macs(n) or 0 for n in model.graph)
        fixed = total - sum(layer.macs for layer in layers)
        goal = cfg.target_macs * total

        def after(rho: float) -> float:
            s = 0
            for layer in layers:
                r = _clip_rank(layer, cfg.method, _rank_for_ratio(layer, cfg.method, rho))
                s += min(layer.macs, layer.factored_macs(cfg.method, r))
            return fixed + s

        lo, hi = 1e-3, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            if after(mid) > goal:
                hi = mid
            else:
                lo = mid
        return lo

    def _apply(self, model: ir.Model, plan: dict, stats: dict, skipped: list[Skipped], cache: dict | None = None) -> list[str]:
        changed = []
        update = progress.bar(f"factorize ({self.config.method})")
        for k, (name, (layer, r)) in enumerate(plan.items()):
            if update:
                update(k, len(plan))
            info = factorize_layer(model.graph, layer, self.config.method, r, self.context.seed, cache)
            if isinstance(info, str):
                skipped.append(Skipped(name, info))
                continue
            changed.append(name)
            stats["layers"].setdefault(name, {}).update(info)
        if update:
            update(len(plan), len(plan))
        common.RemoveUnusedNodesPass()(model)
        return changed

    def _slower_layers(self, original: ir.Model, model: ir.Model, plan: dict, stats: dict) -> list[str]:
        """Layers whose factors together do not measure clearly faster (:data:`onnxcc.compiler.speed.FACTORIZED`)."""
        before, after = speed.layer_profiles(original, model)
        slower = []
        for name, info in stats["layers"].items():
            if name not in plan:
                continue
            t0 = before.get(name, np.inf)
            t1 = sum(after.get(f, 0.0) for f in info["factors"])
            if not np.isfinite(t0) or t1 <= 0:
                continue  # not profiled (fused away): the whole-model check decides
            info["timing"] = {"original_us": round(t0, 1), "factored_us": round(t1, 1)}
            if speed.is_slower(t0, t1, speed.FACTORIZED):
                slower.append(name)
        return slower
