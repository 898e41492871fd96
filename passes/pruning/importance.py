"""What to prune: importance scores per channel group, and strategies that turn them into groups to remove.

Scores are computed per *group* by aggregating over every member, so a
residual channel is ranked once from all the convs that write it. Each
source's per-channel statistic is normalised by its mean over that source's
channels, so layers of different scale are comparable (needed for global
ranking); a group's score is the mean over its sources.

* ``l1`` / ``l2``: norm of each producing filter (Conv ``W[o]``, Gemm/MatMul
  weight column, ConvTranspose ``W[:, o]``);
* ``bn_scale``: ``|γ| / sqrt(σ² + ε)`` of the BatchNorms in the group, or the
  scale the fold pass recorded when it folded them (network slimming); groups
  with no BatchNorm fall back to ``l2``;
* ``fpgm``: sum of distances from each filter to the layer's other filters
  (filters near the geometric median are redundant; He et al. 2019);
* ``activation``: mean ``|x|`` of the group's channels where the next layers
  read them, from calibration data;
* ``zero``: groups that are provably dead: every producing filter is exactly
  zero, or every consuming weight slice is exactly zero;
* ``reconstruction``: greedy removal of the channels whose loss the next
  layers' least squares can best absorb (:func:`reconstruction_scores`), from
  calibration data; meant to be used with reconstruction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.ir_utils import const_array
from onnxcc.compiler import weights as W
from onnxcc.passes.fold import BN_SCALE_META
from onnxcc.passes.pruning import rules
from onnxcc.passes.pruning.dependency import ChannelGraph

CRITERIA = ("l1", "l2", "bn_scale", "fpgm", "activation", "zero", "reconstruction")


def _normalised(x: np.ndarray) -> np.ndarray:
    m = float(np.mean(x)) if x.size else 0.0
    return x / m if m > 0 else np.zeros_like(x)


def _fpgm(rows: np.ndarray) -> np.ndarray:
    sq = (rows * rows).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0.0)
    return np.sqrt(d2).sum(1)


def source_statistic(node: ir.Node, criterion: str) -> np.ndarray | None:
    rows = W.by_output(node).astype(np.float64)
    if criterion == "l1":
        return np.abs(rows).sum(1)
    if criterion == "l2":
        return np.sqrt((rows * rows).sum(1))
    if criterion == "fpgm":
        return _fpgm(rows)
    if criterion == "bn_scale":
        s = node.meta.get(BN_SCALE_META)
        return None if s is None else np.asarray(s, dtype=np.float64)
    return None


def scores(
    cg: ChannelGraph,
    criterion: str,
    activations: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Importance per group (index = group id); NaN where nothing measured the group."""
    total = np.zeros(len(cg.groups))
    count = np.zeros(len(cg.groups))

    def add(value: ir.Value, stat: np.ndarray) -> None:
        norm = _normalised(np.asarray(stat, dtype=np.float64))
        # Groups spanning several channels of one tensor (grouped convs) take the sum.
        per_group: dict[int, float] = {}
        for i, g in enumerate(cg.value_groups(value)):
            per_group[g] = per_group.get(g, 0.0) + float(norm[i])
        for g, v in per_group.items():
            total[g] += v
            count[g] += 1

    if criterion == "activation":
        for name, stat in (activations or {}).items():
            value = _value_named(cg, name)
            if value is not None:
                add(value, stat)
    elif criterion == "bn_scale":
        seen = set()
        for node, cut in cg.records.items():
            if node.op_type == "BatchNormalization" and cut is rules.cut_channel_params:
                gamma, var = const_array(node.inputs[1]), const_array(node.inputs[4])
                eps = node.attributes["epsilon"].value if "epsilon" in node.attributes else 1e-5
                add(node.outputs[0], np.abs(gamma) / np.sqrt(var + eps))
                seen.add(node.outputs[0])
        for node in cg.sources:
            s = source_statistic(node, "bn_scale")
            if s is not None and node.outputs[0] in cg.tracked:
                add(node.outputs[0], s)
        # Groups no BatchNorm measured: L2 of their filters.
        fallback = np.zeros(len(cg.groups))
        fcount = np.zeros(len(cg.groups))
        for node in cg.sources:
            if node.outputs[0] not in cg.tracked:
                continue
            norm = _normalised(source_statistic(node, "l2"))
            for i, g in enumerate(cg.value_groups(node.outputs[0])):
                fallback[g] += norm[i]
                fcount[g] += 1
        missing = (count == 0) & (fcount > 0)
        total[missing], count[missing] = fallback[missing], fcount[missing]
    else:
        for node in cg.sources:
            if node.outputs[0] in cg.tracked:
                add(node.outputs[0], source_statistic(node, criterion))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _value_named(cg: ChannelGraph, name: str) -> ir.Value | None:
    for v in cg.tracked:
        if v.name == name:
            return v
    return None


