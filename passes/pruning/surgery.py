"""How to prune: slice every member tensor of the removed channel groups.

Given the groups to remove, each tensor's removed indices follow from the
channel graph; per-op handlers then rewrite the constants that carry those
channels:

=====================  =====================================================
Conv                   ``W[keep_out][:, keep_in]`` (group 1), bias; grouped
                       convs lose whole groups: ``W[keep_out]``, ``group -= k``
ConvTranspose          ``W[keep_in][:, keep_out]``, bias
Gemm / MatMul          weight rows (inputs, incl. the H·W blocks behind a
                       Flatten) and columns (outputs), bias ``C``
BatchNorm / InstanceN  scale, bias, mean, var (LayerNorm: scale, bias)
PRelu / Mul / Add ...  per-channel constant operands along their axis
Split / Slice          split sizes; starts and ends
Reshape / Resize       the channel entry of the target shape / sizes
=====================  =====================================================

Removed channels whose activation is not zero would change the next layer's
output; their contribution ``Σ_r W[:, r] · m_r`` (``m_r`` the channel's value,
a constant for dead channels, the calibration mean otherwise) is added to the
consumer's bias *before* its weights are sliced (:func:`compensation`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.ir_utils import add_initializer, const_array, node_label, unique_name
from passes.pruning.dependency import ChannelGraph, _attr


def _keep(n: int, removed: np.ndarray) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[removed] = False
    return np.nonzero(mask)[0]


def _set_input_const(graph: ir.Graph, node: ir.Node, idx: int, arr: np.ndarray) -> None:
    """Give ``node`` input ``idx`` the constant ``arr`` (a private copy when the constant is shared)."""
    v = node.inputs[idx] if idx < len(node.inputs) else None
    dtype = v.const_value.dtype if v is not None and v.const_value is not None else None
    t = ir.tensor(np.ascontiguousarray(arr)) if dtype is None else ir.tensor(np.ascontiguousarray(arr).astype(dtype.numpy()))
    if v is not None and v.const_value is not None and len(v.uses()) == 1 and not v.is_graph_input() and not v.is_graph_output():
        v.const_value = t
        v.shape = ir.Shape(arr.shape)
        return
    new = add_initializer(graph, f"{v.name if v is not None and v.name else node.name + '_param'}_pruned", t)
    if len(node.inputs) <= idx:
        node.resize_inputs(idx + 1)
    node.replace_input_with(idx, new)


def compensation(node: ir.Node, removed: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Bias change (per output channel of ``node``) that stands in for removed input channels with values ``means``."""
    w = const_array(node.inputs[1]).astype(np.float64)
    op = node.op_type
    if op == "Conv":
        return (w[:, removed].reshape(w.shape[0], len(removed), -1).sum(2) * means[None, :]).sum(1)
    if op == "ConvTranspose":
        return (w[removed].reshape(len(removed), w.shape[1], -1).sum(2) * means[:, None]).sum(0)
    if op == "Gemm":
        trans_b = _attr(node, "transB", 0)
        rows = w.T[removed] if trans_b else w[removed]
        return _attr(node, "alpha", 1.0) * (means @ rows)
    return means @ w[removed]  # MatMul


