"""Dynamic quantization of MatMul / Gemm: int8 weights now, activation ranges at run time.

No calibration data: each activation is quantized by ``DynamicQuantizeLinear``
(uint8, its own min/max per run), the weights are int8 symmetric per output
column, 7-bit by default (``reduce_range``: onnxruntime's u8s8 kernels on AVX2
CPUs without VNNI add pairs of products in saturating int16, which 8-bit weights
overflow; measured here on a 3-layer MLP: 38 dB with exact int32 sums, 27 dB on
AVX2, 33 dB with 7-bit weights on both). The subgraph written is the one onnxruntime's
``DynamicQuantizeMatMulFusion`` turns into a single ``DynamicQuantizeMatMul``
kernel::

    x → DynamicQuantizeLinear ─┬─ x_q ─→ MatMulInteger(x_q, W_int8, x_zp, 0) → Cast(float) ─→ Mul → [Add(bias)] → y
                               └─ x_scale → Mul(x_scale, w_scale[N]) ──────────────────────────┘

Gemm is rewritten to the same pattern (``transB`` applied to the stored
weight, ``alpha`` folded into the weight scales, ``beta · C`` as the bias);
a Gemm with ``transA`` or a non-constant operand is skipped with its reason.
Conv layers are left in float: onnxruntime's ``ConvInteger`` has no fused
float-output kernel and is slower than float on x86, so static ``quantize``
is the pass for convolutions. This suits MatMul/Gemm-heavy graphs (classifier
heads, MLPs, attention projections) where calibration data is not at hand.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxcc.compiler.ir_utils import add_initializer, const_array, gemm_as_matmul, node_label
from onnxcc.compiler.passbase import OnnxccPass, PassReport, Skipped
from onnxcc.compiler.metrics import weight_sqnr


class DynamicQuantizePass(OnnxccPass):
    name = "quantize-dynamic"
    exact = False
    summary = "dynamic INT8 for MatMul/Gemm (int8 weights, activations quantized at run time, no calibration)"

    @dataclasses.dataclass(frozen=True)
    class Config:
        exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "node-name patterns kept in float"})
        min_size: int = dataclasses.field(default=1024, metadata={"help": "leave weights with fewer elements in float"})
        reduce_range: bool = dataclasses.field(default=True, metadata={"help": "7-bit weights (codes -63..63): the same results on every x86 CPU. With 8 bits, AVX2 kernels without VNNI saturate their int16 pair sums (u8 x s8 x 2 > 32767) and lose accuracy; turn off only for VNNI/AMX targets"})

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        if model.opset_imports.get("", 0) < 11:
            raise ir.passes.PreconditionError("DynamicQuantizeLinear needs opset >= 11")
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger") for n in model.graph):
            raise ir.passes.PreconditionError("the model is already quantized")

    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        graph = model.graph
        changed, skipped, layers = [], [], {}
        quantized_inputs: dict[ir.Value, tuple[ir.Value, ir.Value, ir.Value]] = {}
        qmax = 63 if cfg.reduce_range else 127
        for node in list(graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Conv":
                skipped.append(Skipped(node_label(node), "Conv stays float under dynamic quantization (use static `quantize`)"))
                continue
            if node.op_type not in ("MatMul", "Gemm"):
                continue
            if any(fnmatch.fnmatchcase(node.name or "", p) for p in cfg.exclude):
                skipped.append(Skipped(node_label(node), "excluded by pattern: kept in float"))
                continue
            if node.op_type == "Gemm":
                w, bias, why = gemm_as_matmul(node)
            else:
                w, bias = const_array(node.inputs[1]), None
                why = "" if w is not None else "weight is not a constant"
            if not why and (w.ndim != 2 or w.dtype != np.float32):
                why = f"weight is {w.dtype} of rank {w.ndim} (needs a float32 matrix)"
            if not why and const_array(node.inputs[0]) is not None:
                why = "both operands are constants"
            if not why and w.size < cfg.min_size:
                why = f"{w.size} weights < min_size {cfg.min_size}"
            if why:
                skipped.append(Skipped(node_label(node), why))
                continue
            m = np.abs(w).max(axis=0)
            w_scale = np.where(m > 0, m / qmax, 1.0).astype(np.float32)
            w_q = np.clip(np.round(w / w_scale), -qmax, qmax).astype(np.int8)
            base = node.name or node.outputs[0].name
            x = node.inputs[0]
            if x not in quantized_inputs:  # one DynamicQuantizeLinear per activation, shared by its consumers
                dql = ir.node("DynamicQuantizeLinear", [x], num_outputs=3, name=f"{base}_dynq")
                for v, suffix in zip(dql.outputs, ("q", "scale", "zero_point")):
                    v.name = f"{x.name}_dyn_{suffix}"
                graph.insert_before(node, dql)
                quantized_inputs[x] = tuple(dql.outputs)
            xq, xs, xzp = quantized_inputs[x]
            wq = add_initializer(graph, f"{base}_W_int8", w_q)
            wzp = add_initializer(graph, f"{base}_W_zero_point", np.zeros(w_q.shape[1], np.int8))
            ws = add_initializer(graph, f"{base}_W_scale", w_scale)
            mm = ir.node("MatMulInteger", [xq, wq, xzp, wzp], name=f"{base}_int")
            cast = ir.node("Cast", [mm.outputs[0]], attributes={"to": ir.DataType.FLOAT}, name=f"{base}_cast")
            scale = ir.node("Mul", [xs, ws], name=f"{base}_scale")
            out = ir.node("Mul", [cast.outputs[0], scale.outputs[0]], name=f"{base}_rescale")
            new = [mm, cast, scale, out]
            if bias is not None:
                b = add_initializer(graph, f"{base}_bias", bias)
                new.append(ir.node("Add", [out.outputs[0], b], name=f"{base}_bias_add"))
            for n_ in new:
                n_.outputs[0].name = f"{n_.name}_out"
            graph.insert_before(node, new)
            final = new[-1].outputs[0]
            if node.outputs[0].dtype is not None:
                final.dtype, final.shape = node.outputs[0].dtype, node.outputs[0].shape
            old = node.outputs[0]
            if old in graph.outputs:  # keep the graph output's name
                name = old.name
                old.name = f"{name}_float"
                final.name = name
            old.replace_all_uses_with(final, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            changed.append(node_label(node))
            layers[node_label(node)] = {"op": node.op_type, "weight_sqnr_db": weight_sqnr(w, w_q.astype(np.float32) * w_scale), "weight_scale_max": float(w_scale.max())}
        common.RemoveUnusedNodesPass()(model)
        stats = {"layers": layers, "quantized_layers": len(changed), "weight_bits": 7 if cfg.reduce_range else 8}
        if changed:
            from onnxcc.passes.quantization.fusion import fusion_report

            fusion = fusion_report(model)
            stats["fusion"] = {"ops": fusion["ops"], "fused": fusion["ops"].get("com.microsoft:DynamicQuantizeMatMul", 0)}
            if "unchecked" in fusion:
                skipped.append(Skipped("fusion check", fusion["unchecked"]))
            elif stats["fusion"]["fused"] < len(changed):
                skipped.append(Skipped("model", f"onnxruntime fused {stats['fusion']['fused']} of {len(changed)} dynamic MatMuls"))
        return PassReport(model, bool(changed), changed=changed, skipped=skipped, stats=stats)
