"""How to prune: slice every member tensor of the removed channel groups.

Given the groups to remove, each tensor's removed indices follow from the
channel graph; the cut each node's rule recorded (:mod:`onnxcc.passes.pruning.rules`)
then rewrites the constants that carry those channels, and per-channel constant
operands of elementwise ops are sliced here (the table of what each op loses is
in the rules module).

Removed channels whose activation is not zero would change the next layer's
output; their contribution ``Σ_r W[:, r] · m_r`` (``m_r`` the channel's value,
a constant for dead channels, the calibration mean otherwise) is added to the
consumer's bias *before* its weights are sliced (:func:`add_bias`, with the
contribution from :func:`onnxcc.compiler.weights.input_contribution`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.ir_utils import add_initializer, attr, const_array, node_label, set_input_const, unique_name
from onnxcc.passes.pruning.dependency import ChannelGraph
from onnxcc.passes.pruning.rules import Cut, keep


def add_bias(graph: ir.Graph, node: ir.Node, delta: np.ndarray) -> None:
    """``bias += delta`` on a Conv / ConvTranspose / Gemm (creating the bias), or an Add after a MatMul."""
    op = node.op_type
    m = delta.shape[0]
    if op in ("Conv", "ConvTranspose"):
        b = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(m, np.float32)
        set_input_const(graph, node, 2, (b.astype(np.float64) + delta).astype(np.float32))
        return
    if op == "Gemm":
        beta = attr(node, "beta", 1.0)
        c = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(m, np.float32)
        full = np.broadcast_to(c.astype(np.float64).reshape(-1) if c.size in (1, m) else c, (m,)) * beta + delta
        node.attributes.pop("beta", None)
        set_input_const(graph, node, 2, full.astype(np.float32))
        return
    # MatMul: an explicit Add after it.
    out = node.outputs[0]
    c = add_initializer(graph, f"{out.name}_bias", delta.astype(np.float32))
    add = ir.node("Add", [out, c], name=unique_name(graph, f"{node.name or 'matmul'}_bias"))
    graph.insert_after(node, add)
    new_out = add.outputs[0]
    new_out.type = out.type
    for use in list(out.uses()):
        if use.node is not add:
            use.node.replace_input_with(use.idx, new_out)
    outs = list(graph.outputs)
    if out in outs:
        name = out.name
        out.name = unique_name(graph, f"{name}_pre_bias")
        new_out.name = name
        graph.outputs[outs.index(out)] = new_out
    else:
        new_out.name = unique_name(graph, f"{out.name}_biased")


def apply(cg: ChannelGraph, removed_groups: set[int], deltas: dict[ir.Node, np.ndarray]) -> list[str]:
    """Remove ``removed_groups`` from the model in place; ``deltas`` are bias compensations per consumer."""
    graph = cg.graph
    removed: dict[ir.Value, np.ndarray] = {}
    for v in cg.tracked:
        r = cg.removed_indices(v, removed_groups)
        if r.size:
            removed[v] = r
    changed: list[str] = []

    for node, delta in deltas.items():
        add_bias(graph, node, delta)

    touched: set[ir.Node] = set()
    cut = Cut(graph, cg, removed)
    for node, rule_cut in list(cg.records.items()):
        if rule_cut(cut, node):
            touched.add(node)

    for node, idx, pos in cg.broadcast_consts:
        r = cut.rem(node.outputs[0])
        if not r.size:
            continue
        arr = const_array(node.inputs[idx])
        set_input_const(graph, node, idx, np.take(arr, keep(arr.shape[pos], r), axis=pos))
        touched.add(node)
    changed.extend(node_label(n) for n in graph if n in touched)
    return changed