def _add_bias(graph: ir.Graph, node: ir.Node, delta: np.ndarray) -> None:
    """``bias += delta`` on a Conv / ConvTranspose / Gemm (creating the bias), or an Add after a MatMul."""
    op = node.op_type
    m = delta.shape[0]
    if op in ("Conv", "ConvTranspose"):
        b = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(m, np.float32)
        _set_input_const(graph, node, 2, (b.astype(np.float64) + delta).astype(np.float32))
        return
    if op == "Gemm":
        beta = _attr(node, "beta", 1.0)
        c = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.zeros(m, np.float32)
        full = np.broadcast_to(c.astype(np.float64).reshape(-1) if c.size in (1, m) else c, (m,)) * beta + delta
        node.attributes.pop("beta", None)
        _set_input_const(graph, node, 2, full.astype(np.float32))
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

    def rem(v: ir.Value | None) -> np.ndarray:
        return removed.get(v, np.zeros(0, np.int64)) if v is not None else np.zeros(0, np.int64)

    for node, delta in deltas.items():
        _add_bias(graph, node, delta)

    touched: set[ir.Node] = set()
    for node, kind in list(cg.records.items()):
        out, x = node.outputs[0], node.inputs[0]
        r_out, r_in = rem(out), rem(x)
        if kind in ("conv", "conv_transpose", "gemm", "matmul"):
            if not r_out.size and not r_in.size:
                continue
            w = const_array(node.inputs[1])
            if kind == "conv":
                group = _attr(node, "group", 1)
                if group == 1 and r_in.size:
                    w = w[:, _keep(w.shape[1], r_in)]
                if group > 1 and r_out.size:
                    node.attributes["group"] = ir.AttrInt64("group", group - r_out.size // (w.shape[0] // group))
                w = w[_keep(w.shape[0], r_out)]
                b_axis = 0
            elif kind == "conv_transpose":
                w = w[_keep(w.shape[0], r_in)][:, _keep(w.shape[1], r_out)]
                b_axis = 0
            else:
                trans_b = kind == "gemm" and _attr(node, "transB", 0)
                if trans_b:
                    w = w[_keep(w.shape[0], r_out)][:, _keep(w.shape[1], r_in)]
                else:
                    w = w[_keep(w.shape[0], r_in)][:, _keep(w.shape[1], r_out)]
                b_axis = -1
            _set_input_const(graph, node, 1, w)
            if r_out.size and len(node.inputs) > 2 and node.inputs[2] is not None:
                b = const_array(node.inputs[2])
                if b.ndim and b.shape[b_axis] > 1:
                    _set_input_const(graph, node, 2, np.take(b, _keep(b.shape[b_axis], r_out), axis=b_axis))
            touched.add(node)
        elif kind == "channel_params" and r_out.size:
            for i in range(1, len(node.inputs)):
                p = node.inputs[i]
                if p is None:
                    continue
                arr = const_array(p)
                if arr.ndim and arr.shape[0] > 1:
                    _set_input_const(graph, node, i, arr[_keep(arr.shape[0], r_out)])
            touched.add(node)
        elif kind == "split" and r_in.size:
            sizes = []
            for o in node.outputs:
                t = cg.tracked[o]
                sizes.append(t.size - rem(o).size)
            if any(s == 0 for s in sizes):
                raise AssertionError(f"{node_label(node)}: a split output lost every channel")
            node.attributes.pop("num_outputs", None)
            if cg.opset >= 13:
                node.attributes.pop("split", None)
                _set_input_const(graph, node, 1, np.array(sizes, dtype=np.int64))
            else:
                node.attributes["split"] = ir.AttrInt64s("split", sizes)
            touched.add(node)
        elif kind == "slice" and r_in.size:
            t_in, t_out = cg.tracked[x], cg.tracked[out]
            start = t_out.base - t_in.base
            new_start = start - int(np.sum(r_in < start))
            new_end = new_start + t_out.size - r_out.size
            d = len(x.shape)
            axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else np.arange(len(const_array(node.inputs[1])))
            i = [int(a) % d for a in axes].index(t_in.axis)
            starts, ends = const_array(node.inputs[1]).copy(), const_array(node.inputs[2]).copy()
            starts[i], ends[i] = new_start, new_end
            _set_input_const(graph, node, 1, starts)
            _set_input_const(graph, node, 2, ends)
            touched.add(node)
        elif kind == "shuffle_split" and r_in.size:
            shape = const_array(node.inputs[1]).copy()
            a = cg.tracked[x].axis
            shape[a + 1] = (cg.tracked[x].size - r_in.size) // int(shape[a])
            _set_input_const(graph, node, 1, shape)
            touched.add(node)
        elif kind in ("reshape_keep", "reshape_flatten") and (r_out.size or r_in.size):
            shape = const_array(node.inputs[1]).copy()
            a = cg.tracked[out].axis
            if shape[a] > 0:
                shape[a] = cg.tracked[out].size - r_out.size
                _set_input_const(graph, node, 1, shape)
            touched.add(node)
        elif kind == "resize_sizes" and r_out.size:
            sizes = const_array(node.inputs[3]).copy()
            sizes[cg.tracked[out].axis] = cg.tracked[out].size - r_out.size
            _set_input_const(graph, node, 3, sizes)
            touched.add(node)

    for node, idx, pos in cg.broadcast_consts:
        r = rem(node.outputs[0])
        if not r.size:
            continue
        arr = const_array(node.inputs[idx])
        _set_input_const(graph, node, idx, np.take(arr, _keep(arr.shape[pos], r), axis=pos))
        touched.add(node)
    changed.extend(node_label(n) for n in graph if n in touched)
    return changed

