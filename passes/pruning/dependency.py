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
  channel tensors (residual adds, squeeze-excite gates, SiLU), and a depthwise
  Conv (or a grouped one with ``grouped="whole"``), which ties input group *j*
  to output group *j*; a grouped Conv with ``grouped="within"`` (the default)
  ties channel *k* of every group together, on its input and on its output, so
  every group loses the same positions and keeps its place;
* **index maps**: Concat on the channel axis gives input *i* the output
  range ``[o_i, o_i + C_i)``; Split/Slice (step 1) give outputs sub-ranges of
  the input; Flatten/Reshape ``(N, C, H, W) → (N, C·H·W)`` maps channel ``c``
  to features ``[c·H·W, (c+1)·H·W)``;
* **consumers** end a chain: the input axis of a group-1 (or within-group)
  Conv / ConvTranspose weight, the rows of a Gemm/MatMul weight;
* **blockers** mark elements that must stay: graph outputs, unknown or custom
  ops, tensors used inside subgraphs, shared or non-constant weights, dynamic
  shapes where a shape is needed, channel shuffles and other Reshapes that mix
  the channel axis, Softmax over channels, broadcasts against tensors of
  unknown provenance. A group with a blocked element is never removed, and
  the report names the blocker.

LayerNormalization over the channel axis alone is handled (its scale and bias
are sliced) but its statistics depend on the channel count, so those groups
are marked *statistics-coupled*: they are removable by lossy criteria only.

The per-op rules live in :mod:`onnxcc.passes.pruning.rules` (one table, each
rule with its surgery); the union-find in :mod:`onnxcc.passes.pruning.channels`.
This module walks the graph with them.

What is written by hand here, and why: no library does channel dependency
analysis on ONNX graphs (Torch-Pruning and NNI work on torch modules). onnx_ir
provides the graph, use-def chains and shapes.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.ir_utils import attr, const_array, node_label
from onnxcc.passes.pruning.channels import ChannelSets, Group, Space, Tracked  # noqa: F401  (the graph's vocabulary)
from onnxcc.passes.pruning.rules import RULE_FOR_OP, Cut, dims_of


GROUPED_MODES = ("within", "whole")


class ChannelGraph(ChannelSets):
    """The channel dependency graph of a model (built on construction)."""

    def __init__(self, model: ir.Model, *, opset: int | None = None, grouped: str = "within"):
        super().__init__()
        if grouped not in GROUPED_MODES:
            raise ValueError(f"grouped must be one of {', '.join(GROUPED_MODES)}")
        # grouped convs (not depthwise): "within" removes the same channel positions from every
        # group (each keeps its group, both in and out narrow: MACs fall quadratically, as
        # Torch-Pruning does); "whole" removes whole groups (what structured masks that zero a
        # group leave, so criterion=zero uses it)
        self.grouped = grouped
        self.model = model
        self.graph = model.graph
        self.opset = opset or model.opset_imports.get("", 17)
        # node -> the surgery it needs when channels go (a cut of rules.RULES); filled by the analysis
        self.records: dict[ir.Node, Callable[[Cut, ir.Node], bool]] = {}
        self.sources: list[ir.Node] = []
        self.consumers: list[tuple[ir.Node, int]] = []  # (node, input index) whose weight slice follows the input
        self.broadcast_consts: list[tuple[ir.Node, int, int]] = []  # (node, input index, axis in the constant)
        self.prehandled: set[ir.Node] = set()  # nodes a pattern handler already covered
        for node in list(self.graph):
            if node not in self.prehandled:
                self.visit(node)
        self.block_escapes()
        self.build_groups()

    # ------------------------------------------------------------------ the walk
    def visit(self, node: ir.Node) -> None:
        tin = [self.tracked.get(v) if v is not None else None for v in node.inputs]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            for t in tin:
                self.block(t, f"used by custom-domain op {node.domain}::{op} ({node_label(node)})")
            return
        rule = RULE_FOR_OP.get(op)
        if rule is None:
            for t in tin:
                self.block(t, f"used by {op} ({node_label(node)}), which the channel analysis does not handle")
            return
        for t in tin:
            if t is not None:
                self.touch(t, node)
        rule.analyse(self, node, tin)

    def unknown(self, node: ir.Node, tin, why: str) -> None:
        for t in tin:
            self.block(t, f"{node_label(node)}: {why}")

    def data_input(self, node: ir.Node, tin) -> Tracked | None:
        """The tracked first input of a pass-through op; None (and blocked) when channels reach a parameter input."""
        if any(t is not None for t in tin[1:]):
            self.unknown(node, tin, "channels in a parameter input")
            return None
        return tin[0]

    def broadcast_operand(self, node: ir.Node, idx: int, t: Tracked, out_dims: list | None) -> bool:
        """Check an untracked operand broadcast against channel tensor ``t``; record a slice if per-channel."""
        v = node.inputs[idx]
        d = dims_of(v)
        if d is None or out_dims is None:
            self.block(t, f"{node_label(node)}: operand '{v.name}' has an unknown shape")
            return False
        out_axis = t.axis + (len(out_dims) - len(dims_of(t.value) or out_dims))
        pos = out_axis - (len(out_dims) - len(d))
        extent = d[pos] if pos >= 0 else 1
        if extent == 1:
            return True
        if const_array(v) is not None and extent == t.size:
            self.broadcast_consts.append((node, idx, pos))
            return True
        self.block(t, f"{node_label(node)}: operand '{v.name}' is a per-channel tensor with no channel source")
        return False

    def axes(self, node: ir.Node, input_idx: int, name: str = "axes", since: int = 13) -> list[int] | None:
        if self.opset >= since and len(node.inputs) > input_idx and node.inputs[input_idx] is not None:
            a = const_array(node.inputs[input_idx])
            return None if a is None else [int(v) for v in np.atleast_1d(a)]
        v = attr(node, name)
        return [] if v is None else list(v)

    def block_escapes(self) -> None:
        outputs = set(self.graph.outputs)
        for v, t in self.tracked.items():
            if v in outputs:
                self.block(t, f"'{v.name}' is a graph output")
            for use in v.uses():
                if use.node.graph is not self.graph:
                    self.block(t, f"'{v.name}' is used inside a subgraph (by {node_label(use.node)})")
