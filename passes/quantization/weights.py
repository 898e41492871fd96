"""Weight-only compression: INT8, blocked INT4 or FP16 weights, float compute, no calibration.

The weights of Conv / ConvTranspose / Gemm / MatMul are stored small and
rebuilt in the graph, so the file shrinks and the model still runs in float:

* ``int8``: symmetric, per output channel, ``int8 initializer → DequantizeLinear``
  (4× smaller weights);
* ``int4``: symmetric, blocks of ``block_size`` along the input-channel axis,
  ``DequantizeLinear`` with ``block_size`` (opset 21; the model's opset is raised
  when needed; 8× smaller weights);
* ``fp16``: ``float16 initializer → Cast(float)`` (2× smaller, error ~1e-3
  relative), which onnxruntime folds once at session start.

onnxruntime keeps a DequantizeLinear of a constant as a node (it does not
constant-fold Q/DQ, so that QDQ graphs can fuse), so INT8/INT4 weight-only
models pay one dequantization per weight per run; the report says so and
``benchmarks`` measure it. Tensors smaller than ``min_size`` elements (biases,
tiny convs) are left as they are.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir

from onnxcc.compiler.ir_utils import add_initializer, const_array, convert_opset, exclude_match, node_label, replace_contents
from onnxcc.compiler.passbase import OnnxccPass, PassReport, Skipped
from onnxcc.compiler import weights as W
from onnxcc.compiler.metrics import weight_sqnr
from onnxcc.passes.quantization.ranges import weight_codes

WEIGHTED = W.WEIGHTED_OPS


class WeightOnlyPass(OnnxccPass):
    name = "weight-only"
    exact = False
    summary = "store weights as INT8, blocked INT4 or FP16 and rebuild them in-graph (smaller files, float compute)"

    @dataclasses.dataclass(frozen=True)
    class Config:
        dtype: Literal["int8", "int4", "fp16", "binary", "ternary"] = dataclasses.field(default="int8", metadata={"help": "storage type of the weights (binary/ternary: sign·α / {-α, 0, α} per output channel, large accuracy cost without fine-tuning)"})
        ternary_threshold: float = dataclasses.field(default=0.7, metadata={"help": "ternary: weights below this × mean|W| (per output channel) become 0"})
        block_size: int = dataclasses.field(default=32, metadata={"help": "int4: weights per scale along the input axis"})
        min_size: int = dataclasses.field(default=1024, metadata={"help": "leave tensors with fewer elements alone"})
        exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "node-name patterns left in float"})

        def __post_init__(self):
            if self.block_size < 16 or self.block_size & (self.block_size - 1):
                raise ValueError("block_size must be a power of two >= 16")

    def requires(self, model: ir.Model) -> None:
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph):
            raise ir.passes.PreconditionError("the model is already quantized")

    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        model.opset_imports.setdefault("", 13)  # no default-domain node yet (an ai.onnx.ml model)
        if cfg.dtype in ("int4", "binary", "ternary") and model.opset_imports.get("", 0) < 21:
            replace_contents(model, convert_opset(model, 21))
        elif cfg.dtype == "int8" and model.opset_imports.get("", 0) < 13:  # per-axis DequantizeLinear
            replace_contents(model, convert_opset(model, 13))
        graph = model.graph
        skipped, changed, layers = [], [], {}
        done: dict[str, ir.Value] = {}
        for node in list(graph):
            if node.op_type not in WEIGHTED or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            w_val = node.inputs[1]
            w = const_array(w_val)
            if w is None or w.dtype != np.float32:
                continue
            if exclude_match(node, cfg.exclude):
                skipped.append(Skipped(node_label(node), "excluded by pattern"))
                continue
            if w.size < cfg.min_size:
                skipped.append(Skipped(node_label(node), f"{w.size} weights < min_size {cfg.min_size}"))
                continue
            if w_val.name in done:
                node.replace_input_with(1, done[w_val.name])
                continue
            axis = W.out_axis(node)
            if cfg.dtype == "fp16":
                h = w.astype(np.float16)
                src = add_initializer(graph, f"{w_val.name}_fp16", h)
                rebuilt = ir.node("Cast", [src], attributes={"to": ir.DataType.FLOAT}, name=f"{node.name}_weight_cast")
                layers[node_label(node)] = {"dtype": "fp16", "sqnr_db": weight_sqnr(w, h.astype(np.float32))}
            elif cfg.dtype == "int8":
                rebuilt, sqnr = int8_weight(graph, node, w, axis, zero_point=True)
                layers[node_label(node)] = {"dtype": "int8", "sqnr_db": sqnr}
            elif cfg.dtype in ("binary", "ternary"):
                q, scale = _binary_ternary(w, axis, cfg.dtype, cfg.ternary_threshold)
                shape = [1] * w.ndim
                shape[axis] = -1
                qv = add_initializer(graph, f"{w_val.name}_{cfg.dtype}", q.astype(ml_dtypes.int4))
                sv = add_initializer(graph, f"{w_val.name}_scale", scale)
                rebuilt = ir.node("DequantizeLinear", [qv, sv], attributes={"axis": axis}, name=f"{node.name}_weight_dq")
                layers[node_label(node)] = {"dtype": cfg.dtype, "sqnr_db": weight_sqnr(w, q.astype(np.float32) * scale.reshape(shape)), "zeros": round(float(np.mean(q == 0)), 4)}
            else:
                block_axis = 1 - axis if w.ndim == 2 else 1  # the input-channel axis
                q, scale, rec = int4_blocks(w, block_axis, cfg.block_size)
                if q is None:
                    skipped.append(Skipped(node_label(node), f"input axis of {w.shape[block_axis]} is not a multiple of block_size {cfg.block_size}"))
                    continue
                qv = add_initializer(graph, f"{w_val.name}_int4", q)
                sv = add_initializer(graph, f"{w_val.name}_scale", scale)
                rebuilt = ir.node("DequantizeLinear", [qv, sv], attributes={"axis": block_axis, "block_size": cfg.block_size}, name=f"{node.name}_weight_dq")
                layers[node_label(node)] = {"dtype": "int4", "block_size": cfg.block_size, "sqnr_db": weight_sqnr(w, rec)}
            rebuilt.outputs[0].name = f"{w_val.name}_rebuilt"
            rebuilt.outputs[0].dtype = ir.DataType.FLOAT
            rebuilt.outputs[0].shape = ir.Shape(w.shape)
            graph.insert_before(node, rebuilt)
            node.replace_input_with(1, rebuilt.outputs[0])
            done[w_val.name] = rebuilt.outputs[0]
            changed.append(node_label(node))
        import onnx_ir.passes.common as common

        common.RemoveUnusedNodesPass()(model)
        stats = {"dtype": cfg.dtype, "layers": layers}
        if cfg.dtype in ("binary", "ternary") and changed:
            stats["warning"] = f"{cfg.dtype} weights without fine-tuning lose most of a network's accuracy; compare the verification metrics"
        return PassReport(model, bool(changed), changed=changed, skipped=skipped, stats=stats)


def int8_weight(graph: ir.Graph, node: ir.Node, w: np.ndarray, axis: int, zero_point: bool) -> tuple[ir.Node, float]:
    """``node``'s weight as symmetric per-channel int8 codes (±127) and a DequantizeLinear, not yet
    inserted: (the DQ node, weight SQNR in dB). ``zero_point=False`` leaves it to the operator's
    default 0, one initializer less."""
    w_val = node.inputs[1]
    m = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis))
    scale = np.where(m > 0, m / 127.0, 1.0).astype(np.float32)
    q = weight_codes(w, scale, axis, 127)
    inputs = [add_initializer(graph, f"{w_val.name}_int8", q), add_initializer(graph, f"{w_val.name}_scale", scale)]
    if zero_point:
        inputs.append(add_initializer(graph, f"{w_val.name}_zero_point", np.zeros(scale.shape, np.int8)))
    dq = ir.node("DequantizeLinear", inputs, attributes={"axis": axis}, name=f"{node.name}_weight_dq")
    return dq, weight_sqnr(w, q.astype(np.float32) * W.broadcast_along(scale, axis, w.ndim))


def _binary_ternary(w: np.ndarray, axis: int, kind: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(values in {-1, +1} or {-1, 0, +1}, per-output-channel float32 α) minimising ‖W − α·Q‖ per channel.

    Binary: Q = sign(W), α = mean|W| (Rastegari et al. 2016). Ternary: Δ = threshold · mean|W|,
    Q = sign(W)·[|W| > Δ], α = mean of |W| over the kept weights (Li & Liu 2016).
    """
    red = tuple(i for i in range(w.ndim) if i != axis)
    shape = [1] * w.ndim
    shape[axis] = -1
    a = np.abs(w)
    if kind == "binary":
        q = np.where(w >= 0, 1, -1).astype(np.int8)
        alpha = a.mean(axis=red)
    else:
        delta = threshold * a.mean(axis=red)
        keep = a > delta.reshape(shape)
        q = (np.sign(w) * keep).astype(np.int8)
        alpha = np.where(keep.sum(axis=red) > 0, (a * keep).sum(axis=red) / np.maximum(keep.sum(axis=red), 1), 0.0)
    alpha = np.where(alpha > 0, alpha, 1.0).astype(np.float32)
    return q, alpha


def int4_blocks(w: np.ndarray, axis: int, block: int):
    """Symmetric int4 in blocks of ``block`` along ``axis``: (int4 array, float32 scales, reconstruction)."""
    n = w.shape[axis]
    if n % block:
        return None, None, None
    moved = np.moveaxis(w, axis, -1)
    blocks = moved.reshape(moved.shape[:-1] + (n // block, block))
    m = np.abs(blocks).max(-1, keepdims=True)
    scale = np.where(m > 0, m / 7.0, 1.0).astype(np.float32)
    q = np.clip(np.round(blocks / scale), -7, 7)
    rec = np.moveaxis((q * scale).reshape(moved.shape), -1, axis).astype(np.float32)
    q = np.moveaxis(q.reshape(moved.shape), -1, axis).astype(ml_dtypes.int4)
    scale = np.moveaxis(scale[..., 0], -1, axis)
    return q, np.ascontiguousarray(scale), rec
