"""Transpose sinking: the NHWC ↔ NCHW Transposes tf2onnx leaves around every conv, cancelled.

tf2onnx (and other converters from channels-last frameworks) write each conv as
``Transpose(NHWC→NCHW) → Conv → Transpose(NCHW→NHWC)`` and keep everything
between two convs (BatchNorm as Mul/Add, activations, Pad, squeeze-excite
pooling) in NHWC. Until those Transposes are gone, the conv's BatchNorm cannot
be folded into it, and INT8 places Q/DQ between ops that never fuse. Here each
Transpose is pushed down through the ops that commute with it, rewriting what
they read (a per-channel constant is transposed, reduction axes and pads are
permuted), until it meets its inverse; the pair then cancels::

    Conv → T(0,2,3,1) → Add(c[C]) → Relu → T(0,3,1,2) → Conv
    Conv → Add(c[1,C,1,1]) → Relu → Conv

Every rewrite is exact (the same values, in another order for the reductions).
The sinking runs on a copy and is kept only when the graph ends with fewer
Transposes. ONNX Runtime's own transpose optimizer does the same at session
start, which is why fp32 latency rarely moves; what changes is what onnxcc's
later rewrites can see.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.ir_utils import (
    add_initializer,
    attr,
    clone_model,
    const_array,
    replace_contents,
    replace_node_output,
    unique_name,
)

_UNARY = {
    "Relu", "Clip", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Neg", "Abs",
    "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Softplus", "Softsign", "Mish", "Gelu", "Identity", "Cast",
    "Floor", "Ceil", "Round", "Sign", "Not",
}
_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean", "Equal", "Less", "Greater", "Where"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceL1", "ReduceSumSquare"}
_MAX_ROUNDS = 64


def _perm(node: ir.Node) -> list[int] | None:
    p = attr(node, "perm")
    if p is None:
        shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
        return list(range(len(shape)))[::-1] if shape is not None else None
    return [int(i) for i in p]


def _transposes(graph: ir.Graph) -> int:
    return sum(1 for n in graph if n.op_type == "Transpose")


def _ones(value: ir.Value, rank: int) -> bool:
    """A tensor that broadcasts the same whatever the layout: every dim 1, rank ≤ ``rank``."""
    shape = value.shape
    return shape is not None and len(shape) <= rank and all(isinstance(d, int) and d == 1 for d in shape.dims)


def _same_transpose(value: ir.Value, perm: list[int]) -> ir.Node | None:
    prod = value.producer() if value is not None else None
    if prod is not None and prod.op_type == "Transpose" and prod.domain in ("", "ai.onnx") and _perm(prod) == perm:
        return prod
    return None


def _operands(node: ir.Node, perm: list[int], data: list[int], graph: ir.Graph) -> list | None:
    """New inputs for ``node`` computed in the untransposed layout, or None when some data operand
    is neither a Transpose with ``perm``, a constant of rank ≤ len(perm), nor all-ones in shape."""
    r = len(perm)
    new = list(node.inputs)
    moved: dict[int, np.ndarray] = {}  # constants to transpose, made only once every operand qualifies
    for i in data:
        v = node.inputs[i]
        if v is None:
            continue
        t = _same_transpose(v, perm)
        if t is not None:
            new[i] = t.inputs[0]
            continue
        c = const_array(v)
        if c is not None and c.ndim <= r:
            if c.size > 1 and any(d != 1 for d in c.shape):
                moved[i] = c.reshape((1,) * (r - c.ndim) + c.shape)
            continue
        if not _ones(v, r):
            return None
    if all(new[i] is node.inputs[i] for i in data):
        return None  # no operand came through a Transpose
    inv = list(np.argsort(perm))
    for i, full in moved.items():
        new[i] = add_initializer(graph, f"{node.inputs[i].name or node.name}_t", np.ascontiguousarray(np.transpose(full, inv)))
    return new


def _rewrite(node: ir.Node, perm: list[int], graph: ir.Graph, opset: int) -> bool:
    """Make ``node`` read its inputs without the Transpose ``perm`` and put that Transpose after it."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or len(node.outputs) != 1:
        return False
    r = len(perm)
    if op in _UNARY:
        new = _operands(node, perm, [0], graph)
        if new is None or any(const_array(v) is None and v is not None for v in node.inputs[1:]):
            return False
    elif op in _BINARY:
        new = _operands(node, perm, list(range(len(node.inputs))), graph)
        if new is None:
            return False
    elif op in _REDUCE:
        axes = attr(node, "axes")
        from_input = axes is None and len(node.inputs) > 1
        if from_input:
            axes = const_array(node.inputs[1])
            if axes is None:
                return False
        if axes is None or len(axes) == 0:
            return False
        new = _operands(node, perm, [0], graph)
        if new is None:
            return False
        reduced = {int(a) % r for a in np.asarray(axes).reshape(-1)}
        moved = sorted(perm[a] for a in reduced)
        if from_input:
            new[1] = add_initializer(graph, f"{node.name}_axes", np.array(moved, np.int64))
        else:
            node.attributes["axes"] = ir.AttrInt64s("axes", moved)
        if attr(node, "keepdims", 1) != 1:  # the kept axes, in the untransposed order
            kept = [perm[j] for j in range(r) if j not in reduced]
            perm = [sorted(kept).index(k) for k in kept]
    elif op == "Pad":
        if len(node.inputs) > 3 and node.inputs[3] is not None:  # the axes input (opset 18)
            return False
        pads = attr(node, "pads") if len(node.inputs) < 2 or node.inputs[1] is None else const_array(node.inputs[1])
        if pads is None or len(pads) != 2 * r:
            return False
        new = _operands(node, perm, [0], graph)
        if new is None:
            return False
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        moved = [0] * (2 * r)
        for j in range(r):
            moved[perm[j]], moved[r + perm[j]] = pads[j], pads[r + j]
        if opset >= 11 and len(node.inputs) > 1 and node.inputs[1] is not None:
            new[1] = add_initializer(graph, f"{node.name}_pads", np.array(moved, np.int64))
        else:
            node.attributes["pads"] = ir.AttrInt64s("pads", moved)
    elif op == "Concat":
        new = _operands(node, perm, list(range(len(node.inputs))), graph)
        if new is None:
            return False
        node.attributes["axis"] = ir.AttrInt64("axis", perm[int(attr(node, "axis")) % r])
    else:
        return False
    for i, v in enumerate(new):
        if v is not node.inputs[i]:
            node.replace_input_with(i, v)
    out = node.outputs[0]
    if perm == list(range(len(perm))):  # a reduction whose kept axes stay in order: nothing after it
        return True
    uses = list(out.uses())
    t = ir.node("Transpose", [out], attributes={"perm": perm}, name=unique_name(graph, f"{node.name}_transpose"))
    graph.insert_after(node, t)
    t.outputs[0].dtype = out.dtype
    was_output = out.is_graph_output()
    for use in uses:
        use.node.replace_input_with(use.idx, t.outputs[0])
    if was_output:
        name = out.name
        out.name = unique_name(graph, f"{name}_untransposed")
        graph.outputs[graph.outputs.index(out)] = t.outputs[0]
        t.outputs[0].name = name
        t.outputs[0].shape = out.shape
    else:
        t.outputs[0].name = unique_name(graph, f"{out.name or node.name}_t")
    out.shape = None  # its layout changed; shape inference fills it in again
    return True


