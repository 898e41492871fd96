"""Channel dependency analysis: which channels of which tensors must be removed together.

Every channel-carrying tensor (an ``ir.Value`` with a known channel axis) gets
one *element* per channel. A union-find over elements joins channels that
must go together; a *group* is one union-find set (the atomic unit of
removal: one channel of a plain conv, a whole group of a grouped conv, the
input/output channel pair of a depthwise conv, ...). Groups that touch the same
set of tensors form a *space* (the residual stream of one ResNet stage, the
hidden width of one bottleneck, ...): importance and ratios are per space.

Rules, applied in topological order over the main graph:

* **sources** make new elements: Conv / ConvTranspose (group 1) / Gemm /
  MatMul with a private constant weight, one element per output channel;
* **pass-through** ops give the output the *same* elements as the input
  (activations, Clip, PRelu, pooling, BatchNormalization, Pad/Resize on spatial
  axes, Transpose/Squeeze/Unsqueeze (the axis moves), Reduce* over other axes,
  Identity, Dropout, Cast, Split/Slice along other axes);
* **couplings** union elements: Add/Sub/Mul/Div/Max/Min/Sum/Mean between
  channel tensors (residual adds, squeeze-excite gates, SiLU), and a grouped
  or depthwise Conv, which ties input group *j* to output group *j*;
* **index maps**: Concat on the channel axis gives input *i* the output
  range ``[o_i, o_i + C_i)``; Split/Slice (step 1) give outputs sub-ranges of
  the input; Flatten/Reshape ``(N, C, H, W) → (N, C·H·W)`` maps channel ``c``
  to features ``[c·H·W, (c+1)·H·W)``;
* **consumers** end a chain: the input axis of a group-1 Conv / ConvTranspose
  weight, the rows of a Gemm/MatMul weight;
* **blockers** mark elements that must stay: graph outputs, unknown or custom
  ops, tensors used inside subgraphs, shared or non-constant weights, dynamic
  shapes where a shape is needed, channel shuffles and other Reshapes that mix
  the channel axis, Softmax over channels, broadcasts against tensors of
  unknown provenance. A group with a blocked element is never removed, and
  the report names the blocker.

LayerNormalization over the channel axis alone is handled (its scale and bias
are sliced) but its statistics depend on the channel count, so those groups
are marked *statistics-coupled*: they are removable by lossy criteria only.

What is written by hand here, and why: no library does channel dependency
analysis on ONNX graphs (Torch-Pruning and NNI work on torch modules). onnx_ir
provides the graph, use-def chains and shapes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Callable, Iterable

import numpy as np
import onnx_ir as ir

from compiler.ir_utils import const_array, node_label

# --------------------------------------------------------------------------- records


@dataclasses.dataclass
class Tracked:
    """Channel axis of a tensor and its elements ``base .. base+size-1``."""

    value: ir.Value
    axis: int
    base: int
    size: int

    def elements(self) -> range:
        return range(self.base, self.base + self.size)


@dataclasses.dataclass
class Group:
    id: int
    elements: list[int]
    values: set[ir.Value]
    blocked: str | None = None
    statistics: str | None = None  # set when removal changes normalisation statistics (lossy only)
    space: int = -1


@dataclasses.dataclass
class Space:
    id: int
    groups: list[int]
    values: list[ir.Value]
    nodes: list[ir.Node]  # sources and pass-through nodes touching the space
    blocked: str | None = None

    @property
    def channels(self) -> int:
        return len(self.groups)

    def names(self) -> list[str]:
        return [node_label(n) for n in self.nodes]


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


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _dims(value: ir.Value | None) -> list | None:
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


class ChannelGraph:
    """The channel dependency graph of a model (built on construction)."""

    def __init__(self, model: ir.Model, *, opset: int | None = None):
        self.model = model
        self.graph = model.graph
        self.opset = opset or model.opset_imports.get("", 17)
        self.tracked: dict[ir.Value, Tracked] = {}
        self.parent: list[int] = []
        self.block_reason: dict[int, str] = {}
        self.stat_reason: dict[int, str] = {}
        # node -> kind of surgery it needs; filled by the visitors
        self.records: dict[ir.Node, str] = {}
        self.sources: list[ir.Node] = []
        self.consumers: list[tuple[ir.Node, int]] = []  # (node, input index) whose weight slice follows the input
        self.broadcast_consts: list[tuple[ir.Node, int, int]] = []  # (node, input index, axis in the constant)
        self.touching: dict[ir.Value, list[ir.Node]] = {}
        self.prehandled: set[ir.Node] = set()  # nodes a pattern handler already covered
        for node in list(self.graph):
            if node not in self.prehandled:
                self._visit(node)
        self._block_escapes()
        self._build_groups()

    # ------------------------------------------------------------------ union-find
    def _new(self, value: ir.Value, axis: int, size: int) -> Tracked:
        t = Tracked(value, axis, len(self.parent), size)
        self.parent.extend(range(t.base, t.base + size))
        self.tracked[value] = t
        return t

    def _alias(self, value: ir.Value, src: Tracked, axis: int | None = None) -> Tracked:
        t = Tracked(value, src.axis if axis is None else axis, src.base, src.size)
        self.tracked[value] = t
        return t

    def find(self, i: int) -> int:
        p = self.parent
        while p[i] != i:
            p[i] = p[p[i]]
            i = p[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_all(self, elems: Iterable[int]) -> None:
        it = iter(elems)
        first = next(it, None)
        for e in it:
            self.union(first, e)

    def block(self, t: Tracked | None, reason: str, elems: Iterable[int] | None = None) -> None:
        if t is None:
            return
        for e in (t.elements() if elems is None else elems):
            self.block_reason.setdefault(e, reason)

    def _touch(self, t: Tracked, node: ir.Node) -> None:
        self.touching.setdefault(t.value, []).append(node)

    # ------------------------------------------------------------------ visitors
    def _visit(self, node: ir.Node) -> None:
        tin = [self.tracked.get(v) if v is not None else None for v in node.inputs]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            for t in tin:
                self.block(t, f"used by custom-domain op {node.domain}::{op} ({node_label(node)})")
            return
        handler = _HANDLERS.get(op)
        if handler is None:
            for t in tin:
                self.block(t, f"used by {op} ({node_label(node)}), which the channel analysis does not handle")
            return
        for t in tin:
            if t is not None:
                self._touch(t, node)
        handler(self, node, tin)

    def _unknown(self, node: ir.Node, tin, why: str) -> None:
        for t in tin:
            self.block(t, f"{node_label(node)}: {why}")

    def _data_input(self, node: ir.Node, tin) -> Tracked | None:
        """The tracked first input of a pass-through op; None (and blocked) when channels reach a parameter input."""
        if any(t is not None for t in tin[1:]):
            self._unknown(node, tin, "channels in a parameter input")
            return None
        return tin[0]

    # sources and consumers --------------------------------------------------
    def _conv(self, node: ir.Node, tin) -> None:
        w_val = node.inputs[1]
        w = _private_const(w_val)
        out = node.outputs[0]
        group = _attr(node, "group", 1)
        if w is None:
            why = "weight is shared with another node" if const_array(w_val) is not None else "weight is not a constant"
            self._unknown(node, tin[:1], why)
            return  # output untracked: anything it meets is blocked by the broadcast checks
        cout = w.shape[0]
        t_out = self._new(out, 1, cout)
        self._touch(t_out, node)
        if len(node.inputs) > 2 and node.inputs[2] is not None and _private_const(node.inputs[2]) is None:
            self.block(t_out, f"{node_label(node)}: bias is shared or not a constant")
        x = tin[0]
        self.records[node] = "conv"
        self.sources.append(node)
        if x is not None and (x.axis != 1 or x.size != w.shape[1] * group):
            self.block(x, f"{node_label(node)}: input channel axis does not match the weight")
            self.block(t_out, f"{node_label(node)}: input channel axis does not match the weight")
            return
        if group == 1:
            if x is not None:
                self.consumers.append((node, 0))
            return
        if x is None:
            self.block(t_out, f"{node_label(node)}: grouped conv whose input channels cannot be pruned")
            return
        cin_g, cout_g = w.shape[1], cout // group
        for j in range(group):
            self.union_all(
                list(range(x.base + j * cin_g, x.base + (j + 1) * cin_g))
                + list(range(t_out.base + j * cout_g, t_out.base + (j + 1) * cout_g))
            )

    def _conv_transpose(self, node: ir.Node, tin) -> None:
        w = _private_const(node.inputs[1])
        if w is None or _attr(node, "group", 1) != 1:
            self._unknown(node, tin[:1], "grouped ConvTranspose or non-private weight")
            return
        t_out = self._new(node.outputs[0], 1, w.shape[1])
        self._touch(t_out, node)
        if len(node.inputs) > 2 and node.inputs[2] is not None and _private_const(node.inputs[2]) is None:
            self.block(t_out, f"{node_label(node)}: bias is shared or not a constant")
        self.records[node] = "conv_transpose"
        self.sources.append(node)
        x = tin[0]
        if x is not None:
            if x.axis != 1 or x.size != w.shape[0]:
                self.block(x, f"{node_label(node)}: input channel axis does not match the weight")
            else:
                self.consumers.append((node, 0))

    def _gemm(self, node: ir.Node, tin) -> None:
        b = _private_const(node.inputs[1])
        a = tin[0]
        if any(tin[1:]) or b is None or b.ndim != 2 or _attr(node, "transA", 0):
            self._unknown(node, tin, "transposed input or non-private weight")
            return
        trans_b = _attr(node, "transB", 0)
        m = b.shape[0] if trans_b else b.shape[1]
        k = b.shape[1] if trans_b else b.shape[0]
        c_val = node.inputs[2] if len(node.inputs) > 2 else None
        t_out = self._new(node.outputs[0], 1, m)
        self._touch(t_out, node)
        if c_val is not None:
            c = const_array(c_val)
            if c is None:
                self.block(t_out, f"{node_label(node)}: bias is not a constant")
            elif (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2 or (c.ndim and c.shape[-1] not in (1, m)):
                self.block(t_out, f"{node_label(node)}: bias is not a per-output vector")
        self.records[node] = "gemm"
        self.sources.append(node)
        if a is not None:
            if a.axis != 1 or a.size != k:
                self.block(a, f"{node_label(node)}: input features do not match the weight")
            else:
                self.consumers.append((node, 0))

    def _matmul(self, node: ir.Node, tin) -> None:
        b = _private_const(node.inputs[1])
        a = tin[0]
        if tin[1] is not None or b is None or b.ndim != 2:
            self._unknown(node, tin, "MatMul without a private 2-D constant weight")
            return
        out_dims = _dims(node.outputs[0])
        if out_dims is None:
            self._unknown(node, tin, "output rank unknown")
            return
        t_out = self._new(node.outputs[0], len(out_dims) - 1, b.shape[1])
        self._touch(t_out, node)
        self.records[node] = "matmul"
        self.sources.append(node)
        if a is not None:
            a_dims = _dims(node.inputs[0])
            if a_dims is None or a.axis != len(a_dims) - 1 or a.size != b.shape[0]:
                self.block(a, f"{node_label(node)}: channels are not the contracted (last) axis")
            else:
                self.consumers.append((node, 0))

    # pass-through ------------------------------------------------------------
    def _unary(self, node: ir.Node, tin) -> None:
        x = tin[0]
        if x is None:
            if any(t is not None for t in tin[1:]):
                self._unknown(node, tin, "channels in a parameter input")
            return
        if node.op_type == "Clip" and any(
            v is not None and (const_array(v) is None or const_array(v).size != 1) for v in node.inputs[1:]
        ):
            self._unknown(node, tin, "Clip bounds are not scalar constants")
            return
        if node.op_type in POOLS and x.axis != 1:
            self._unknown(node, tin, "pooling over the channel axis")
            return
        if node.op_type in ("Dropout", "MaxPool") and len(node.outputs) > 1 and node.outputs[1].uses():
            self._unknown(node, tin, "second output (mask/indices) is used")
            return
        if any(t is not None for t in tin[1:]):
            self._unknown(node, tin, "channels in a parameter input")
            return
        self._alias(node.outputs[0], x)

    def _prelu(self, node: ir.Node, tin) -> None:
        x = tin[0]
        if x is None:
            return
        if tin[1] is not None:
            self._unknown(node, tin, "slope is a channel tensor")
            return
        if not self._broadcast_operand(node, 1, x, _dims(node.inputs[0])):
            return
        self._alias(node.outputs[0], x)

    def _broadcast_operand(self, node: ir.Node, idx: int, t: Tracked, out_dims: list | None) -> bool:
        """Check an untracked operand broadcast against channel tensor ``t``; record a slice if per-channel."""
        v = node.inputs[idx]
        d = _dims(v)
        if d is None or out_dims is None:
            self.block(t, f"{node_label(node)}: operand '{v.name}' has an unknown shape")
            return False
        out_axis = t.axis + (len(out_dims) - len(_dims(t.value) or out_dims))
        pos = out_axis - (len(out_dims) - len(d))
        extent = d[pos] if pos >= 0 else 1
        if extent == 1:
            return True
        if const_array(v) is not None and extent == t.size:
            self.broadcast_consts.append((node, idx, pos))
            return True
        self.block(t, f"{node_label(node)}: operand '{v.name}' is a per-channel tensor with no channel source")
        return False

    def _elementwise(self, node: ir.Node, tin) -> None:
        tracked = [t for t in tin if t is not None]
        if not tracked:
            return
        out_dims = _dims(node.outputs[0])
        in_dims = [_dims(v) for v in node.inputs]
        if out_dims is None or any(d is None for d in in_dims):
            self._unknown(node, tin, "operand ranks unknown")
            return
        R = len(out_dims)
        axes = {t.axis + R - len(in_dims[i]) for i, t in enumerate(tin) if t is not None}
        sizes = {t.size for t in tracked}
        if len(axes) != 1 or len(sizes) != 1:
            self._unknown(node, tin, "channel tensors meet on different axes or sizes")
            return
        out_axis = axes.pop()
        for i, t in enumerate(tin):
            if t is not None and in_dims[i][t.axis] != t.size:
                self._unknown(node, tin, "channel extent does not match the shape")
                return
        first = tracked[0]
        for t in tracked[1:]:
            for k in range(first.size):
                self.union(first.base + k, t.base + k)
        for i, t in enumerate(tin):
            if t is None and node.inputs[i] is not None:
                self._broadcast_operand(node, i, first, out_dims)  # blocks the channels when it cannot be sliced
        self._alias(node.outputs[0], first, out_axis)

    def _batchnorm(self, node: ir.Node, tin) -> None:
        x = tin[0]
        if x is None:
            if any(tin[1:]):
                self._unknown(node, tin, "channels in a parameter input")
            return
        params = node.inputs[1:5] if node.op_type == "BatchNormalization" else node.inputs[1:3]
        if x.axis != 1 or any(tin[1:]) or any(_private_const(p) is None for p in params):
            self._unknown(node, tin, "parameters are shared or not constants, or channels not on axis 1")
            return
        if node.op_type == "BatchNormalization" and any(o.uses() for o in node.outputs[1:]):
            self._unknown(node, tin, "training-mode outputs are used")
            return
        self.records[node] = "channel_params"
        self._alias(node.outputs[0], x)

    def _layernorm(self, node: ir.Node, tin) -> None:
        x = tin[0]
        d = _dims(node.inputs[0])
        if x is None or d is None:
            if x is not None:
                self._unknown(node, tin, "input rank unknown")
            return
        axis = _attr(node, "axis", -1) % len(d)
        normed = set(range(axis, len(d)))
        if x.axis not in normed:
            self._alias(node.outputs[0], x)
            return
        if normed != {x.axis} or any(o.uses() for o in node.outputs[1:]):
            self._unknown(node, tin, "LayerNormalization over the channel axis and others")
            return
        if any(_private_const(p) is None for p in node.inputs[1:3] if p is not None):
            self._unknown(node, tin, "scale/bias shared or not constants")
            return
        self.records[node] = "channel_params"
        out = self._alias(node.outputs[0], x)
        for e in out.elements():
            self.stat_reason.setdefault(e, f"{node_label(node)}: LayerNormalization statistics change with the channel count")

    def _softmax(self, node: ir.Node, tin) -> None:
        x = self._data_input(node, tin)
        d = _dims(node.inputs[0])
        if x is None:
            return
        default = -1 if self.opset >= 13 else 1
        if d is None or _attr(node, "axis", default) % len(d) == x.axis or (self.opset < 13 and x.axis >= _attr(node, "axis", 1) % len(d)):
            self._unknown(node, tin, f"{node.op_type} over the channel axis")
            return
        self._alias(node.outputs[0], x)

    def _transpose(self, node: ir.Node, tin) -> None:
        x = self._data_input(node, tin)
        perm = _attr(node, "perm")
        if x is None:
            return
        if perm is None:
            d = _dims(node.inputs[0])
            if d is None:
                self._unknown(node, tin, "rank unknown")
                return
            perm = list(reversed(range(len(d))))
        self._alias(node.outputs[0], x, list(perm).index(x.axis))

    def _axes(self, node: ir.Node, input_idx: int, attr: str = "axes", since: int = 13) -> list[int] | None:
        if self.opset >= since and len(node.inputs) > input_idx and node.inputs[input_idx] is not None:
            a = const_array(node.inputs[input_idx])
            return None if a is None else [int(v) for v in np.atleast_1d(a)]
        v = _attr(node, attr)
        return [] if v is None else list(v)

    def _squeeze(self, node: ir.Node, tin) -> None:
        x = self._data_input(node, tin)
        d = _dims(node.inputs[0])
        if x is None:
            return
        axes = self._axes(node, 1)
        if axes is None or d is None:
            self._unknown(node, tin, "axes or rank unknown")
            return
        if node.op_type == "Squeeze":
            axes = [a % len(d) for a in axes] if axes else [i for i, v in enumerate(d) if v == 1]
            if x.axis in axes:
                self._unknown(node, tin, "squeezes the channel axis")
                return
            self._alias(node.outputs[0], x, x.axis - sum(a < x.axis for a in axes))
        else:
            r = len(d) + len(axes)
            axes = sorted(a % r for a in axes)
            kept = [i for i in range(r) if i not in axes]
            self._alias(node.outputs[0], x, kept[x.axis])

    def _reduce(self, node: ir.Node, tin) -> None:
        x = self._data_input(node, tin)
        d = _dims(node.inputs[0])
        if x is None:
            return
        since = _REDUCE_AXES_INPUT_SINCE.get(node.op_type, 18)
        axes = self._axes(node, 1, since=since)
        if axes is None or d is None:
            self._unknown(node, tin, "axes or rank unknown")
            return
        axes = [a % len(d) for a in axes]
        if not axes or x.axis in axes:
            self._unknown(node, tin, "reduces over the channel axis")
            return
        keep = _attr(node, "keepdims", 1)
        self._alias(node.outputs[0], x, x.axis if keep else x.axis - sum(a < x.axis for a in axes))

    def _pad(self, node: ir.Node, tin) -> None:
        x = self._data_input(node, tin)
        if x is None:
            return
        d = _dims(node.inputs[0])
        pads = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else _attr(node, "pads")
        axes = self._axes(node, 3, since=18) if len(node.inputs) > 3 else None
        if pads is None or d is None:
            self._unknown(node, tin, "pads are not constant")
            return
        pads = [int(p) for p in np.asarray(pads).ravel()]
        axes = list(range(len(d))) if not axes else [a % len(d) for a in axes]
        n = len(axes)
        for i, a in enumerate(axes):
            if a == x.axis and (pads[i] or pads[i + n]):
                self._unknown(node, tin, "pads the channel axis")
                return
        self._alias(node.outputs[0], x)

    def _resize(self, node: ir.Node, tin) -> None:
        x = self._data_input(node, tin)
        if x is None:
            return
        d = _dims(node.inputs[0])
        scales_idx, sizes_idx = (1, None) if node.op_type == "Upsample" else (2, 3)
        scales = const_array(node.inputs[scales_idx]) if len(node.inputs) > scales_idx and node.inputs[scales_idx] is not None else _attr(node, "scales")
        sizes = const_array(node.inputs[sizes_idx]) if sizes_idx and len(node.inputs) > sizes_idx and node.inputs[sizes_idx] is not None else None
        if _attr(node, "axes") is not None or d is None:
            self._unknown(node, tin, "Resize with axes or unknown rank")
            return
        if scales is not None and np.asarray(scales).size and float(np.asarray(scales).ravel()[x.axis]) != 1.0:
            self._unknown(node, tin, "resizes the channel axis")
            return
        if sizes is not None and np.asarray(sizes).size:
            self.records[node] = "resize_sizes"
        elif sizes_idx and len(node.inputs) > sizes_idx and node.inputs[sizes_idx] is not None:
            self._unknown(node, tin, "sizes are not constant")
            return
        self._alias(node.outputs[0], x)

    def _concat(self, node: ir.Node, tin) -> None:
        if not any(tin):
            return
        dims = [_dims(v) for v in node.inputs]
        if any(d is None for d in dims):
            self._unknown(node, tin, "input ranks unknown")
            return
        r = len(dims[0])
        axis = _attr(node, "axis") % r
        tracked = [t for t in tin if t is not None]
        if len({t.axis for t in tracked}) != 1:
            self._unknown(node, tin, "inputs carry channels on different axes")
            return
        caxis = tracked[0].axis
        if axis != caxis:
            if any(t is None for t in tin):
                self._unknown(node, tin, "concatenated with a tensor that has no channel source")
                return
            first = tracked[0]
            for t in tracked[1:]:
                for k in range(first.size):
                    self.union(first.base + k, t.base + k)
            self._alias(node.outputs[0], first)
            return
        extents = [d[axis] for d in dims]
        if any(not isinstance(e, int) for e in extents):
            self._unknown(node, tin, "dynamic channel count")
            return
        out = self._new(node.outputs[0], caxis, sum(extents))
        self._touch(out, node)
        off = 0
        for t, e in zip(tin, extents):
            if t is None:
                self.block(out, f"{node_label(node)}: these channels come from a tensor with no channel source", range(out.base + off, out.base + off + e))
            else:
                for k in range(e):
                    self.union(out.base + off + k, t.base + k)
            off += e

    def _split(self, node: ir.Node, tin) -> None:
        x = self._data_input(node, tin)
        if x is None:
            return
        d = _dims(node.inputs[0])
        if d is None:
            self._unknown(node, tin, "rank unknown")
            return
        axis = _attr(node, "axis", 0) % len(d)
        if axis != x.axis:
            for o in node.outputs:
                self._alias(o, x)
            return
        split = None
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            split = const_array(node.inputs[1])
            if split is None:
                self._unknown(node, tin, "split sizes are not constant")
                return
        elif _attr(node, "split") is not None:
            split = _attr(node, "split")
        n = len(node.outputs)
        if split is None:
            size = -(-x.size // n)
            split = [min(size, x.size - i * size) for i in range(n)]
        split = [int(s) for s in np.asarray(split).ravel()]
        if sum(split) != x.size:
            self._unknown(node, tin, "split sizes do not add up to the channel count")
            return
        off = 0
        for o, s in zip(node.outputs, split):
            self.tracked[o] = Tracked(o, x.axis, x.base + off, s)
            off += s
        self.records[node] = "split"

    def _slice(self, node: ir.Node, tin) -> None:
        x = self._data_input(node, tin)
        if x is None:
            return
        d = _dims(node.inputs[0])
        params = [const_array(v) if v is not None else None for v in node.inputs[1:5]] + [None] * (5 - len(node.inputs))
        starts, ends, axes, steps = params[:4]
        if d is None or starts is None or ends is None or (len(node.inputs) > 3 and node.inputs[3] is not None and axes is None) or (len(node.inputs) > 4 and node.inputs[4] is not None and steps is None):
            self._unknown(node, tin, "Slice parameters are not constant")
            return
        axes = list(range(len(starts))) if axes is None else [int(a) % len(d) for a in axes]
        if x.axis not in axes:
            self._alias(node.outputs[0], x)
            return
        i = axes.index(x.axis)
        step = 1 if steps is None else int(steps[i])
        if step != 1:
            self._unknown(node, tin, "strided Slice over channels")
            return
        start, end, _ = slice(int(starts[i]), int(ends[i])).indices(x.size)
        end = max(end, start)
        self.tracked[node.outputs[0]] = Tracked(node.outputs[0], x.axis, x.base + start, end - start)
        self.records[node] = "slice"

    def _reshape(self, node: ir.Node, tin) -> None:
        x = self._data_input(node, tin)
        if x is None:
            return
        s = _dims(node.inputs[0])
        if s is None:
            self._unknown(node, tin, "input rank unknown")
            return
        a, C = x.axis, x.size
        tail = s[a + 1:]
        if node.op_type == "Flatten":
            if _attr(node, "axis", 1) % max(len(s), 1) != a:
                self._unknown(node, tin, "Flatten merges the channel axis with the batch")
            elif not all(isinstance(d, int) for d in tail):
                self._unknown(node, tin, "dynamic spatial dims behind a Flatten")
            else:
                self._flatten_map(node, x, int(np.prod(tail)) if tail else 1)
            return
        t = _reshape_target(node, s)
        if t is None:
            self._unknown(node, tin, "target shape is not a constant")
            return
        if not _leading_match(t, s, a):
            self._unknown(node, tin, "Reshape mixes the channel axis with the batch or leading axes")
            return
        if len(t) > a and (t[a] == C or (t[a] == -1 and _static_prod(t[a + 1:]) == _static_prod(tail))):
            self.records[node] = "reshape_keep"
            self._alias(node.outputs[0], x)
            return
        if len(t) == a + 1 and all(isinstance(d, int) for d in tail):
            blk = int(np.prod(tail)) if tail else 1
            if t[a] in (C * blk, -1):
                self.records[node] = "reshape_flatten"
                self._flatten_map(node, x, blk)
                return
        if len(t) == len(s) + 1 and isinstance(t[a], int) and isinstance(t[a + 1], int) and t[a] * t[a + 1] == C and t[a + 2:] == s[a + 1:]:
            if self._shuffle(node, x, t[a], t[a + 1]):
                return
            self._unknown(node, tin, "Reshape splits the channel axis into groups, not followed by a channel shuffle")
            return
        self._unknown(node, tin, "Reshape mixes the channel axis with other axes")

    def _flatten_map(self, node: ir.Node, x: Tracked, blk: int) -> None:
        out = self._new(node.outputs[0], x.axis, x.size * blk)
        self._touch(out, node)
        for c in range(x.size):
            self.union_all([x.base + c] + list(range(out.base + c * blk, out.base + (c + 1) * blk)))

    def _shuffle(self, node: ir.Node, x: Tracked, g: int, k: int) -> bool:
        """Reshape (…, g, k, …) → Transpose(swap) → Reshape (…, g·k, …): channel ``i·k + j`` moves to ``j·g + i``.

        Removing channel ``j`` of every group keeps the shuffle a shuffle, so
        ``{i·k + j : i < g}`` are tied and the two reshape targets get ``k'``.
        """
        a = x.axis
        uses = node.outputs[0].uses()
        if len(uses) != 1 or uses[0].node.op_type != "Transpose":
            return False
        tr = uses[0].node
        perm = list(_attr(tr, "perm") or [])
        expect = list(range(len(perm)))
        if len(perm) > a + 1:
            expect[a], expect[a + 1] = a + 1, a
        if perm != expect or len(tr.outputs[0].uses()) != 1:
            return False
        back = tr.outputs[0].uses()[0].node
        if back.op_type != "Reshape" or node.outputs[0].is_graph_output() or tr.outputs[0].is_graph_output():
            return False
        s = _dims(node.inputs[0])
        t2 = _reshape_target(back, _dims(back.inputs[0]) or [])
        if t2 is None or len(t2) != len(s) or t2[a] not in (g * k, -1) or not _leading_match(t2, s, a) or t2[a + 1:] != s[a + 1:]:
            return False
        out = self._new(back.outputs[0], a, g * k)
        for n in (node, tr, back):
            self._touch(out, n)
        for j in range(k):
            self.union_all([x.base + i * k + j for i in range(g)] + [out.base + j * g + i for i in range(g)])
        self.records[node] = "shuffle_split"
        self.records[back] = "reshape_keep"
        self.prehandled.update((tr, back))
        return True

    def _shape(self, node: ir.Node, tin) -> None:
        x = tin[0]
        if x is None:
            return
        d = _dims(node.inputs[0])
        if d is None:
            self._unknown(node, tin, "Shape of a tensor of unknown rank")
            return
        start = _attr(node, "start", 0)
        end = _attr(node, "end", None)
        covered = range(len(d))[slice(start, end)]
        if x.axis not in covered:
            return
        pos = list(covered).index(x.axis)
        for use in node.outputs[0].uses():
            user = use.node
            idx = const_array(user.inputs[1]) if user.op_type == "Gather" and len(user.inputs) > 1 else None
            if idx is None or np.any(np.asarray(idx) % len(covered) == pos):
                self._unknown(node, tin, "the channel count is read by a shape computation")
                return

    # ------------------------------------------------------------------ after the walk
    def _block_escapes(self) -> None:
        outputs = set(self.graph.outputs)
        for v, t in self.tracked.items():
            if v in outputs:
                self.block(t, f"'{v.name}' is a graph output")
            for use in v.uses():
                if use.node.graph is not self.graph:
                    self.block(t, f"'{v.name}' is used inside a subgraph (by {node_label(use.node)})")

    def _build_groups(self) -> None:
        roots: dict[int, Group] = {}
        for e in range(len(self.parent)):
            r = self.find(e)
            g = roots.get(r)
            if g is None:
                g = roots[r] = Group(len(roots), [], set())
            g.elements.append(e)
            if g.blocked is None and e in self.block_reason:
                g.blocked = self.block_reason[e]
            if g.statistics is None and e in self.stat_reason:
                g.statistics = self.stat_reason[e]
        self.groups: list[Group] = list(roots.values())
        self.group_of_root = {r: g.id for r, g in roots.items()}
        for v, t in self.tracked.items():
            for e in t.elements():
                self.groups[self.group_of_root[self.find(e)]].values.add(v)
        by_sig: dict[frozenset, Space] = {}
        order = {v: i for i, v in enumerate(self.tracked)}
        for g in self.groups:
            sig = frozenset(id(v) for v in g.values)
            sp = by_sig.get(sig)
            if sp is None:
                vals = sorted(g.values, key=lambda v: order[v])
                nodes: list[ir.Node] = []
                for v in vals:
                    p = v.producer()
                    for n in ([p] if p is not None else []) + self.touching.get(v, []):
                        if n not in nodes:
                            nodes.append(n)
                sp = by_sig[sig] = Space(len(by_sig), [], vals, nodes)
            sp.groups.append(g.id)
            g.space = sp.id
        self.spaces: list[Space] = list(by_sig.values())
        for sp in self.spaces:
            reasons = [self.groups[i].blocked for i in sp.groups]
            if all(reasons):
                sp.blocked = reasons[0]

    # ------------------------------------------------------------------ queries
    def group_of(self, value: ir.Value, index: int) -> Group:
        t = self.tracked[value]
        return self.groups[self.group_of_root[self.find(t.base + index)]]

    def value_groups(self, value: ir.Value) -> list[int]:
        t = self.tracked[value]
        return [self.group_of_root[self.find(e)] for e in t.elements()]

    def removed_indices(self, value: ir.Value, removed_groups: set[int]) -> np.ndarray:
        return np.array([i for i, g in enumerate(self.value_groups(value)) if g in removed_groups], dtype=np.int64)

    def spaces_matching(self, pattern: str) -> list[Space]:
        return [sp for sp in self.spaces if any(fnmatch.fnmatchcase(n, pattern) for n in sp.names())]

    def exclude(self, patterns: Iterable[str]) -> None:
        for pat in patterns:
            for sp in self.spaces_matching(pat):
                for gi in sp.groups:
                    self.groups[gi].blocked = self.groups[gi].blocked or f"excluded by pattern '{pat}'"
                sp.blocked = sp.blocked or f"excluded by pattern '{pat}'"


def _static_prod(dims) -> int | None:
    return int(np.prod(dims)) if all(isinstance(d, int) and d >= 0 for d in dims) else None


def _reshape_target(node: ir.Node, s: list) -> list | None:
    """Constant Reshape target with ``0`` entries resolved to the input dims (unless ``allowzero``)."""
    t = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if t is None:
        return None
    allowzero = _attr(node, "allowzero", 0)
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


_HANDLERS: dict[str, Callable[[ChannelGraph, ir.Node, list], None]] = {
    "Conv": ChannelGraph._conv,
    "ConvTranspose": ChannelGraph._conv_transpose,
    "Gemm": ChannelGraph._gemm,
    "MatMul": ChannelGraph._matmul,
    "PRelu": ChannelGraph._prelu,
    "BatchNormalization": ChannelGraph._batchnorm,
    "InstanceNormalization": ChannelGraph._batchnorm,
    "LayerNormalization": ChannelGraph._layernorm,
    "Softmax": ChannelGraph._softmax,
    "LogSoftmax": ChannelGraph._softmax,
    "Hardmax": ChannelGraph._softmax,
    "Transpose": ChannelGraph._transpose,
    "Squeeze": ChannelGraph._squeeze,
    "Unsqueeze": ChannelGraph._squeeze,
    "Pad": ChannelGraph._pad,
    "Resize": ChannelGraph._resize,
    "Upsample": ChannelGraph._resize,
    "Concat": ChannelGraph._concat,
    "Split": ChannelGraph._split,
    "Slice": ChannelGraph._slice,
    "Reshape": ChannelGraph._reshape,
    "Flatten": ChannelGraph._reshape,
    "Shape": ChannelGraph._shape,
    **{op: ChannelGraph._unary for op in UNARY_PASS_THROUGH | POOLS | {"Clip", "Dropout"}},
    **{op: ChannelGraph._elementwise for op in ELEMENTWISE},
    **{op: ChannelGraph._reduce for op in REDUCE},
}
