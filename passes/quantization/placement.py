"""Where the ``quantize`` pass puts QuantizeLinear/DequantizeLinear: the placement rules.

What onnxruntime's CPU provider turns into integer kernels:

* Conv, Gemm, MatMul with constant float weights (``WEIGHTED``): the activation
  input is quantized, the weights are stored as int8 (see :mod:`.emission`);
* Add, Mul (two activations, or one and a small constant), Concat, AveragePool,
  GlobalAveragePool (``ACTIVATION_ONLY``): every activation input and the output;
* a following Relu / Clip(0, ·) is absorbed: the output is quantized after it;
* MaxPool, Reshape, Transpose, ... (``SAME_SCALE``) reuse their input's scale, and a
  Mul by a positive scalar α reads its input's codes with scale ``s·α``;
* with ``float_excitation``, squeeze-excite branches stay float.
* an activation-only op that writes a graph output stays float (:func:`writes_graph_output`);
* an activation-only op whose output no integer kernel reads stays float (:func:`integer_readers`).

:func:`plan` returns the nodes to quantize, the weighted ones, the tensors that
need a calibrated range and the tensors that take another's scale; every node it
leaves in float is reported with the reason.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.ir_utils import const_array, exclude_match, node_label
from onnxcc.compiler.passbase import Skipped


WEIGHTED = {"Conv", "Gemm", "MatMul"}


ACTIVATION_ONLY = {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool"}


SAME_SCALE = {"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Slice", "Split", "Gather"}


ABSORBED = {"Relu", "Clip"}


@dataclasses.dataclass
class Plan:
    """What :func:`plan` decided for one graph."""

    nodes: list[ir.Node]
    weighted: list[ir.Node]
    calibrated: list[ir.Value]
    same_scale: list[tuple[ir.Value, ir.Value, float]]  # (output, input, scale factor)


def is_float(v: ir.Value | None) -> bool:
    return v is not None and (v.dtype is None or v.dtype == ir.DataType.FLOAT)


def is_activation(v: ir.Value | None) -> bool:
    return v is not None and is_float(v) and const_array(v) is None


def plan(graph: ir.Graph, cfg, skipped: list[Skipped], kept: Mapping[str, str] | None = None) -> Plan:
    """What to quantize. ``kept``: node name → why a policy keeps it float (the accuracy budget,
    the speed guard), reported as that reason; ``cfg.exclude`` patterns are the user's own."""
    outputs = set(graph.outputs)
    kept = kept or {}
    pattern = lambda n: exclude_match(n, cfg.exclude)  # noqa: E731
    excluded = lambda n: n.name in kept or pattern(n) is not None  # noqa: E731
    nodes, weighted = [], []
    marked: dict[ir.Value, None] = {}
    excitation = excitation_branches(graph) if cfg.float_excitation else set()
    reads = integer_readers(graph, lambda n: not excluded(n) and n not in excitation)

    def mark(v: ir.Value) -> None:
        if v not in outputs:
            marked.setdefault(v, None)

    for node in graph:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or (op not in WEIGHTED and op not in ACTIVATION_ONLY):
            continue
        if node.name in kept:
            skipped.append(Skipped(node_label(node), kept[node.name]))
            continue
        if pattern(node) is not None:
            skipped.append(Skipped(node_label(node), f"matches the exclude pattern '{pattern(node)}' you gave: kept in float"))
            continue
        if node in excitation:
            if op in WEIGHTED:
                skipped.append(Skipped(node_label(node), "squeeze-excite branch (one value per channel): kept in float"))
            continue
        if positive_scalar_mul(node) is not None:
            continue  # a rescale: folded into the dequantization scale below, if its input is quantized
        why = why_not(node)
        if why is None and op in ACTIVATION_ONLY and not reads[node]:
            why = f"{op} feeds only float ops, so it stays float: no integer kernel reads its output, and quantizing it would only round it"
        if why:
            skipped.append(Skipped(node_label(node), why))
            continue
        nodes.append(node)
        if op in WEIGHTED:
            weighted.append(node)
            mark(node.inputs[0])
        else:
            for v in node.inputs:
                if is_activation(v):
                    mark(v)
        out = node.outputs[0]
        uses = out.uses()
        if len(uses) == 1 and uses[0].node.op_type in ABSORBED and absorbable(uses[0].node) and not excluded(uses[0].node):
            out = uses[0].node.outputs[0]
        mark(out)
    # Same-scale ops: Q/DQ around them are dropped by onnxruntime when scales match.
    # Mul by a positive scalar α: its output is the input's codes read with scale s·α (no kernel at all).
    same: list[tuple[ir.Value, ir.Value, float]] = []
    for node in graph:
        alpha = positive_scalar_mul(node)
        if alpha is not None and not excluded(node):
            x = next(v for v in node.inputs if is_activation(v))
            out = node.outputs[0]
            if x in marked and out not in outputs and len(x.uses()) == 1:
                marked.setdefault(out, None)
                same.append((out, x, alpha))
            continue
        if node.op_type in SAME_SCALE and node.inputs and node.inputs[0] in marked:
            for out in node.outputs:
                if out not in outputs and is_float(out) and out.uses() and (node.op_type != "MaxPool" or out is node.outputs[0]):
                    marked.setdefault(out, None)
                    same.append((out, node.inputs[0], 1.0))
    same_outs = {o for o, _, _ in same}
    calibrated = [v for v in marked if v not in same_outs]
    return Plan(nodes, weighted, calibrated, same)


