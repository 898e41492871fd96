"""Sensitivity analysis and automatic per-space ratios for a MACs / parameter target.

Sensitivity: each prunable space is pruned *alone* at each ratio (optionally
with reconstruction) and the metric is measured on the evaluation samples: the
accuracy drop in points with labels, else top-1 disagreement with the original
model in points (``−SQNR`` for outputs that are not classifier-shaped), plus a
tie-breaking SQNR term worth less than one sample. The
MACs and parameters each cut saves are recorded too.

Automatic ratios (greedy allocation, as AIMET's greedy compression-ratio
selection does): start from no pruning; repeatedly take the single-space step
to its next ratio with the smallest metric loss per MAC (or parameter)
saved, until the summed savings reach the target; then the real model is
pruned with those ratios and measured, and steps continue while the real
count is still above the target (savings of neighbouring spaces overlap).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.analysis import analyze
from onnxcc.compiler.calibration import ActivationCollector, CalibrationSet, ChannelStats, feed_samples
from onnxcc.compiler.ir_utils import clone_model
from onnxcc.compiler import verify as V
from onnxcc.compiler.passbase import PassContext
from onnxcc.passes.pruning.dependency import ChannelGraph
from onnxcc.passes.pruning.cut import PruneConfig, prepare, prune_once

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SpaceCurve:
    space: int
    key: str  # a tensor only this space owns: how the prune pass is told to cut this space
    members: list[str]
    channels: int
    ratios: list[float]
    loss: list[float]
    macs_saved: list[int]
    params_saved: list[int]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Sensitivity:
    base_macs: int
    base_params: int
    metric: str
    curves: list[SpaceCurve]
    seconds: float

    def to_json(self) -> dict:
        return {"base_macs": self.base_macs, "base_params": self.base_params, "metric": self.metric,
                "seconds": round(self.seconds, 2), "spaces": [c.to_json() for c in self.curves]}

    def table(self) -> str:
        from onnxcc.compiler.analysis import format_table

        ratios = self.curves[0].ratios if self.curves else []
        rows = []
        for c in self.curves:
            members = ", ".join(c.members[:3]) + (f", +{len(c.members) - 3}" if len(c.members) > 3 else "")
            rows.append([str(c.space), str(c.channels), members] + [f"{v:.2f}" for v in c.loss]
                        + [f"{100 * c.macs_saved[-1] / max(self.base_macs, 1):.1f}%"])
        return format_table(rows, ["space", "ch", "members"] + [f"loss@{r:g}" for r in ratios] + [f"MACs saved@{ratios[-1]:g}" if ratios else ""])


def space_keys(cg: ChannelGraph) -> dict[int, str]:
    """For each prunable space, a tensor whose channels belong to that space only."""
    keys = {}
    for sp in cg.spaces:
        if sp.blocked:
            continue
        mine = set(sp.groups)
        for v in sp.values:
            if v.name and all(g in mine for g in cg.value_groups(v)):
                keys[sp.id] = v.name
                break
    return keys


#: weight of the SQNR tie-breaker added to a top-1 drop: at most 0.2 points, under one sample in 256
SQNR_TIE = 0.002


def _loss(comp: V.Comparison) -> float:
    """The metric drop in points; with a top-1 metric plus a small SQNR term, so cuts that change no
    prediction on the samples (ties at 0, most of a curve's start) still rank by how far the outputs moved."""
    d = comp.metric_drop()
    sq = comp.min_sqnr
    if d is None:
        return -sq
    return d + SQNR_TIE * max(0.0, 100.0 - sq) if math.isfinite(sq) else d


def analyse(
    model: ir.Model,
    calibration: CalibrationSet,
    *,
    labels: np.ndarray | None = None,
    ratios: Sequence[float] = (0.1, 0.3, 0.5, 0.7),
    criterion: str = "l1",
    reconstruct: bool = False,
    samples: int = 64,
    progress: Callable[[int, int], None] | None = None,
    metric: Any = 1,
    eval_feeds: Sequence[dict] | None = None,
    only: Sequence[str] | None = None,
) -> Sensitivity:
    """Prune each space alone at each ratio; ``model`` should be folded. The model is not modified.
    ``only``: the space keys to measure (a share of the work, see compiler.search.sensitivity)."""
    t0 = time.perf_counter()
    base = clone_model(model)
    prepare(base)
    cg = ChannelGraph(base)
    keys = space_keys(cg)
    if only is not None:
        wanted = set(only)
        keys = {k: v for k, v in keys.items() if v in wanted}
    bs = calibration.batch_size_for(base, preferred=16)
    feeds = list(eval_feeds) if eval_feeds else list(calibration.batches(bs, limit=samples))  # what labels are about
    n_eval = feed_samples(feeds)
    lab = None if labels is None else np.asarray(labels)[:n_eval]
    ref = V.run_model(base, feeds, optimize=True)  # metric runs may use onnxruntime's optimised graph
    # Channel statistics of every consumer input, computed once and shared by all cuts (bias compensation).
    cache = {node.inputs[i].name: ChannelStats(cg.tracked[node.inputs[i]].axis) for node, i in cg.consumers}
    ActivationCollector(base, calibration).collect({k: [v] for k, v in cache.items()}, limit=samples)
    context = PassContext(calibration=calibration, labels=labels, stats_cache=cache, metric=metric)
    before = analyze(base, stats=False)
    m_ = V.as_metric(metric)
    what = (f"{m_.name} drop (points)" if m_.fn is not None else f"top-{m_.top_k} accuracy drop (points)" if lab is not None
            else "top-1 disagreement with the original (points)")
    curves = []
    total = len(keys) * len(ratios)
    done = 0
    if progress is None:
        from onnxcc.compiler.progress import bar

        progress = bar("sensitivity")
    for sp_id, key in keys.items():
        sp = cg.spaces[sp_id]
        curve = SpaceCurve(sp_id, key, sp.names(), sp.channels, list(ratios), [], [], [])
        for r in ratios:
            m = clone_model(base)
            cut = PruneConfig(ratio=0.0, criterion=criterion, space_ratio=(f"{key}={r}",), reconstruct=reconstruct, calib_samples=samples)
            prune_once(m, cut, context, 0.0, cut.space_ratio)
            after = analyze(m, stats=False)
            comp = V.compare_outputs(ref, V.run_model(m, feeds, optimize=True), lab, metric)
            curve.loss.append(round(_loss(comp), 4))
            curve.macs_saved.append(before.macs - after.macs)
            curve.params_saved.append(before.params - after.params)
            done += 1
            if progress:
                progress(done, total)
        curves.append(curve)
    return Sensitivity(before.macs, before.params, what, curves, time.perf_counter() - t0)


def allocate(sens: Sensitivity, target: float, *, resource: str = "macs", max_ratio: float = 0.9) -> dict[str, float]:
    """Greedy per-space ratios so the summed savings reach ``1 − target`` of the model's MACs (or params)."""
    base = sens.base_macs if resource == "macs" else sens.base_params
    need = (1.0 - target) * base
    chosen = {c.key: -1 for c in sens.curves}  # index into the curve, -1 = not pruned
    saved = 0.0
    curves = {c.key: c for c in sens.curves}

    def gain(c: SpaceCurve, i: int) -> float:
        return float(c.macs_saved[i] if resource == "macs" else c.params_saved[i])

    while saved < need - 1e-9 * max(base, 1):
        best, best_cost = None, math.inf
        for key, i in chosen.items():
            c = curves[key]
            j = i + 1
            if j >= len(c.ratios) or c.ratios[j] > max_ratio:
                continue
            d_save = gain(c, j) - (gain(c, i) if i >= 0 else 0.0)
            d_loss = c.loss[j] - (c.loss[i] if i >= 0 else 0.0)
            if d_save <= 0:
                continue
            cost = max(d_loss, 0.0) / d_save + 1e-12 * c.ratios[j]
            if cost < best_cost:
                best, best_cost = (key, j), cost
        if best is None:
            break
        key, j = best
        prev = gain(curves[key], chosen[key]) if chosen[key] >= 0 else 0.0
        saved += gain(curves[key], j) - prev
        chosen[key] = j
    return {key: curves[key].ratios[i] for key, i in chosen.items() if i >= 0}