def dead_groups(cg: ChannelGraph) -> dict[int, str]:
    """Groups removable without changing the output: {group id: 'zero filters' | 'unused'}.

    A group is dead when every group-1 filter producing it is exactly zero (its
    activation is then input-independent: a constant the prune pass reads in
    onnxruntime and folds into the next layers' biases, or keeps when it is not
    spatially constant) or when every weight slice consuming it is exactly zero
    (nothing reads it).
    """
    produced = np.zeros(len(cg.groups), dtype=bool)
    nonzero_src = np.zeros(len(cg.groups), dtype=bool)
    for node in cg.sources:
        # Depthwise convs (and grouped ones losing whole groups) only transform channels a
        # group-1 source made; whether their output is still constant is checked in onnxruntime.
        # A grouped conv losing positions within its groups makes its own channels.
        group = node.attributes.get("group")
        whole = group is not None and group.value > 1 and cg.records.get(node) is not rules.cut_grouped_within
        if node.outputs[0] not in cg.tracked or whole:
            continue
        rows = W.by_output(node).astype(np.float64)
        for i, g in enumerate(cg.value_groups(node.outputs[0])):
            produced[g] = True
            nonzero_src[g] |= bool(np.any(rows[i] != 0))
    consumed = np.zeros(len(cg.groups), dtype=bool)
    nonzero_use = np.zeros(len(cg.groups), dtype=bool)
    for node, idx in cg.consumers:
        rows = W.by_input(node).astype(np.float64)
        for i, g in enumerate(cg.value_groups(node.inputs[idx])):
            consumed[g] = True
            nonzero_use[g] |= bool(np.any(rows[i] != 0))
    out = {}
    for g in range(len(cg.groups)):
        if produced[g] and not nonzero_src[g]:
            out[g] = "zero filters"
        elif consumed[g] and not nonzero_use[g]:
            out[g] = "unused"
    return out


@dataclasses.dataclass(frozen=True)
class Strategy:
    ratio: float = 0.5
    global_ranking: bool = False
    max_space_ratio: float = 0.9
    round_to: int = 1
    min_channels: int = 1
    space_ratios: Mapping[int, float] = dataclasses.field(default_factory=dict)


def _keep_count(n: int, ratio: float, s: Strategy) -> int:
    keep = n - int(math.floor(ratio * n + 1e-9))
    keep = max(keep, s.min_channels, 1)
    if s.round_to > 1 and keep < n:
        keep = min(n, int(math.ceil(keep / s.round_to)) * s.round_to)
    return min(keep, n)


def select(cg: ChannelGraph, score: np.ndarray, s: Strategy) -> set[int]:
    """Groups to remove: lowest scores per space (uniform) or across spaces (global)."""
    removable = {
        sp.id: [g for g in sp.groups if cg.groups[g].blocked is None and not math.isnan(score[g])]
        for sp in cg.spaces
        if sp.blocked is None
    }
    removed: set[int] = set()
    if not s.global_ranking:
        for sp_id, gs in removable.items():
            sp = cg.spaces[sp_id]
            ratio = s.space_ratios.get(sp_id, s.ratio)
            keep = _keep_count(len(sp.groups), ratio, s)
            n_remove = min(len(sp.groups) - keep, len(gs))
            order = sorted(gs, key=lambda g: (score[g], g))
            removed.update(order[:n_remove])
        return removed
    # Global: rank every removable group; stop at ratio of all removable channels, each space capped.
    cap = {sp_id: len(cg.spaces[sp_id].groups) - _keep_count(len(cg.spaces[sp_id].groups), s.space_ratios.get(sp_id, s.max_space_ratio), s) for sp_id in removable}
    candidates = sorted(((score[g], g, sp_id) for sp_id, gs in removable.items() for g in gs))
    target = int(math.floor(s.ratio * sum(len(gs) for gs in removable.values()) + 1e-9))
    taken = {sp_id: 0 for sp_id in removable}
    for _, g, sp_id in candidates:
        if len(removed) >= target:
            break
        if taken[sp_id] < cap[sp_id]:
            removed.add(g)
            taken[sp_id] += 1
    if s.round_to > 1:  # trim each space so its kept count is a multiple of round_to
        for sp_id, n in taken.items():
            total = len(cg.spaces[sp_id].groups)
            keep = _keep_count(total, (n / total) if total else 0, s)
            excess = n - (total - keep)
            if excess > 0:
                mine = sorted((g for g in removed if cg.groups[g].space == sp_id), key=lambda g: -score[g])
                removed.difference_update(mine[:excess])
    return removed