def per_channel(v: ir.Value) -> bool:
    """``v`` holds one value per channel: shape known, rank ≥ 3 and every spatial dim 1."""
    dims = v.shape.dims if v.shape is not None else None
    return dims is not None and len(dims) >= 3 and all(d == 1 for d in dims[2:])


def excitation_branches(graph: ir.Graph) -> set[ir.Node]:
    """Nodes of squeeze-excite branches: from a GlobalAveragePool through per-channel tensors to the Mul(s) that scale a feature map.

    A branch counts only when every path out of the pool stays per-channel (``N×C×1×1``)
    until it multiplies a tensor with spatial extent; a pool that feeds a classifier head
    (Reshape/Flatten to ``N×C``) or anything else is left alone. The pool and the scaling Mul
    are not in the branch: they touch whole feature maps and stay QLinearGlobalAveragePool and
    QLinearMul, so only C values a branch cross between uint8 and float.
    """
    found: set[ir.Node] = set()
    for pool in graph:
        if pool.op_type != "GlobalAveragePool" or pool.domain not in ("", "ai.onnx") or not per_channel(pool.outputs[0]):
            continue
        branch, ends, todo, ok = set(), 0, [pool.outputs[0]], True
        while todo and ok:
            v = todo.pop()
            if v.is_graph_output():
                ok = False
                break
            for use in v.uses():
                n = use.node
                if n in branch:
                    continue
                others = [o for o in n.inputs if o is not None and o is not v and is_activation(o)]
                if n.op_type == "Mul" and others and not any(per_channel(o) for o in others):
                    ends += 1  # scales the feature map
                elif n.domain in ("", "ai.onnx") and n.outputs and all(per_channel(o) for o in n.outputs):
                    branch.add(n)
                    todo.extend(n.outputs)
                else:
                    ok = False
                    break
        if ok and ends:
            found |= branch
    return found


def absorbable(node: ir.Node) -> bool:
    if node.op_type == "Relu":
        return True
    lo = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    return lo is not None and lo.size == 1 and float(lo.reshape(-1)[0]) == 0.0


def why_not(node: ir.Node) -> str | None:
    op = node.op_type
    if op in WEIGHTED:
        if not is_activation(node.inputs[0]):
            return "input is not a float activation"
        w = const_array(node.inputs[1])
        if w is None or w.dtype != np.float32:
            return "weight is not a float constant"
        if op == "Gemm" and node.attributes.get("transA") is not None and node.attributes["transA"].value:
            return "Gemm with transA"
        if op == "MatMul" and w.ndim != 2:
            return "MatMul weight is not 2-D"
        if op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and const_array(node.inputs[2]) is None:
            return "Gemm bias is not constant"
        return None
    ins = [v for v in node.inputs if v is not None]
    if op in ("Add", "Mul"):
        # one operand may be a small float constant: it is stored as a uint8 initializer + DQ
        acts = [v for v in ins if is_activation(v)]
        consts = [v for v in ins if not is_activation(v)]
        if acts and all(small_float_const(v) for v in consts):
            return writes_graph_output(node)
        return "has a non-float or large constant operand (kept in float)"
    if not all(is_activation(v) for v in ins):
        return "has a constant or non-float operand (kept in float)"
    return writes_graph_output(node)


def writes_graph_output(node: ir.Node) -> str | None:
    """Why an activation-only op that writes a graph output stays float: no integer kernel can write a
    float graph output, so quantizing its inputs would only round them (YOLOv8's last Concat rounded
    its class probabilities to steps of 1/255)."""
    if any(o.is_graph_output() for o in node.outputs):
        return f"{node.op_type} writes a graph output, which stays float: no integer kernel, and quantizing its inputs would only round them"
    return None


def integer_readers(graph: ir.Graph, allowed) -> dict[ir.Node, bool]:
    """Node → whether it would read its input as uint8 codes, from the outputs back.

    A weighted layer that can be quantized does. An activation-only op does only if some integer
    kernel reads its output in turn (through same-scale ops, absorbed activations and positive
    rescales, which pass codes on): otherwise its output would be quantized just to be dequantized
    for a float op, a rounding and a kernel for nothing. YOLOv8's box decode (anchor Add/Sub,
    stride Mul, Concat) stays float that way: 24.39 → 24.49 dB on its output, at the same
    latency. ``allowed(node)``: not excluded by the user or a policy.
    """
    reads: dict[ir.Node, bool] = {}
    for node in reversed(list(graph)):
        feeds = any(reads.get(use.node, False) for o in node.outputs for use in o.uses())
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            reads[node] = False
        elif op in SAME_SCALE or (op in ABSORBED and absorbable(node)) or positive_scalar_mul(node) is not None:
            reads[node] = feeds and allowed(node)
        elif op in WEIGHTED:
            reads[node] = allowed(node) and why_not(node) is None
        elif op in ACTIVATION_ONLY:
            reads[node] = feeds and allowed(node) and why_not(node) is None
        else:
            reads[node] = False
    return reads


def positive_scalar_mul(node: ir.Node) -> float | None:
    """α when ``node`` is ``Mul(x, α)`` with a positive scalar constant α and x an activation."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    acts = [v for v in node.inputs if is_activation(v)]
    consts = [const_array(v) for v in node.inputs if v is not None and not is_activation(v)]
    if len(acts) != 1 or len(consts) != 1 or consts[0] is None or consts[0].size != 1 or consts[0].dtype != np.float32:
        return None
    alpha = float(consts[0].reshape(-1)[0])
    return alpha if alpha > 0 and np.isfinite(alpha) else None


def small_float_const(v: ir.Value) -> bool:
    c = const_array(v)
    return c is not None and c.dtype == np.float32 and c.size <= 4096 and bool(np.all(np.isfinite(c)))