def _fuse_pairs(graph: ir.Graph) -> int:
    """Transpose(Transpose(x)) as one Transpose of x, or as x when the two cancel."""
    count = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.graph is None:
            continue
        inner = node.inputs[0].producer() if node.inputs[0] is not None else None
        if inner is None or inner.op_type != "Transpose":
            continue
        pa, pb = _perm(node), _perm(inner)
        if pa is None or pb is None or len(pa) != len(pb):
            continue
        composed = [pb[i] for i in pa]
        x = inner.inputs[0]
        out = node.outputs[0]
        if composed == list(range(len(composed))):
            if out.is_graph_output() and (x.is_graph_input() or x.is_graph_output() or x.is_initializer()):
                continue
            replace_node_output(graph, node, x)
        else:
            node.replace_input_with(0, x)
            node.attributes["perm"] = ir.AttrInt64s("perm", composed)
        if not inner.outputs[0].uses() and not inner.outputs[0].is_graph_output():
            graph.remove(inner, safe=True)
        count += 1
    return count


def _sink(model: ir.Model, opset: int) -> None:
    graph = model.graph
    for _ in range(_MAX_ROUNDS):
        moved = False
        for t in list(graph):
            if t.op_type != "Transpose" or t.graph is None:
                continue
            perm = _perm(t)
            if perm is None:
                continue
            for use in list(t.outputs[0].uses()):
                if use.node.op_type != "Transpose" and _rewrite(use.node, perm, graph, opset):
                    moved = True
            if not t.outputs[0].uses() and not t.outputs[0].is_graph_output():
                graph.remove(t, safe=True)
        moved |= _fuse_pairs(graph) > 0
        if not moved:
            break


def _candidates(graph: ir.Graph) -> bool:
    pushable = _UNARY | _BINARY | _REDUCE | {"Pad", "Concat"}
    return any(n.op_type == "Transpose" and any(u.node.op_type in pushable for u in n.outputs[0].uses()) for n in graph)


def sink_transposes(model: ir.Model, opset: int) -> int:
    """Push Transposes down through the ops that commute with them and cancel inverse pairs, on a
    copy; keep the copy when it has fewer Transposes. Returns how many were removed."""
    before = _transposes(model.graph)
    if before == 0 or not _candidates(model.graph):
        return 0
    work = clone_model(model)
    _sink(work, opset)
    after = _transposes(work.graph)
    if after >= before:
        return 0
    replace_contents(model, work)
    return before - after