# ---------------------------------------------------------------------------- reconstruction criterion
class CovarianceReducer:
    """Streaming channel covariance of a consumer input (rows: every position of every sample)."""

    def __init__(self, axis: int):
        self.axis = axis
        self.n = 0
        self.s = self.ss = None

    def update(self, x: np.ndarray) -> None:
        rows = np.moveaxis(x, self.axis, -1).reshape(-1, x.shape[self.axis]).astype(np.float64)
        if self.s is None:
            self.s = np.zeros(rows.shape[1])
            self.ss = np.zeros((rows.shape[1], rows.shape[1]))
        self.s += rows.sum(0)
        self.ss += rows.T @ rows
        self.n += rows.shape[0]

    def covariance(self) -> np.ndarray:
        m = self.s / max(self.n, 1)
        return self.ss / max(self.n, 1) - np.outer(m, m)


def reconstruction_scores(cg: ChannelGraph, covariances: Mapping[str, np.ndarray], *, ridge: float = 1e-3, exact_limit: int = 1024) -> np.ndarray:
    """Greedy removal order by the output error least squares cannot absorb (optimal brain surgeon on channels).

    For a consumer with input covariance Σ (channels, centred: the refit bias absorbs means) and
    weight energy ``e_c = ‖W[:, c]‖²``, removing channel c and refitting the others costs about
    ``e_c / (Σ⁻¹)_cc``: a channel the others predict well (large ``(Σ⁻¹)_cc``) is cheap even if its
    weights are large. Groups are removed one at a time, cheapest first, and Σ⁻¹ is downdated
    after each removal (spaces wider than ``exact_limit`` use the one-shot costs). The score of a
    group is its position in that order, normalised to (0, 1], so strategies take the first ones.
    """
    score = np.full(len(cg.groups), np.nan)
    by_space: dict[int, list[tuple]] = {}
    for node, idx in cg.consumers:
        x = node.inputs[idx]
        cov = covariances.get(x.name)
        if cov is None:
            continue
        rows = W.by_input(node).astype(np.float64)
        energy = (rows * rows).sum(1)
        groups = cg.value_groups(x)
        c = cov + ridge * (np.trace(cov) / max(len(cov), 1) + 1e-12) * np.eye(len(cov))
        prec = np.linalg.inv(c)
        for sp in {cg.groups[g].space for g in groups}:
            by_space.setdefault(sp, []).append((prec, energy, np.array(groups)))
    for sp_id, consumers in by_space.items():
        sp = cg.spaces[sp_id]
        alive = [g for g in sp.groups if cg.groups[g].blocked is None]
        order: list[int] = []
        exact = all(p.shape[0] <= exact_limit for p, _, _ in consumers)
        state = [(p.copy(), e, grp, np.ones(len(grp), dtype=bool)) for p, e, grp in consumers]
        remaining = set(alive)
        while remaining:
            costs = {g: 0.0 for g in remaining}
            for p, e, grp, keep in state:
                diag = np.diag(p)
                for i in np.nonzero(keep)[0]:
                    g = grp[i]
                    if g in costs:
                        costs[g] += e[i] / max(diag[i], 1e-30)
            g_min = min(costs, key=lambda g: (costs[g], g))
            order.append(g_min)
            remaining.discard(g_min)
            for k, (p, e, grp, keep) in enumerate(state):
                for i in np.nonzero((grp == g_min) & keep)[0]:
                    keep[i] = False
                    if exact and p[i, i] > 0:  # Schur-complement downdate: Σ⁻¹ of the channels left
                        p -= np.outer(p[:, i], p[i, :]) / p[i, i]
                        p[i, :] = 0.0
                        p[:, i] = 0.0
                        p[i, i] = 1.0
            if not exact:  # one-shot: the initial costs give the whole order
                order.extend(sorted(remaining, key=lambda g: (costs[g], g)))
                break
        for rank, g in enumerate(order):
            score[g] = (rank + 1) / len(order)
    return score
