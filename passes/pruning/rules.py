"""Pruning rules: one per op family, each holding its channel analysis and its surgery.

An :class:`OpRule` says, for the ops it covers,

* ``analyse(cg, node, tin)``: what the node does to channels, given the tracked
  inputs ``tin`` (``None`` where an input carries no channels): make new
  elements (a source), alias its input's (pass-through, maybe on another axis),
  join elements (couplings), map index ranges (Concat, Split, Slice, Flatten),
  record itself as a consumer, or block them with the reason;
* the surgery a node needs when channels are removed, recorded by the analysis
  as ``cg.records[node] = cut_...`` (a Reshape records the keep-the-channel-
  entry cut or, in a channel shuffle, the group cut): ``cut(c, node)`` rewrites
  the node's constants for the removed indices ``c.rem(value)`` and returns
  whether it changed the node.

:data:`RULES` is the one table; an op it does not list blocks the channels it
touches ("which the channel analysis does not handle"). The union-find itself
is :mod:`onnxcc.passes.pruning.channels`; the walk is
:class:`onnxcc.passes.pruning.dependency.ChannelGraph`; the cut loop is
:func:`onnxcc.passes.pruning.surgery.apply`.

=====================  =====================================================
Conv                   ``W[keep_out][:, keep_in]`` (group 1), bias; grouped
                       convs lose the same positions in every group
                       (``W[keep_out][:, keep_pos]``) or, depthwise or with
                       ``grouped="whole"``, whole groups (``group -= k``)
ConvTranspose          ``W[keep_in][:, keep_out]``, bias
Gemm / MatMul          weight rows (inputs, incl. the H·W blocks behind a
                       Flatten) and columns (outputs), bias ``C``
BatchNorm / InstanceN  scale, bias, mean, var (LayerNorm: scale, bias)
PRelu / Mul / Add ...  per-channel constant operands along their axis
Split / Slice          split sizes; starts and ends
Reshape / Resize       the channel entry of the target shape / sizes
=====================  =====================================================
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.ir_utils import attr, const_array, node_label, set_input_const
from onnxcc.passes.fold import BN_SCALE_META
from onnxcc.passes.pruning.channels import Tracked

if TYPE_CHECKING:
    from onnxcc.passes.pruning.dependency import ChannelGraph

# Ops whose single (first) output has the same channels as their first input.
UNARY_PASS_THROUGH = {
    "Relu", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Celu", "Tanh",
    "Softplus", "Softsign", "Gelu", "Erf", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
    "Floor", "Ceil", "Round", "Sign", "Identity", "Cast", "Mish", "Swish", "ThresholdedRelu",
    "Sin", "Cos", "Shrink", "IsNaN", "IsInf",
}
POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow"}
REDUCE = {
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
}
# Reduce ops whose axes moved from an attribute to an input at this opset.
_REDUCE_AXES_INPUT_SINCE = {"ReduceSum": 13}


def dims_of(value: ir.Value | None) -> list | None:
    """Dims as ints (static) or strings (symbolic); None when the rank is unknown."""
    if value is None or value.shape is None:
        return None
    return [d if isinstance(d, int) else str(d) for d in value.shape.dims]


def _private_const(value: ir.Value | None) -> np.ndarray | None:
    """A constant used by exactly one node input (safe to rewrite in place)."""
    arr = const_array(value)
    if arr is None or len(value.uses()) != 1:
        return None
    return arr


def _static_prod(dims) -> int | None:
    return int(np.prod(dims)) if all(isinstance(d, int) and d >= 0 for d in dims) else None


def _reshape_target(node: ir.Node, s: list) -> list | None:
    """Constant Reshape target with ``0`` entries resolved to the input dims (unless ``allowzero``)."""
    t = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if t is None:
        return None
    allowzero = attr(node, "allowzero", 0)
    return [s[i] if (v == 0 and not allowzero and i < len(s)) else int(v) for i, v in enumerate(np.asarray(t).ravel())]


def _leading_match(t: list, s: list, a: int) -> bool:
    """Do target dims ``t[:a]`` reproduce input dims ``s[:a]``? A single ``-1`` may stand for a symbolic batch."""
    if len(t) <= a or len(s) <= a:
        return False
    for i in range(a):
        if t[i] == s[i]:
            continue
        if t[i] == -1 and isinstance(s[i], str):
            others_t = [d for j, d in enumerate(t) if j != i]
            others_s = [d for j, d in enumerate(s) if j != i]
            if _static_prod(others_t) is not None and _static_prod(others_t) == _static_prod(others_s):
                continue
        return False
    return True


# --------------------------------------------------------------------------- analysis
def analyse_conv(cg: ChannelGraph, node: ir.Node, tin) -> None:
    w_val = node.inputs[1]
    w = _private_const(w_val)
    out = node.outputs[0]
    group = attr(node, "group", 1)
    if w is None:
        why = "weight is shared with another node" if const_array(w_val) is not None else "weight is not a constant"
        cg.unknown(node, tin[:1], why)
        return  # output untracked: anything it meets is blocked by the broadcast checks
    cout = w.shape[0]
    t_out = cg.new(out, 1, cout)
    cg.touch(t_out, node)
    if len(node.inputs) > 2 and node.inputs[2] is not None and _private_const(node.inputs[2]) is None:
        cg.block(t_out, f"{node_label(node)}: bias is shared or not a constant")
    x = tin[0]
    cg.records[node] = cut_weighted
    cg.sources.append(node)
    if x is not None and (x.axis != 1 or x.size != w.shape[1] * group):
        cg.block(x, f"{node_label(node)}: input channel axis does not match the weight")
        cg.block(t_out, f"{node_label(node)}: input channel axis does not match the weight")
        return
    if group == 1:
        if x is not None:
            cg.consumers.append((node, 0))
        return
    cin_g, cout_g = w.shape[1], cout // group
    if cg.grouped == "within" and cin_g > 1 and cout_g > 1:
        # position k of every group goes together, on each side: the groups stay, each narrower
        cg.records[node] = cut_grouped_within
        for k in range(cout_g):
            cg.union_all([t_out.base + j * cout_g + k for j in range(group)])
        if x is not None:
            for k in range(cin_g):
                cg.union_all([x.base + j * cin_g + k for j in range(group)])
            cg.consumers.append((node, 0))
        return
    if x is None:
        cg.block(t_out, f"{node_label(node)}: grouped conv whose input channels cannot be pruned")
        return
    for j in range(group):
        cg.union_all(
            list(range(x.base + j * cin_g, x.base + (j + 1) * cin_g))
            + list(range(t_out.base + j * cout_g, t_out.base + (j + 1) * cout_g))
        )


def _weighted_source(cg: ChannelGraph, node: ir.Node, x: Tracked | None, matches: bool, why: str) -> None:
    """A ConvTranspose / Gemm / MatMul source: record its cut, and its input ``x`` as a consumer
    when the channels line up with the weight's input axis (``matches``), else block them."""
    cg.records[node] = cut_weighted
    cg.sources.append(node)
    if x is not None:
        if matches:
            cg.consumers.append((node, 0))
        else:
            cg.block(x, f"{node_label(node)}: {why}")


