"""What onnxruntime really runs: optimise a model through a session and count what is left.

A QDQ model is only fast when onnxruntime's CPU provider turns each
``DequantizeLinear → op → QuantizeLinear`` unit into an integer kernel
(QLinearConv, QLinearMatMul, QGemm, QLinearAdd, ...). This module saves the
session-optimised graph (``ORT_ENABLE_ALL``, the level ``onnxcc bench`` uses)
and reports the float convolutions and matrix products that remain, and the
Q/DQ nodes onnxruntime could not remove.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from compiler.ir_utils import save_model

FLOAT_HEAVY = {"Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul"}


def optimized_graph(model: ir.Model, level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="onnxcc-fusion-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "opt.onnx"
        save_model(model, src)
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.optimized_model_filepath = str(dst)
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        return onnx.load(str(dst))


def fusion_report(model: ir.Model) -> dict:
    """Op counts after onnxruntime's optimiser, and the heavy ops it left in float."""
    proto = optimized_graph(model)
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}:{n.op_type}" for n in proto.graph.node)
    float_heavy = [n.name or n.output[0] for n in proto.graph.node if n.op_type in FLOAT_HEAVY]
    integer = sum(c for op, c in ops.items() if "QLinear" in op or op.endswith("QGemm") or "Integer" in op)
    return {
        "ops": dict(sorted(ops.items())),
        "integer_kernels": integer,
        "float_heavy": float_heavy,
        "quantize_linear": ops.get("QuantizeLinear", 0),
        "dequantize_linear": ops.get("DequantizeLinear", 0),
    }
