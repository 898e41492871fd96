"""The channel sets of a graph: elements, groups, spaces and blockers, over a union-find.

Every channel-carrying tensor (an ``ir.Value`` with a known channel axis) gets
one *element* per channel (:class:`Tracked`). A union-find over elements joins
channels that must go together; a *group* is one union-find set (the atomic
unit of removal: one channel of a plain conv, a whole group of a grouped conv,
the input/output channel pair of a depthwise conv, ...). Groups that touch the
same set of tensors form a *space* (the residual stream of one ResNet stage,
the hidden width of one bottleneck, ...): importance and ratios are per space.
An element can be *blocked* (it must stay, with the reason) or marked
*statistics-coupled* (removable by lossy criteria only).

This module knows nothing about operators: the per-op rules
(:mod:`onnxcc.passes.pruning.rules`) say which elements a node creates,
aliases, joins or blocks, and :class:`~onnxcc.passes.pruning.dependency.ChannelGraph`
walks the graph with them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Iterable

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.ir_utils import node_label


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


class ChannelSets:
    """Elements of tracked tensors, their union-find, blockers, and the groups and spaces built from them."""

    def __init__(self) -> None:
        self.tracked: dict[ir.Value, Tracked] = {}
        self.parent: list[int] = []
        self.block_reason: dict[int, str] = {}
        self.stat_reason: dict[int, str] = {}
        self.touching: dict[ir.Value, list[ir.Node]] = {}

    # ------------------------------------------------------------------ union-find
    def new(self, value: ir.Value, axis: int, size: int) -> Tracked:
        t = Tracked(value, axis, len(self.parent), size)
        self.parent.extend(range(t.base, t.base + size))
        self.tracked[value] = t
        return t

    def alias(self, value: ir.Value, src: Tracked, axis: int | None = None) -> Tracked:
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

    def touch(self, t: Tracked, node: ir.Node) -> None:
        self.touching.setdefault(t.value, []).append(node)

    # ------------------------------------------------------------------ groups and spaces
    def build_groups(self) -> None:
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
