"""What onnxruntime really runs: optimise a model through a session and count what is left.

A QDQ model is only fast when onnxruntime's CPU provider turns each
``DequantizeLinear → op → QuantizeLinear`` unit into an integer kernel
(QLinearConv, QLinearMatMul, QGemm, QLinearAdd, ...). This module saves the
session-optimised graph (``ORT_ENABLE_ALL``, the level ``onnxcc bench`` uses)
and reports the float convolutions and matrix products that remain, and the
Q/DQ nodes onnxruntime could not remove.
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

from onnxcc.compiler.errors import BadInputError
from onnxcc.compiler.sessions import optimized_graph

FLOAT_HEAVY = {"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "LSTM"}


def fusion_report(model: ir.Model) -> dict:
    """Op counts after onnxruntime's optimiser, and the heavy ops it left in float.

    A model onnxruntime refuses at full optimization (but runs unoptimized, as verification
    does) gets an empty report with ``unchecked`` giving onnxruntime's reason: the check is
    skipped, the pass is not failed for it."""
    try:
        proto = optimized_graph(model)
    except BadInputError as e:
        return {"ops": {}, "integer_kernels": 0, "float_heavy": [], "quantize_linear": 0, "dequantize_linear": 0,
                "unchecked": f"fusion not checked: {e}"}
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in proto.graph.node)
    nodes = {n.name: n for n in model.graph if n.name}
    by_output = {o.name: n for n in nodes.values() for o in n.outputs}
    float_heavy = [_source_name(nodes, by_output, n) for n in proto.graph.node if n.op_type in FLOAT_HEAVY]
    integer = sum(c for op, c in ops.items() if "QLinear" in op or op.endswith(("QGemm", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM")) or "Integer" in op)
    return {
        "ops": dict(sorted(ops.items())),
        "integer_kernels": integer,
        "float_heavy": float_heavy,
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
    }


def _source_name(nodes: dict[str, ir.Node], by_output: dict[str, ir.Node], node) -> str:
    """The name of the model's heavy node (``nodes`` by name, ``by_output`` by output name) that
    onnxruntime's optimized ``node`` came from: its NCHWc transformer renames a float conv after
    its output (``<output>_nchwc``), and a conv fused with the activation after it (FusedConv) may
    carry the activation's name."""
    name = node.name or node.output[0]
    src = nodes.get(name)
    for candidate in (name.removesuffix("_nchwc"), *node.output):
        if src is None:
            src = by_output.get(candidate)
    for _ in range(2):  # Conv → Relu / Clip / activation: back to the conv
        if src is None or src.op_type in FLOAT_HEAVY or not src.inputs or src.inputs[0] is None:
            break
        src = src.inputs[0].producer()
    return src.name if src is not None and src.op_type in FLOAT_HEAVY else name
