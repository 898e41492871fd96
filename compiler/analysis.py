"""Per-layer analysis: parameters, MACs, shapes and weight statistics.

This table is what every before/after report compares. Shapes come from ONNX
shape inference on a copy of the model; a symbolic batch counts as 1.

MACs (multiply-accumulates) per layer, for batch 1:

* Conv: ``prod(output shape) · C_in/group · prod(kernel)``
* ConvTranspose: ``prod(input shape) · C_out/group · prod(kernel)``
* Gemm / MatMul: ``prod(output shape) · K``

Elementwise ops, pooling and normalisation count 0 MACs (they are reported as
parameters only where they hold weights).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.files import file_size
from onnxcc.compiler.ir_utils import (
    apply_shape_hint,
    clone_model,
    concrete_inputs,
    concrete_shape,
    const_array,
    infer_shapes,
    node_label,
    shape_hint,
)

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclasses.dataclass
class Layer:
    name: str
    op: str
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    params: int
    macs: int | None
    weight_stats: dict[str, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ModelSummary:
    layers: list[Layer]
    params: int
    macs: int
    nodes: int
    file_size: int | None
    op_counts: dict[str, int]
    unknown_macs: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "macs": self.macs,
            "nodes": self.nodes,
            "file_size": self.file_size,
            "op_counts": self.op_counts,
            "unknown_macs": self.unknown_macs,
            "layers": [layer.to_json() for layer in self.layers],
        }


def weight_stats(w: np.ndarray) -> dict[str, float]:
    w = w.astype(np.float64, copy=False)
    finite = np.isfinite(w)
    return {
        "min": float(w[finite].min()) if finite.any() else math.nan,
        "max": float(w[finite].max()) if finite.any() else math.nan,
        "mean": float(w[finite].mean()) if finite.any() else math.nan,
        "std": float(w[finite].std()) if finite.any() else math.nan,
        "sparsity": float(np.mean(w == 0)),
        "nonfinite": int((~finite).sum()),
    }


def layer_macs(node: ir.Node, batch: int = 1) -> int | None:
    op = node.op_type
    out = concrete_shape(node.outputs[0], batch) if node.outputs else None
    if op == "Conv":
        w = node.inputs[1]
        ws = concrete_shape(w) if w is not None else None
        if out is None or ws is None:
            return None
        return int(np.prod(out)) * int(np.prod(ws[1:]))
    if op == "ConvTranspose":
        x = concrete_shape(node.inputs[0], batch)
        w = concrete_shape(node.inputs[1])
        if x is None or w is None:
            return None
        return int(np.prod(x)) * int(np.prod(w[1:]))
    if op in ("Gemm", "MatMul"):
        a = concrete_shape(node.inputs[0], batch)
        if out is None or a is None:
            return None
        trans_a = op == "Gemm" and node.attributes.get("transA") is not None and node.attributes["transA"].as_int() == 1
        k = a[0] if trans_a else a[-1]
        return int(np.prod(out)) * int(k)
    if op in ("LSTM", "DynamicQuantizeLSTM", "GRU", "RNN"):  # per step and direction: the gate rows times (input + hidden)
        x = concrete_shape(node.inputs[0], batch)
        hidden = node.attributes.get_int("hidden_size", 0)
        if x is None or len(x) != 3 or not hidden:
            return None
        if node.attributes.get_int("layout", 0) == 1:
            x = (x[1], x[0], x[2])
        gates = {"LSTM": 4, "DynamicQuantizeLSTM": 4, "GRU": 3, "RNN": 1}[op]
        directions = 2 if node.attributes.get_string("direction", "forward") == "bidirectional" else 1
        return x[0] * x[1] * directions * gates * hidden * (x[2] + hidden)
    return 0


#: ops whose integer kernels carry INT8's speed-up on x86 (a Conv counts when it is not grouped)
DENSE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def dense_intensity(model: ir.Model) -> float | None:
    """MACs of the dense layers (ungrouped convs, matrix products) per float activation element
    the graph computes, at batch 1 and the shape hint's other dims; None when too little is known.

    INT8 on a CPU gains on dense MACs and pays per element (quantize / dequantize, integer
    elementwise and depthwise kernels): the ratio says which side weighs more. The model's shapes
    are re-inferred in place (at the hint's dims while it counts); its graph is not changed."""
    dense = elements = 0
    with concrete_inputs(model):
        if not shape_hint(model):
            infer_shapes(model)
        for node in model.graph:
            if node.op_type in DENSE_OPS and node.domain in ("", "ai.onnx") and node.attributes.get_int("group", 1) == 1:
                dense += layer_macs(node) or 0
            for out in node.outputs:
                shape = concrete_shape(out, 1) if out.dtype == ir.DataType.FLOAT else None
                if shape is not None:
                    elements += int(np.prod(shape))
    return dense / elements if dense and elements else None


def _const_meta(v: ir.Value) -> tuple[int, np.dtype] | None:
    """(element count, numpy dtype) of a constant operand, read from its metadata when it is an initializer."""
    t = v.const_value
    if t is not None and not v.is_graph_input():
        try:
            return int(np.prod(t.shape.numpy())) if t.shape.rank() else 1, t.dtype.numpy()
        except (TypeError, ValueError, AttributeError):
            pass
    arr = const_array(v)
    return None if arr is None else (int(arr.size), arr.dtype)


def analyze(model: ir.Model, *, path: str | os.PathLike | None = None, stats: bool = True) -> ModelSummary:
    """Layer table of ``model`` (a shape-inferred copy is analysed; the model is not touched)."""
    m = clone_model(model)
    if not apply_shape_hint(m):  # dims the model leaves dynamic: counted at the given concrete shape
        infer_shapes(m)
    layers: list[Layer] = []
    op_counts: dict[str, int] = {}
    unknown: list[str] = []
    seen_params: set[int] = set()
    total_params = 0
    total_macs = 0
    for node in m.graph.all_nodes():
        op_counts[node.op_type] = op_counts.get(node.op_type, 0) + 1
        params = 0
        wstats = None
        for i, v in enumerate(node.inputs):
            if i == 0 or v is None:
                continue
            meta = _const_meta(v)  # size and dtype without loading the data
            if meta is None:
                continue
            size, dtype = meta
            if size <= 1 or not np.issubdtype(dtype, np.number):
                continue
            if node.op_type in ("Reshape", "Slice", "Pad", "Resize", "Expand", "Tile", "Gather") and i > 0 and np.issubdtype(dtype, np.integer):
                continue  # shape/index operands, not parameters
            params += size
            if id(v) not in seen_params:
                seen_params.add(id(v))
                total_params += size
            if stats and i == 1 and node.op_type in WEIGHTED_OPS + ("DequantizeLinear",):
                wstats = weight_stats(const_array(v))
                if isinstance(v.const_value, ir.ExternalTensor):
                    v.const_value.release()  # external weights: one at a time in memory
        if node.op_type in ("DequantizeLinear", "Cast"):  # stored codes; a Cast of a half-width constant (quantize's narrow_constants)
            meta = _const_meta(node.inputs[0])
            if meta is not None and id(node.inputs[0]) not in seen_params:
                seen_params.add(id(node.inputs[0]))
                total_params += meta[0]
                params += meta[0]
        macs = layer_macs(node)
        if macs is None:
            unknown.append(node_label(node))
        else:
            total_macs += macs
        if node.op_type in WEIGHTED_OPS or params:
            layers.append(
                Layer(
                    name=node_label(node),
                    op=node.op_type,
                    input_shape=concrete_shape(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None,
                    output_shape=concrete_shape(node.outputs[0]) if node.outputs else None,
                    params=params,
                    macs=macs,
                    weight_stats=wstats,
                )
            )
    size = None
    if path is not None and os.path.isfile(path):
        size = file_size(path)  # the model file plus its external data
    return ModelSummary(
        layers=layers,
        params=total_params,
        macs=total_macs,
        nodes=sum(op_counts.values()),
        file_size=size,
        op_counts=dict(sorted(op_counts.items())),
        unknown_macs=unknown,
    )


def human(n: float | int | None, unit: str = "") -> str:
    if n is None:
        return "?"
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suf}{unit}"
    return f"{n:g}{unit}" if isinstance(n, float) else f"{n}{unit}"


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def summary_table(summary: ModelSummary) -> str:
    rows = []
    for layer in summary.layers:
        ws = layer.weight_stats
        rows.append(
            [
                layer.name,
                layer.op,
                "x".join(map(str, layer.input_shape)) if layer.input_shape else "?",
                "x".join(map(str, layer.output_shape)) if layer.output_shape else "?",
                human(layer.params),
                human(layer.macs),
                f"{ws['std']:.3g}" if ws else "",
                f"{ws['sparsity']:.0%}" if ws else "",
            ]
        )
    table = format_table(rows, ["layer", "op", "input", "output", "params", "MACs", "w.std", "w.zero"])
    total = (
        f"total: {human(summary.params)} parameters, {human(summary.macs)} MACs, {summary.nodes} nodes"
        + (f", file {human(summary.file_size, 'B')}" if summary.file_size is not None else "")
    )
    if summary.unknown_macs:
        total += f" ({len(summary.unknown_macs)} layers with unknown shapes not counted)"
    return table + "\n" + total


# Factor nodes of a factorized layer ``L`` are named ``L_f1``, ``L_f2``, …: totals sum them under ``L``.
FACTOR_SUFFIX = re.compile(r"_f\d+$")


def _widened(v: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``v``, also through a Cast of a constant to float."""
    c = const_array(v)
    p = v.producer() if c is None and v is not None else None
    if p is not None and p.op_type == "Cast":
        c = const_array(p.inputs[0])
        return None if c is None else c.astype(np.float32)
    return c


def layer_weight(node: ir.Node) -> np.ndarray | None:
    """A layer's float weight, also when stored quantized (DequantizeLinear), as a codebook (Gather) or FP16 (Cast)."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    v = node.inputs[1]
    w = _widened(v)  # a constant, or FP16 weights behind a Cast
    if w is not None:
        return w.astype(np.float32) if np.issubdtype(w.dtype, np.floating) else None
    p = v.producer()
    if p is None:
        return None
    if p.op_type == "Gather":
        book = const_array(p.inputs[0])
        cast = p.inputs[1].producer()
        idx = const_array(cast.inputs[0] if cast is not None and cast.op_type == "Cast" else p.inputs[1])
        return None if book is None or idx is None else book[idx.astype(np.int64)]
    if p.op_type == "DequantizeLinear":
        q, scale = const_array(p.inputs[0]), _widened(p.inputs[1])  # scales stored as float16 behind a Cast (quantize's narrow_constants)
        zp = const_array(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2] is not None else None
        if q is None or scale is None:
            return None
        zp = np.zeros_like(scale) if zp is None else zp.astype(np.float32)
        if scale.ndim == 1 and q.ndim > 1:
            a = p.attributes.get("axis")
            axis = a.value if a is not None else 1
            shape = [1] * q.ndim
            shape[axis] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        elif scale.ndim == q.ndim and scale.shape != q.shape:  # blocked (int4)
            bs = p.attributes["block_size"].value
            axis = p.attributes["axis"].value
            scale, zp = np.repeat(scale, bs, axis=axis), np.repeat(zp, bs, axis=axis)
        q = q.astype(np.float32) - zp
        return (q * scale).astype(np.float32)
    return None


def layer_precision(node: ir.Node) -> str:
    """How a weighted layer computes, read from the graph: ``int8`` (QDQ on weights and
    activations: an integer kernel), ``int8-weights`` / ``int4-weights`` (weight-only, float
    compute), ``float16-weights``, ``codebook``, ``float32``."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    p = w.producer() if w is not None else None
    x = node.inputs[0] if node.inputs else None
    x_q = x is not None and x.producer() is not None and x.producer().op_type == "DequantizeLinear"
    if p is not None and p.op_type == "DequantizeLinear":
        q = p.inputs[0]
        bits = "int4" if q is not None and q.dtype in (ir.DataType.INT4, ir.DataType.UINT4) else "int8"
        return bits if x_q else f"{bits}-weights"
    if p is not None and p.op_type == "Cast":
        return "float16-weights"
    if p is not None and p.op_type == "Gather":
        return "codebook"
    if w is not None and w.dtype is not None:
        return {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16", ir.DataType.DOUBLE: "float64"}.get(
            w.dtype, w.dtype.name.lower())
    return "float32"


def layer_precisions(model: ir.Model) -> dict[str, str]:
    """:func:`layer_precision` of every Conv / ConvTranspose / Gemm / MatMul, by layer name."""
    return {n.name: layer_precision(n) for n in model.graph
            if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.name}


def _stored_size(v: ir.Value | None) -> int:
    """Elements of one operand of a layer, a constant or rebuilt in the graph (Cast, Gather,
    DequantizeLinear), read from the stored constant's metadata without rebuilding it."""
    if v is None:
        return 0
    meta = _const_meta(v)
    if meta is not None:
        return meta[0] if np.issubdtype(meta[1], np.number) else 0
    p = v.producer()
    if p is None or p.op_type not in ("Cast", "Gather", "DequantizeLinear"):
        return 0
    stored = p.inputs[1] if p.op_type == "Gather" else p.inputs[0]  # Gather: the (cast) indices
    if p.op_type == "Gather" and stored.producer() is not None and stored.producer().op_type == "Cast":
        stored = stored.producer().inputs[0]
    meta = _const_meta(stored)
    return 0 if meta is None else meta[0]


def _layer_params(node: ir.Node) -> int:
    """Parameters a weighted layer holds: its weight and bias, however stored (a QDQ model's
    int8 weight and int32 bias, FP16, a codebook), one per element."""
    return sum(_stored_size(v) for v in node.inputs[1:])


def per_layer_totals(model: ir.Model) -> dict[str, dict[str, Any]]:
    """MACs and parameters per layer, factor nodes summed under their original layer; a weight stored
    int8/int4, FP16 or as a codebook counts one parameter per element."""
    weighted = {n.name: n for n in model.graph if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul")}
    out: dict[str, dict[str, Any]] = {}
    for layer in analyze(model, stats=False).layers:
        if not layer.macs:
            continue
        params = layer.params
        if layer.name in weighted:
            params = _layer_params(weighted[layer.name])
        key = FACTOR_SUFFIX.sub("", layer.name)
        e = out.setdefault(key, {"macs": 0, "params": 0})
        e["macs"] += layer.macs or 0
        e["params"] += params
    return out
