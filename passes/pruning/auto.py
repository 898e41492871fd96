"""Automatic pruning ratios: a driver above the sensitivity sweep (``prune --target-macs`` and kin).

For a MACs, parameter or latency target, each step measures every channel
space's sensitivity curve (:func:`onnxcc.passes.pruning.sensitivity.analyse`),
allocates per-space ratios greedily by loss per saving
(:func:`~onnxcc.passes.pruning.sensitivity.allocate`) and makes the cut
(:func:`onnxcc.passes.pruning.cut.prune_once`), asking for more where savings
overlapped. Without a target, ``steps`` reaches the uniform ratio in
increments, each space's kept count following its original width.
"""

from __future__ import annotations

import dataclasses
import math

import onnx_ir as ir

from onnxcc.compiler import speed
from onnxcc.compiler.analysis import analyze
from onnxcc.compiler.ir_utils import clone_model, replace_contents
from onnxcc.compiler.passbase import PassContext, PassReport, Skipped
from onnxcc.passes.pruning import sensitivity
from onnxcc.passes.pruning.cut import PruneConfig, grouped_mode, prepare, prune_once
from onnxcc.passes.pruning.dependency import ChannelGraph


def auto_prune(model: ir.Model, cfg: PruneConfig, context: PassContext) -> PassReport:
    """Automatic ratios for a target and/or progressive pruning in ``steps`` increments."""
    if cfg.target_latency is not None:
        resource, target = "latency", cfg.target_latency
    else:
        resource = "macs" if cfg.target_macs is not None else "params"
        target = cfg.target_macs if cfg.target_macs is not None else cfg.target_params
    alloc_resource = "macs" if resource == "latency" else resource  # latency is allocated by MACs, then measured
    prepare(model)

    def count(m: ir.Model) -> float:
        if resource == "latency":
            return measured_latency_ms(m)
        s = analyze(m, stats=False)
        return s.macs if resource == "macs" else s.params

    base_count = count(model)
    step_reports, last = [], None
    if target is None:  # progressive uniform pruning: each space's kept count follows its original width
        cg0 = ChannelGraph(model, grouped=grouped_mode(cfg))
        cg0.exclude(cfg.exclude)
        widths = {key: cg0.spaces[sp].channels for sp, key in sensitivity.space_keys(cg0).items()}
    for k in range(1, cfg.steps + 1):
        if target is None:
            r_k = 1.0 - (1.0 - cfg.ratio) ** (k / cfg.steps)
            cg = ChannelGraph(model, grouped=grouped_mode(cfg))
            now = {v.name: sp.channels for sp in cg.spaces if not sp.blocked for v in sp.values if v.name in widths}
            items = []
            for key, n0 in widths.items():
                n = now.get(key)
                if n:
                    keep = max(1, n0 - int(math.floor(r_k * n0 + 1e-9)))
                    items.append(f"{key}={min(0.999, max(0.0, (n - keep + 0.5) / n)):.9f}")  # +0.5: floor() lands on n - keep
            last = prune_once(model, cfg, context, 0.0, tuple(items) + cfg.space_ratio)
            step_reports.append({"step": k, "cumulative_ratio": round(r_k, 4)})
            continue
        goal = base_count * target ** (k / cfg.steps)
        now = count(model)
        if now <= goal:
            continue
        # With reconstruction the curves are measured reconstructed: what is cheap to cut then differs.
        sens = sensitivity.analyse(model, context.calibration, labels=context.labels, ratios=cfg.sensitivity_ratios,
                                   criterion=cfg.criterion, samples=cfg.calib_samples, reconstruct=cfg.reconstruct,
                                   metric=context.metric,
                                   eval_feeds=context.eval_feeds if context.labels is not None else None)  # labels are about those
        tolerance = 1.02 if resource == "latency" else 1.005  # timings are noisy at the 1-2% level
        alloc, got = _search_allocation(model, cfg, context, sens, goal, now, alloc_resource, count, tolerance)
        trial = clone_model(model)
        plain = dataclasses.replace(cfg, target_macs=None, target_params=None, target_latency=None, steps=1)
        report = prune_once(trial, plain, context, 0.0, tuple(f"{key}={r}" for key, r in alloc.items()) + cfg.space_ratio)
        got = count(trial)
        replace_contents(model, trial)
        last = report
        step_reports.append({
            "step": k, "goal": round(goal, 3), "reached": round(got, 3), "ratios": alloc, "sensitivity_seconds": round(sens.seconds, 1),
            "sensitivity": {"metric": sens.metric, "curves": [
                {"space": c.key, "layer": c.members[0] if c.members else c.key, "ratios": c.ratios, "loss": c.loss} for c in sens.curves
            ]},
        })
    if last is None:
        return PassReport(model, False, stats={"steps": step_reports, "note": "already at or below the target"})
    final = count(model) if target is not None else None
    stats = dict(last.stats, steps=step_reports)
    skipped = list(last.skipped)
    if target is not None:
        stats[f"{resource}_ratio"] = final / max(base_count, 1e-12)
        if final > base_count * target * (1.02 if resource == "latency" else 1.005):
            why = ("latency did not follow the MACs cut far enough (fixed per-node costs dominate small models)"
                   if resource == "latency" else "the remaining spaces are blocked or at their cap")
            skipped.append(Skipped("target", f"reached {final / base_count:.3f} of the {resource}, not {target}: {why}"))
    return PassReport(model, True, changed=list(last.changed), skipped=skipped, stats=stats)


def _search_allocation(model, cfg, context, sens, goal, now, resource, count, tolerance):
    """Per-space ratios whose real cut lands at ``goal``: the greedy allocation sums each space's
    savings measured alone, and neighbouring spaces' savings overlap (a conv loses input *and*
    output channels), so the allocation's own target is bisected between the goal and 0 (every
    space at its cap), counting cuts made without reconstruction or
    compensation (they do not change the count). Returns the least aggressive allocation that
    reaches the goal, else the one that came closest."""
    counting = dataclasses.replace(cfg, target_macs=None, target_params=None, target_latency=None, steps=1,
                                   reconstruct=False, compensate=False)
    tried: dict[float, tuple[dict, float]] = {}

    def attempt(frac: float):
        alloc = sensitivity.allocate(sens, frac, resource=resource, max_ratio=cfg.max_space_ratio)
        trial = clone_model(model)
        prune_once(trial, counting, context, 0.0, tuple(f"{key}={r}" for key, r in alloc.items()) + cfg.space_ratio)
        tried[frac] = (alloc, count(trial))
        return tried[frac][1]

    hi = goal / now  # the allocation asked for the goal itself: overlap makes it fall short
    if attempt(hi) <= goal * tolerance:
        return tried[hi]
    if attempt(0.0) > goal * tolerance:  # every space at its cap: the goal cannot be reached
        return min(tried.values(), key=lambda t: t[1])
    ok, bad = 0.0, hi
    for _ in range(7):
        mid = 0.5 * (ok + bad)
        if attempt(mid) <= goal * tolerance:
            ok = mid
        else:
            bad = mid
    return tried[ok]


def measured_latency_ms(model: ir.Model) -> float:
    """Median batch-1 latency (:mod:`onnxcc.compiler.speed`'s thread count): what --target-latency aims at."""
    return speed.median_ms([("m", model)], speed.LATENCY_TARGET)[1][0]
