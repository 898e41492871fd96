"""The ``lower-int8`` pass: exact rewrites that let onnxruntime run a model in integer kernels.

Run by the ``quantize`` pass before it places Q/DQ (verified at the exact
tolerance on its own, like every exact pass), or alone:

* opset < 13 → 13 (``onnx.version_converter``): per-axis QuantizeLinear /
  DequantizeLinear need it (paddle2onnx exports at 11/12);
* HardSigmoid / HardSwish → Add, Clip, Mul (onnxruntime has no integer kernel for them);
* a BatchNormalization left after folding → a depthwise 1×1 Conv (QLinearConv);
* ``ReduceMean`` over the spatial axes → GlobalAveragePool (QLinearGlobalAveragePool).

:func:`flat_limits` finds, in the lowered graph (or in an exporter's own
``x · relu6(x + 3) / 6``), the inputs whose activation is flat outside an
interval: clamping such an input's quantization range there changes no output
and spends the 256 codes where they matter (a BN-folded conv's pre-activations
often reach −10 or lower).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxcc.compiler.ir_utils import (
    add_initializer,
    const_array,
    convert_opset,
    infer_shapes,
    positive_scale,
    replace_contents,
    replace_node_output,
)
from onnxcc.compiler.passbase import OnnxccPass, PassReport
from onnxcc.passes.fold import reduce_mean_to_global_pool

MIN_OPSET = 13  # per-axis QuantizeLinear / DequantizeLinear


class LowerInt8Pass(OnnxccPass):
    name = "lower-int8"
    exact = True
    summary = "exact rewrites INT8 kernels need: opset >= 13, HardSwish/HardSigmoid as Add/Clip/Mul, BatchNorm as depthwise conv, ReduceMean as GlobalAveragePool"

    @dataclasses.dataclass(frozen=True)
    class Config:
        hard_activations: bool = dataclasses.field(default=True, metadata={"help": "HardSigmoid/HardSwish as Add/Clip/Mul so they run in uint8"})

    def call(self, model: ir.Model) -> PassReport:
        stats = lower(model, hard_activations=self.config.hard_activations)
        return PassReport(model, any(stats.values()), stats=stats)


def lower(model: ir.Model, *, hard_activations: bool = True) -> dict[str, int]:
    """The rewrites of :class:`LowerInt8Pass`, in place; counts per kind."""
    stats = {"opset_upgraded": 0, "hard_activations": 0, "batchnorms": 0, "reduce_means": 0}
    if "" not in model.opset_imports:  # no default-domain node (an ai.onnx.ml model): nothing to convert
        model.opset_imports[""] = MIN_OPSET
    elif model.opset_imports[""] < MIN_OPSET:
        replace_contents(model, convert_opset(model, MIN_OPSET))
        stats["opset_upgraded"] = 1
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common.TopologicalSortPass()(model)
    infer_shapes(model)
    if hard_activations:
        stats["hard_activations"] = decompose_hard_activations(model.graph)
    stats["batchnorms"] = batchnorm_to_depthwise(model.graph)
    stats["reduce_means"] = reduce_mean_to_global_pool(model, squeezed=True)  # x.mean((2, 3)) → QLinearGlobalAveragePool
    if stats["hard_activations"] or stats["batchnorms"] or stats["reduce_means"]:
        infer_shapes(model)
    return stats


def batchnorm_to_depthwise(graph: ir.Graph) -> int:
    """A BatchNormalization left after folding (pre-activation: BN → ReLU → Conv) → depthwise 1×1 Conv.

    ``BN(x) = s·x + (β − μ·s)`` with ``s = γ/√(σ²+ε)`` is exactly a depthwise 1×1 convolution with
    one weight per channel, which quantizes per channel without loss (each channel's single weight
    is ±127 codes) and runs as QLinearConv instead of a float island between Q/DQ pairs.
    """
    count = 0
    for node in list(graph):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]) or node.attributes.get_int("training_mode", 0):
            continue  # training mode: normalizes by the batch's statistics (and outputs them), not a fixed affine
        x = node.inputs[0]
        params = [const_array(v) for v in node.inputs[1:5]]
        if x is None or x.shape is None or len(x.shape) != 4 or any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = node.attributes["epsilon"].value if "epsilon" in node.attributes else 1e-5
        s = gamma / np.sqrt(var + eps)
        c = s.shape[0]
        base = node.name or node.outputs[0].name or "bn"
        w = add_initializer(graph, f"{base}_dw_w", s.astype(np.float32).reshape(c, 1, 1, 1))
        b = add_initializer(graph, f"{base}_dw_b", (beta - mean * s).astype(np.float32))
        conv = ir.node("Conv", [x, w, b], attributes={"group": c, "kernel_shape": [1, 1]}, name=base)
        graph.insert_before(node, conv)
        out = node.outputs[0]
        conv.outputs[0].dtype, conv.outputs[0].shape = out.dtype, out.shape
        name = out.name
        out.replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        conv.outputs[0].name = name
        count += 1
    return count


def decompose_hard_activations(graph: ir.Graph) -> int:
    """HardSigmoid / HardSwish → Add, Clip, Mul (exact in float) so the pieces quantize to integer kernels.

    ``HardSigmoid(x) = α · clip(x + β/α, 0, 1/α)`` (α > 0) and ``HardSwish(x) = x · HardSigmoid(x)``
    with α = 1/6, β = 1/2. onnxruntime has no integer HardSigmoid/HardSwish; as QLinearAdd, a
    Clip absorbed by the quantizer, and QLinearMul, MobileNetV3-style networks stay in uint8.

    The pieces keep what the activation knew: :func:`flat_limits` reads from them where the
    output stops depending on ``x``, so the quantizer can spend its codes there.
    """
    count = 0
    for node in list(graph):
        if node.op_type not in ("HardSigmoid", "HardSwish") or node.domain not in ("", "ai.onnx"):
            continue
        x = node.inputs[0]
        alpha = node.attributes["alpha"].value if node.op_type == "HardSigmoid" and "alpha" in node.attributes else (0.2 if node.op_type == "HardSigmoid" else 1 / 6)
        beta = node.attributes["beta"].value if node.op_type == "HardSigmoid" and "beta" in node.attributes else 0.5
        if alpha <= 0 or x is None:
            continue
        base = node.name or node.outputs[0].name or "hard"
        c_shift = add_initializer(graph, f"{base}_shift", np.array(beta / alpha, np.float32))
        c_lo = add_initializer(graph, f"{base}_lo", np.array(0.0, np.float32))
        c_hi = add_initializer(graph, f"{base}_hi", np.array(1.0 / alpha, np.float32))
        c_alpha = add_initializer(graph, f"{base}_alpha", np.array(alpha, np.float32))
        add = ir.node("Add", [x, c_shift], name=f"{base}_add")
        clip = ir.node("Clip", [add.outputs[0], c_lo, c_hi], name=f"{base}_clip")
        mul = ir.node("Mul", [clip.outputs[0], c_alpha], name=f"{base}_scale")
        new = [add, clip, mul]
        if node.op_type == "HardSwish":
            new.append(ir.node("Mul", [x, mul.outputs[0]], name=f"{base}_mul"))
        for i, n in enumerate(new):
            n.outputs[0].name = f"{base}_dec{i}"
            n.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(node, new)
        replace_node_output(graph, node, new[-1].outputs[0])
        count += 1
    return count


def flat_limits(graph: ir.Graph) -> dict[ir.Value, tuple[float, float]]:
    """Inputs ``x`` of ``clip(x + c, 0, h) [· α]`` (HardSigmoid) or ``x · clip(x + c, 0, h) [· α]``
    (HardSwish) read by nothing else, and the interval outside which the output does not depend
    on them: HardSigmoid is flat outside ``[−c, h − c]``, HardSwish is 0 below ``−c`` (x times an
    exact zero). α is a positive scalar, as a Mul or a Div."""
    found = {}
    for add in graph:
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
            continue
        consts = [const_array(v) for v in add.inputs]
        k = next((i for i, c in enumerate(consts) if c is not None and c.size == 1), None)
        x = add.inputs[1 - k] if k is not None else None
        if x is None or const_array(x) is not None or x.is_graph_output():
            continue
        shift = float(consts[k].reshape(-1)[0])
        uses = add.outputs[0].uses()
        clip = uses[0].node if len(uses) == 1 else None
        if clip is None or clip.op_type != "Clip" or len(clip.inputs) != 3 or uses[0].idx != 0:
            continue
        lo_c, hi_c = const_array(clip.inputs[1]), const_array(clip.inputs[2])
        if lo_c is None or hi_c is None or lo_c.size != 1 or hi_c.size != 1 or float(lo_c.reshape(-1)[0]) != 0.0:
            continue
        end = clip.outputs[0]
        while len(end.uses()) == 1 and positive_scale(end.uses()[0].node, end) is not None:
            end = end.uses()[0].node.outputs[0]
        x_users = {u.node for u in x.uses()}
        if x_users == {add}:
            found[x] = (-shift, float(hi_c.reshape(-1)[0]) - shift)
        elif len(x_users) == 2 and len(end.uses()) == 1:
            mul = end.uses()[0].node
            if mul.op_type == "Mul" and mul in x_users and set(mul.inputs) == {x, end}:
                found[x] = (-shift, np.inf)
    return found