def analyse_conv_transpose(cg: ChannelGraph, node: ir.Node, tin) -> None:
    w = _private_const(node.inputs[1])
    if w is None or attr(node, "group", 1) != 1:
        cg.unknown(node, tin[:1], "grouped ConvTranspose or non-private weight")
        return
    t_out = cg.new(node.outputs[0], 1, w.shape[1])
    cg.touch(t_out, node)
    if len(node.inputs) > 2 and node.inputs[2] is not None and _private_const(node.inputs[2]) is None:
        cg.block(t_out, f"{node_label(node)}: bias is shared or not a constant")
    x = tin[0]
    _weighted_source(cg, node, x, x is not None and x.axis == 1 and x.size == w.shape[0], "input channel axis does not match the weight")


def analyse_gemm(cg: ChannelGraph, node: ir.Node, tin) -> None:
    b = _private_const(node.inputs[1])
    a = tin[0]
    if any(tin[1:]) or b is None or b.ndim != 2 or attr(node, "transA", 0):
        cg.unknown(node, tin, "transposed input or non-private weight")
        return
    trans_b = attr(node, "transB", 0)
    m = b.shape[0] if trans_b else b.shape[1]
    k = b.shape[1] if trans_b else b.shape[0]
    c_val = node.inputs[2] if len(node.inputs) > 2 else None
    t_out = cg.new(node.outputs[0], 1, m)
    cg.touch(t_out, node)
    if c_val is not None:
        c = const_array(c_val)
        if c is None:
            cg.block(t_out, f"{node_label(node)}: bias is not a constant")
        elif (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2 or (c.ndim and c.shape[-1] not in (1, m)):
            cg.block(t_out, f"{node_label(node)}: bias is not a per-output vector")
    _weighted_source(cg, node, a, a is not None and a.axis == 1 and a.size == k, "input features do not match the weight")


def analyse_matmul(cg: ChannelGraph, node: ir.Node, tin) -> None:
    b = _private_const(node.inputs[1])
    a = tin[0]
    if tin[1] is not None or b is None or b.ndim != 2:
        cg.unknown(node, tin, "MatMul without a private 2-D constant weight")
        return
    out_dims = dims_of(node.outputs[0])
    if out_dims is None:
        cg.unknown(node, tin, "output rank unknown")
        return
    t_out = cg.new(node.outputs[0], len(out_dims) - 1, b.shape[1])
    cg.touch(t_out, node)
    a_dims = dims_of(node.inputs[0])
    contracted = a is not None and a_dims is not None and a.axis == len(a_dims) - 1 and a.size == b.shape[0]
    _weighted_source(cg, node, a, contracted, "channels are not the contracted (last) axis")


def analyse_unary(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = tin[0]
    if x is None:
        if any(t is not None for t in tin[1:]):
            cg.unknown(node, tin, "channels in a parameter input")
        return
    if node.op_type == "Clip" and any(
        v is not None and (const_array(v) is None or const_array(v).size != 1) for v in node.inputs[1:]
    ):
        cg.unknown(node, tin, "Clip bounds are not scalar constants")
        return
    if node.op_type in POOLS and x.axis != 1:
        cg.unknown(node, tin, "pooling over the channel axis")
        return
    if node.op_type in ("Dropout", "MaxPool") and len(node.outputs) > 1 and node.outputs[1].uses():
        cg.unknown(node, tin, "second output (mask/indices) is used")
        return
    if any(t is not None for t in tin[1:]):
        cg.unknown(node, tin, "channels in a parameter input")
        return
    cg.alias(node.outputs[0], x)


def analyse_prelu(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = tin[0]
    if x is None:
        return
    if tin[1] is not None:
        cg.unknown(node, tin, "slope is a channel tensor")
        return
    if not cg.broadcast_operand(node, 1, x, dims_of(node.inputs[0])):
        return
    cg.alias(node.outputs[0], x)


def analyse_elementwise(cg: ChannelGraph, node: ir.Node, tin) -> None:
    tracked = [t for t in tin if t is not None]
    if not tracked:
        return
    out_dims = dims_of(node.outputs[0])
    in_dims = [dims_of(v) for v in node.inputs]
    if out_dims is None or any(d is None for d in in_dims):
        cg.unknown(node, tin, "operand ranks unknown")
        return
    R = len(out_dims)
    axes = {t.axis + R - len(in_dims[i]) for i, t in enumerate(tin) if t is not None}
    sizes = {t.size for t in tracked}
    if len(axes) != 1 or len(sizes) != 1:
        cg.unknown(node, tin, "channel tensors meet on different axes or sizes")
        return
    out_axis = axes.pop()
    for i, t in enumerate(tin):
        if t is not None and in_dims[i][t.axis] != t.size:
            cg.unknown(node, tin, "channel extent does not match the shape")
            return
    first = tracked[0]
    for t in tracked[1:]:
        for k in range(first.size):
            cg.union(first.base + k, t.base + k)
    for i, t in enumerate(tin):
        if t is None and node.inputs[i] is not None:
            cg.broadcast_operand(node, i, first, out_dims)  # blocks the channels when it cannot be sliced
    cg.alias(node.outputs[0], first, out_axis)


def analyse_batchnorm(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = tin[0]
    if x is None:
        if any(tin[1:]):
            cg.unknown(node, tin, "channels in a parameter input")
        return
    params = node.inputs[1:5] if node.op_type == "BatchNormalization" else node.inputs[1:3]
    if x.axis != 1 or any(tin[1:]) or any(_private_const(p) is None for p in params):
        cg.unknown(node, tin, "parameters are shared or not constants, or channels not on axis 1")
        return
    if node.op_type == "BatchNormalization" and any(o.uses() for o in node.outputs[1:]):
        cg.unknown(node, tin, "training-mode outputs are used")
        return
    cg.records[node] = cut_channel_params
    cg.alias(node.outputs[0], x)


def analyse_layernorm(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = tin[0]
    d = dims_of(node.inputs[0])
    if x is None or d is None:
        if x is not None:
            cg.unknown(node, tin, "input rank unknown")
        return
    axis = attr(node, "axis", -1) % len(d)
    normed = set(range(axis, len(d)))
    if x.axis not in normed:
        cg.alias(node.outputs[0], x)
        return
    if normed != {x.axis} or any(o.uses() for o in node.outputs[1:]):
        cg.unknown(node, tin, "LayerNormalization over the channel axis and others")
        return
    if any(_private_const(p) is None for p in node.inputs[1:3] if p is not None):
        cg.unknown(node, tin, "scale/bias shared or not constants")
        return
    cg.records[node] = cut_channel_params
    out = cg.alias(node.outputs[0], x)
    for e in out.elements():
        cg.stat_reason.setdefault(e, f"{node_label(node)}: LayerNormalization statistics change with the channel count")


def analyse_softmax(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = cg.data_input(node, tin)
    d = dims_of(node.inputs[0])
    if x is None:
        return
    default = -1 if cg.opset >= 13 else 1
    if d is None or attr(node, "axis", default) % len(d) == x.axis or (cg.opset < 13 and x.axis >= attr(node, "axis", 1) % len(d)):
        cg.unknown(node, tin, f"{node.op_type} over the channel axis")
        return
    cg.alias(node.outputs[0], x)


def analyse_transpose(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = cg.data_input(node, tin)
    perm = attr(node, "perm")
    if x is None:
        return
    if perm is None:
        d = dims_of(node.inputs[0])
        if d is None:
            cg.unknown(node, tin, "rank unknown")
            return
        perm = list(reversed(range(len(d))))
    cg.alias(node.outputs[0], x, list(perm).index(x.axis))


def analyse_squeeze(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = cg.data_input(node, tin)
    d = dims_of(node.inputs[0])
    if x is None:
        return
    axes = cg.axes(node, 1)
    if axes is None or d is None:
        cg.unknown(node, tin, "axes or rank unknown")
        return
    if node.op_type == "Squeeze":
        axes = [a % len(d) for a in axes] if axes else [i for i, v in enumerate(d) if v == 1]
        if x.axis in axes:
            cg.unknown(node, tin, "squeezes the channel axis")
            return
        cg.alias(node.outputs[0], x, x.axis - sum(a < x.axis for a in axes))
    else:
        r = len(d) + len(axes)
        axes = sorted(a % r for a in axes)
        kept = [i for i in range(r) if i not in axes]
        cg.alias(node.outputs[0], x, kept[x.axis])


def analyse_reduce(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = cg.data_input(node, tin)
    d = dims_of(node.inputs[0])
    if x is None:
        return
    since = _REDUCE_AXES_INPUT_SINCE.get(node.op_type, 18)
    axes = cg.axes(node, 1, since=since)
    if axes is None or d is None:
        cg.unknown(node, tin, "axes or rank unknown")
        return
    axes = [a % len(d) for a in axes]
    if not axes or x.axis in axes:
        cg.unknown(node, tin, "reduces over the channel axis")
        return
    keep = attr(node, "keepdims", 1)
    cg.alias(node.outputs[0], x, x.axis if keep else x.axis - sum(a < x.axis for a in axes))


def analyse_pad(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = cg.data_input(node, tin)
    if x is None:
        return
    d = dims_of(node.inputs[0])
    pads = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else attr(node, "pads")
    axes = cg.axes(node, 3, since=18) if len(node.inputs) > 3 else None
    if pads is None or d is None:
        cg.unknown(node, tin, "pads are not constant")
        return
    pads = [int(p) for p in np.asarray(pads).ravel()]
    axes = list(range(len(d))) if not axes else [a % len(d) for a in axes]
    n = len(axes)
    for i, a in enumerate(axes):
        if a == x.axis and (pads[i] or pads[i + n]):
            cg.unknown(node, tin, "pads the channel axis")
            return
    cg.alias(node.outputs[0], x)


def analyse_resize(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = cg.data_input(node, tin)
    if x is None:
        return
    d = dims_of(node.inputs[0])
    scales_idx, sizes_idx = (1, None) if node.op_type == "Upsample" else (2, 3)
    scales = const_array(node.inputs[scales_idx]) if len(node.inputs) > scales_idx and node.inputs[scales_idx] is not None else attr(node, "scales")
    sizes = const_array(node.inputs[sizes_idx]) if sizes_idx and len(node.inputs) > sizes_idx and node.inputs[sizes_idx] is not None else None
    if attr(node, "axes") is not None or d is None:
        cg.unknown(node, tin, "Resize with axes or unknown rank")
        return
    if scales is not None and np.asarray(scales).size and float(np.asarray(scales).ravel()[x.axis]) != 1.0:
        cg.unknown(node, tin, "resizes the channel axis")
        return
    if sizes is not None and np.asarray(sizes).size:
        cg.records[node] = cut_resize_sizes
    elif sizes_idx and len(node.inputs) > sizes_idx and node.inputs[sizes_idx] is not None:
        cg.unknown(node, tin, "sizes are not constant")
        return
    cg.alias(node.outputs[0], x)


def analyse_concat(cg: ChannelGraph, node: ir.Node, tin) -> None:
    if not any(tin):
        return
    dims = [dims_of(v) for v in node.inputs]
    if any(d is None for d in dims):
        cg.unknown(node, tin, "input ranks unknown")
        return
    r = len(dims[0])
    axis = attr(node, "axis") % r
    tracked = [t for t in tin if t is not None]
    if len({t.axis for t in tracked}) != 1:
        cg.unknown(node, tin, "inputs carry channels on different axes")
        return
    caxis = tracked[0].axis
    if axis != caxis:
        if any(t is None for t in tin):
            cg.unknown(node, tin, "concatenated with a tensor that has no channel source")
            return
        first = tracked[0]
        for t in tracked[1:]:
            for k in range(first.size):
                cg.union(first.base + k, t.base + k)
        cg.alias(node.outputs[0], first)
        return
    extents = [d[axis] for d in dims]
    if any(not isinstance(e, int) for e in extents):
        cg.unknown(node, tin, "dynamic channel count")
        return
    out = cg.new(node.outputs[0], caxis, sum(extents))
    cg.touch(out, node)
    off = 0
    for t, e in zip(tin, extents):
        if t is None:
            cg.block(out, f"{node_label(node)}: these channels come from a tensor with no channel source", range(out.base + off, out.base + off + e))
        else:
            for k in range(e):
                cg.union(out.base + off + k, t.base + k)
        off += e


def analyse_split(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = cg.data_input(node, tin)
    if x is None:
        return
    d = dims_of(node.inputs[0])
    if d is None:
        cg.unknown(node, tin, "rank unknown")
        return
    axis = attr(node, "axis", 0) % len(d)
    if axis != x.axis:
        for o in node.outputs:
            cg.alias(o, x)
        return
    split = None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        split = const_array(node.inputs[1])
        if split is None:
            cg.unknown(node, tin, "split sizes are not constant")
            return
    elif attr(node, "split") is not None:
        split = attr(node, "split")
    n = len(node.outputs)
    if split is None:
        size = -(-x.size // n)
        split = [min(size, x.size - i * size) for i in range(n)]
    split = [int(s) for s in np.asarray(split).ravel()]
    if sum(split) != x.size:
        cg.unknown(node, tin, "split sizes do not add up to the channel count")
        return
    off = 0
    for o, s in zip(node.outputs, split):
        cg.tracked[o] = Tracked(o, x.axis, x.base + off, s)
        off += s
    cg.records[node] = cut_split


def analyse_slice(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = cg.data_input(node, tin)
    if x is None:
        return
    d = dims_of(node.inputs[0])
    params = [const_array(v) if v is not None else None for v in node.inputs[1:5]] + [None] * (5 - len(node.inputs))
    starts, ends, axes, steps = params[:4]
    if d is None or starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None) or (len(node.inputs) > 4 and node.inputs[4] is not None and steps is None):
        cg.unknown(node, tin, "Slice parameters are not constant")
        return
    axes = list(range(len(starts))) if axes is None else [int(a) % len(d) for a in axes]
    if x.axis not in axes:
        cg.alias(node.outputs[0], x)
        return
    i = axes.index(x.axis)
    step = 1 if steps is None else int(steps[i])
    if step != 1:
        cg.unknown(node, tin, "strided Slice over channels")
        return
    start, end, _ = slice(int(starts[i]), int(ends[i])).indices(x.size)
    end = max(end, start)
    cg.tracked[node.outputs[0]] = Tracked(node.outputs[0], x.axis, x.base + start, end - start)
    cg.records[node] = cut_slice


def analyse_reshape(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = cg.data_input(node, tin)
    if x is None:
        return
    s = dims_of(node.inputs[0])
    if s is None:
        cg.unknown(node, tin, "input rank unknown")
        return
    a, C = x.axis, x.size
    tail = s[a + 1:]
    if node.op_type == "Flatten":
        if attr(node, "axis", 1) % max(len(s), 1) != a:
            cg.unknown(node, tin, "Flatten merges the channel axis with the batch")
        elif not all(isinstance(d, int) for d in tail):
            cg.unknown(node, tin, "dynamic spatial dims behind a Flatten")
        else:
            flatten_map(cg, node, x, int(np.prod(tail)) if tail else 1)
        return
    t = _reshape_target(node, s)
    if t is None:
        cg.unknown(node, tin, "target shape is not a constant")
        return
    if not _leading_match(t, s, a):
        cg.unknown(node, tin, "Reshape mixes the channel axis with the batch or leading axes")
        return
    if len(t) > a and (t[a] == C or (t[a] == -1 and _static_prod(t[a + 1:]) == _static_prod(tail))):
        cg.records[node] = cut_reshape
        cg.alias(node.outputs[0], x)
        return
    if len(t) == a + 1 and all(isinstance(d, int) for d in tail):
        blk = int(np.prod(tail)) if tail else 1
        if t[a] in (C * blk, -1):
            cg.records[node] = cut_reshape
            flatten_map(cg, node, x, blk)
            return
    if len(t) == len(s) + 1 and isinstance(t[a], int) and isinstance(t[a + 1], int) and t[a] * t[a + 1] == C and t[a + 2:] == s[a + 1:]:
        if shuffle(cg, node, x, t[a], t[a + 1]):
            return
        cg.unknown(node, tin, "Reshape splits the channel axis into groups, not followed by a channel shuffle")
        return
    cg.unknown(node, tin, "Reshape mixes the channel axis with other axes")


def flatten_map(cg: ChannelGraph, node: ir.Node, x: Tracked, blk: int) -> None:
    out = cg.new(node.outputs[0], x.axis, x.size * blk)
    cg.touch(out, node)
    for c in range(x.size):
        cg.union_all([x.base + c] + list(range(out.base + c * blk, out.base + (c + 1) * blk)))


def shuffle(cg: ChannelGraph, node: ir.Node, x: Tracked, g: int, k: int) -> bool:
    """Reshape (…, g, k, …) → Transpose(swap) → Reshape (…, g·k, …): channel ``i·k + j`` moves to ``j·g + i``.

    Removing channel ``j`` of every group keeps the shuffle a shuffle, so
    ``{i·k + j : i < g}`` are tied and the two reshape targets get ``k'``.
    """
    a = x.axis
    uses = node.outputs[0].uses()
    if len(uses) != 1 or uses[0].node.op_type != "Transpose":
        return False
    tr = uses[0].node
    perm = list(attr(tr, "perm") or [])
    expect = list(range(len(perm)))
    if len(perm) > a + 1:
        expect[a], expect[a + 1] = a + 1, a
    if perm != expect or len(tr.outputs[0].uses()) != 1:
        return False
    back = tr.outputs[0].uses()[0].node
    if back.op_type != "Reshape" or node.outputs[0].is_graph_output() or tr.outputs[0].is_graph_output():
        return False
    s = dims_of(node.inputs[0])
    t2 = _reshape_target(back, dims_of(back.inputs[0]) or [])
    if t2 is None or len(t2) != len(s) or t2[a] not in (g * k, -1) or not _leading_match(t2, s, a) or t2[a + 1:] != s[a + 1:]:
        return False
    out = cg.new(back.outputs[0], a, g * k)
    for n in (node, tr, back):
        cg.touch(out, n)
    for j in range(k):
        cg.union_all([x.base + i * k + j for i in range(g)] + [out.base + j * g + i for i in range(g)])
    cg.records[node] = cut_shuffle_split
    cg.records[back] = cut_reshape
    cg.prehandled.update((tr, back))
    return True


def analyse_shape(cg: ChannelGraph, node: ir.Node, tin) -> None:
    x = tin[0]
    if x is None:
        return
    d = dims_of(node.inputs[0])
    if d is None:
        cg.unknown(node, tin, "Shape of a tensor of unknown rank")
        return
    start = attr(node, "start", 0)
    end = attr(node, "end", None)
    covered = range(len(d))[slice(start, end)]
    if x.axis not in covered:
        return
    pos = list(covered).index(x.axis)
    for use in node.outputs[0].uses():
        user = use.node
        idx = const_array(user.inputs[1]) if user.op_type == "Gather" and len(user.inputs) > 1 else None
        if idx is None or np.any(np.asarray(idx) % len(covered) == pos):
            cg.unknown(node, tin, "the channel count is read by a shape computation")
            return


# --------------------------------------------------------------------------- surgery
@dataclasses.dataclass
class Cut:
    """What a rule's surgery sees: the graph and the removed channel indices of every tracked tensor."""

    graph: ir.Graph
    cg: "ChannelGraph"
    removed: dict[ir.Value, np.ndarray]

    def rem(self, v: ir.Value | None) -> np.ndarray:
        return self.removed.get(v, np.zeros(0, np.int64)) if v is not None else np.zeros(0, np.int64)


def keep(n: int, removed: np.ndarray) -> np.ndarray:
    """The indices of ``range(n)`` not in ``removed``."""
    mask = np.ones(n, dtype=bool)
    mask[removed] = False
    return np.nonzero(mask)[0]


def cut_weighted(c: Cut, node: ir.Node) -> bool:
    """Conv / ConvTranspose / Gemm / MatMul: weight rows and columns, the bias, the folded BN scale."""
    out, x = node.outputs[0], node.inputs[0]
    r_out, r_in = c.rem(out), c.rem(x)
    if not r_out.size and not r_in.size:
        return False
    w = const_array(node.inputs[1])
    op = node.op_type
    if op == "Conv":
        group = attr(node, "group", 1)
        if group == 1 and r_in.size:
            w = w[:, keep(w.shape[1], r_in)]
        if group > 1 and r_out.size:
            node.attributes["group"] = ir.AttrInt64("group", group - r_out.size // (w.shape[0] // group))
        w = w[keep(w.shape[0], r_out)]
        b_axis = 0
    elif op == "ConvTranspose":
        w = w[keep(w.shape[0], r_in)][:, keep(w.shape[1], r_out)]
        b_axis = 0
    else:
        if op == "Gemm" and attr(node, "transB", 0):
            w = w[keep(w.shape[0], r_out)][:, keep(w.shape[1], r_in)]
        else:
            w = w[keep(w.shape[0], r_in)][:, keep(w.shape[1], r_out)]
        b_axis = -1
    _set_weight(c, node, w, r_out, b_axis)
    return True


def _set_weight(c: Cut, node: ir.Node, w: np.ndarray, r_out: np.ndarray, b_axis: int) -> None:
    """Store the cut weight; the bias and the folded BN scale follow the removed output channels."""
    set_input_const(c.graph, node, 1, w)
    scale = node.meta.get(BN_SCALE_META)
    if r_out.size and scale is not None:  # the folded BN scale follows its output channels
        node.meta[BN_SCALE_META] = np.asarray(scale)[keep(len(scale), r_out)]
    if r_out.size and len(node.inputs) > 2 and node.inputs[2] is not None:
        b = const_array(node.inputs[2])
        if b.ndim and b.shape[b_axis] > 1:
            set_input_const(c.graph, node, 2, np.take(b, keep(b.shape[b_axis], r_out), axis=b_axis))


def cut_grouped_within(c: Cut, node: ir.Node) -> bool:
    """A grouped Conv that lost the same positions in every group (``grouped="within"``): the
    kept filters, and the kept input positions of each group; ``group`` is unchanged."""
    r_out, r_in = c.rem(node.outputs[0]), c.rem(node.inputs[0])
    if not r_out.size and not r_in.size:
        return False
    w = const_array(node.inputs[1])
    gone_in = np.unique(r_in % w.shape[1])  # positions within a group (the same in each)
    _set_weight(c, node, w[keep(w.shape[0], r_out)][:, keep(w.shape[1], gone_in)], r_out, 0)
    return True


def cut_channel_params(c: Cut, node: ir.Node) -> bool:
    """BatchNorm / InstanceNorm / LayerNorm: every per-channel parameter."""
    r_out = c.rem(node.outputs[0])
    if not r_out.size:
        return False
    for i in range(1, len(node.inputs)):
        p = node.inputs[i]
        if p is None:
            continue
        arr = const_array(p)
        if arr.ndim and arr.shape[0] > 1:
            set_input_const(c.graph, node, i, arr[keep(arr.shape[0], r_out)])
    return True


def cut_split(c: Cut, node: ir.Node) -> bool:
    if not c.rem(node.inputs[0]).size:
        return False
    sizes = [c.cg.tracked[o].size - c.rem(o).size for o in node.outputs]
    if any(s == 0 for s in sizes):
        raise AssertionError(f"{node_label(node)}: a split output lost every channel")
    node.attributes.pop("num_outputs", None)
    if c.cg.opset >= 13:
        node.attributes.pop("split", None)
        set_input_const(c.graph, node, 1, np.array(sizes, dtype=np.int64))
    else:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
    return True


def cut_slice(c: Cut, node: ir.Node) -> bool:
    x, out = node.inputs[0], node.outputs[0]
    r_in, r_out = c.rem(x), c.rem(out)
    if not r_in.size:
        return False
    t_in, t_out = c.cg.tracked[x], c.cg.tracked[out]
    start = t_out.base - t_in.base
    new_start = start - int(np.sum(r_in < start))
    new_end = new_start + t_out.size - r_out.size
    d = len(x.shape)
    axes = const_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else np.arange(len(const_array(node.inputs[1])))
    i = [int(a) % d for a in axes].index(t_in.axis)
    starts, ends = const_array(node.inputs[1]).copy(), const_array(node.inputs[2]).copy()
    starts[i], ends[i] = new_start, new_end
    set_input_const(c.graph, node, 1, starts)
    set_input_const(c.graph, node, 2, ends)
    return True


def cut_shuffle_split(c: Cut, node: ir.Node) -> bool:
    """The first Reshape of a channel shuffle: ``(…, g, k, …)`` becomes ``(…, g, k', …)``."""
    x = node.inputs[0]
    r_in = c.rem(x)
    if not r_in.size:
        return False
    shape = const_array(node.inputs[1]).copy()
    a = c.cg.tracked[x].axis
    shape[a + 1] = (c.cg.tracked[x].size - r_in.size) // int(shape[a])
    set_input_const(c.graph, node, 1, shape)
    return True


def _cut_channel_entry(c: Cut, node: ir.Node, idx: int, *, inferred_ok: bool) -> bool:
    """The channel entry of a constant shape input (a Reshape target, Resize ``sizes``) follows the
    kept channel count; an inferred entry (``-1``/``0`` of a Reshape) is left as it is."""
    out = node.outputs[0]
    r_out = c.rem(out)
    if not (r_out.size or c.rem(node.inputs[0]).size):
        return False
    shape = const_array(node.inputs[idx]).copy()
    a = c.cg.tracked[out].axis
    if not inferred_ok or shape[a] > 0:
        shape[a] = c.cg.tracked[out].size - r_out.size
        set_input_const(c.graph, node, idx, shape)
    return True


def cut_reshape(c: Cut, node: ir.Node) -> bool:
    """A Reshape that keeps (or flattens) the channel axis: its channel entry, unless inferred (-1/0)."""
    return _cut_channel_entry(c, node, 1, inferred_ok=True)


def cut_resize_sizes(c: Cut, node: ir.Node) -> bool:
    return c.rem(node.outputs[0]).size > 0 and _cut_channel_entry(c, node, 3, inferred_ok=False)


# --------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class OpRule:
    """The channel analysis of a family of ops; the surgery it records (``cuts``) lives beside it."""

    ops: frozenset[str]
    analyse: Callable[["ChannelGraph", ir.Node, list], None]
    cuts: tuple[Callable[[Cut, ir.Node], bool], ...] = ()


RULES: tuple[OpRule, ...] = (
    OpRule(frozenset({"Conv"}), analyse_conv, (cut_weighted,)),
    OpRule(frozenset({"ConvTranspose"}), analyse_conv_transpose, (cut_weighted,)),
    OpRule(frozenset({"Gemm"}), analyse_gemm, (cut_weighted,)),
    OpRule(frozenset({"MatMul"}), analyse_matmul, (cut_weighted,)),
    OpRule(frozenset({"PRelu"}), analyse_prelu),
    OpRule(frozenset({"BatchNormalization", "InstanceNormalization"}), analyse_batchnorm, (cut_channel_params,)),
    OpRule(frozenset({"LayerNormalization"}), analyse_layernorm, (cut_channel_params,)),
    OpRule(frozenset({"Softmax", "LogSoftmax", "Hardmax"}), analyse_softmax),
    OpRule(frozenset({"Transpose"}), analyse_transpose),
    OpRule(frozenset({"Squeeze", "Unsqueeze"}), analyse_squeeze),
    OpRule(frozenset({"Pad"}), analyse_pad),
    OpRule(frozenset({"Resize", "Upsample"}), analyse_resize, (cut_resize_sizes,)),
    OpRule(frozenset({"Concat"}), analyse_concat),
    OpRule(frozenset({"Split"}), analyse_split, (cut_split,)),
    OpRule(frozenset({"Slice"}), analyse_slice, (cut_slice,)),
    OpRule(frozenset({"Reshape", "Flatten"}), analyse_reshape, (cut_reshape, cut_shuffle_split)),
    OpRule(frozenset({"Shape"}), analyse_shape),
    OpRule(frozenset(UNARY_PASS_THROUGH | POOLS | {"Clip", "Dropout"}), analyse_unary),
    OpRule(frozenset(ELEMENTWISE), analyse_elementwise),  # per-channel constant operands: ChannelGraph.broadcast_consts
    OpRule(frozenset(REDUCE), analyse_reduce),
)

RULE_FOR_OP: dict[str, OpRule] = {op: rule for rule in RULES for op in rule.ops}
