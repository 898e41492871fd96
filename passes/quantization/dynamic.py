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

An ``LSTM`` with constant weights becomes onnxruntime's ``DynamicQuantizeLSTM``
(:func:`quantize_lstm`): int8 weights per gate row, its input and hidden state
quantized at each step by the kernel. Static ``quantize`` uses it as well, as
there is no QDQ form of a recurrent layer that onnxruntime runs in integers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxcc.compiler.ir_utils import add_initializer, const_array, exclude_match, gemm_as_matmul, node_label
from onnxcc.compiler.passbase import OnnxccPass, PassReport, Skipped
from onnxcc.compiler.metrics import weight_sqnr


MS_DOMAIN = "com.microsoft"


def quantize_lstm(graph: ir.Graph, node: ir.Node, qmax: int) -> dict | str:
    """Replace ``node`` (an ONNX LSTM) by onnxruntime's ``DynamicQuantizeLSTM``; the layer's report
    entry, or why it stays float.

    The contrib op takes the weights transposed (``W`` as [directions, input, 4·hidden], ``R`` as
    [directions, hidden, 4·hidden]) with one int8 scale per direction and gate row; the other inputs
    (bias, sequence lengths, initial states, peepholes) and the attributes are the LSTM's own. The
    caller adds the ``com.microsoft`` opset."""
    if node.attributes.get_int("layout", 0) != 0:
        return "LSTM with layout=1 (DynamicQuantizeLSTM reads sequence-first input only)"
    w, r = const_array(node.inputs[1]), const_array(node.inputs[2])
    if w is None or r is None:
        return "LSTM weights are not constants"
    if w.ndim != 3 or r.ndim != 3 or w.dtype != np.float32 or r.dtype != np.float32:
        return f"LSTM weights are {w.dtype} of rank {w.ndim} (needs float32 [directions, 4*hidden, input])"
    base = node.name or node.outputs[0].name
    entry = {"op": "LSTM", "kernel": "DynamicQuantizeLSTM"}
    quantized = []
    for key, a in (("W", w), ("R", r)):
        m = np.abs(a).max(axis=2)
        scale = np.where(m > 0, m / qmax, 1.0).astype(np.float32)  # [directions, 4*hidden]
        q = np.clip(np.round(a / scale[:, :, None]), -qmax, qmax).astype(np.int8)
        entry[f"{key}_sqnr_db"] = weight_sqnr(a, q.astype(np.float32) * scale[:, :, None])
        quantized += [add_initializer(graph, f"{base}_{key}_int8", np.ascontiguousarray(q.transpose(0, 2, 1))),
                      add_initializer(graph, f"{base}_{key}_scale", scale),
                      add_initializer(graph, f"{base}_{key}_zero_point", np.zeros(scale.shape, np.int8))]
    wq, ws, wz, rq, rs, rz = quantized
    rest = list(node.inputs[3:8]) + [None] * (8 - len(node.inputs))
    attrs = {k: a for k, a in node.attributes.items() if k != "layout"}
    new = ir.node("DynamicQuantizeLSTM", [node.inputs[0], wq, rq, *rest[:5], ws, wz, rs, rz], attributes=attrs,
                  domain=MS_DOMAIN, num_outputs=len(node.outputs), name=f"{base}_int8")
    graph.insert_before(node, new)
    for old, out in zip(node.outputs, new.outputs):
        name, used = old.name, bool(old.uses()) or old.is_graph_output()
        if old.type is not None:
            out.type, out.shape = old.type, old.shape
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        if used and name:
            old.name = f"{name}_float"
            out.name = name
    weights = [node.inputs[1], node.inputs[2]]
    graph.remove(node, safe=True)
    for v in weights:  # the float weights, unless something else reads them
        if v.is_initializer() and not v.uses() and not v.is_graph_input() and v.name in graph.initializers:
            del graph.initializers[v.name]
    return entry


def quantize_lstms(model: ir.Model, qmax: int, skip: "Callable[[ir.Node], str | None]") -> tuple[dict, list[Skipped]]:
    """Every LSTM of the main graph as ``DynamicQuantizeLSTM`` unless ``skip(node)`` gives a reason;
    the layers' report entries and the skipped ones."""
    layers, skipped = {}, []
    for node in [n for n in model.graph if n.op_type == "LSTM" and n.domain in ("", "ai.onnx")]:
        label = node_label(node)
        why = skip(node)
        entry = quantize_lstm(model.graph, node, qmax) if why is None else why
        if isinstance(entry, str):
            skipped.append(Skipped(label, entry))
        else:
            layers[label] = entry
    if layers:
        model.opset_imports.setdefault(MS_DOMAIN, 1)
    return layers, skipped


class DynamicQuantizePass(OnnxccPass):
    name = "quantize-dynamic"
    exact = False
    summary = "dynamic INT8 for MatMul/Gemm/LSTM (int8 weights, activations quantized at run time, no calibration)"

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
            if exclude_match(node, cfg.exclude):
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

        def excluded(n: ir.Node) -> str | None:
            return "excluded by pattern: kept in float" if exclude_match(n, cfg.exclude) else None

        lstm_layers, lstm_skipped = quantize_lstms(model, qmax, excluded)
        layers.update(lstm_layers)
        skipped += lstm_skipped
        common.RemoveUnusedNodesPass()(model)
        stats = {"layers": layers, "quantized_layers": len(changed) + len(lstm_layers), "weight_bits": 7 if cfg.reduce_range else 8}
        if changed or lstm_layers:
            from onnxcc.passes.quantization.fusion import fusion_report

            fusion = fusion_report(model)
            stats["fusion"] = {"ops": fusion["ops"], "fused": fusion["ops"].get("com.microsoft:DynamicQuantizeMatMul", 0)}
            if "unchecked" in fusion:
                skipped.append(Skipped("fusion check", fusion["unchecked"]))
            elif stats["fusion"]["fused"] < len(changed):
                skipped.append(Skipped("model", f"onnxruntime fused {stats['fusion']['fused']} of {len(changed)} dynamic MatMuls"))
        changed += list(lstm_layers)
        return PassReport(model, bool(changed), changed=changed, skipped=skipped, stats=stats)
