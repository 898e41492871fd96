"""The ``prune`` pass: structured channel pruning with the channel graph.

1. normalise: constants lifted to initializers, nodes sorted, shapes inferred;
2. analyse: :class:`~passes.pruning.dependency.ChannelGraph` (groups, spaces, blockers);
3. decide: importance per group (:mod:`passes.pruning.importance`), then a
   strategy (uniform ratio per space, or global ranking with a per-space cap,
   ``round_to``, per-layer ratios and exclusions by node-name pattern);
   ``criterion=zero`` removes only provably dead groups;
4. compensate: removed channels whose activation is not zero are folded into
   the consumer's bias. For dead channels the activation is a constant, read
   from onnxruntime on seeded random inputs (exact unless the consumer
   zero-pads it); for channels removed by importance, the calibration mean;
5. cut: :func:`passes.pruning.surgery.apply`, shapes re-inferred.

``criterion=zero`` is exact: a dead group whose removal cannot be compensated
exactly (a nonzero constant read through zero padding, a LayerNorm over the
channels) is kept and reported, unless ``allow_lossy`` is set.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from compiler.calibration import ActivationCollector, CalibrationSet, ChannelStats
from compiler.errors import BadInputError
from compiler.ir_utils import clone_model, infer_shapes, node_label, replace_contents
from compiler.registry import OnnxccPass, PassReport, Skipped, register
from passes.pruning import importance, surgery
from passes.pruning.dependency import ChannelGraph, _attr

logger = logging.getLogger(__name__)


@register
class PrunePass(OnnxccPass):
    name = "prune"
    exact = False
    summary = "structured channel pruning: removes whole channels (filters) with every coupled tensor"

    @dataclasses.dataclass(frozen=True)
    class Config:
        ratio: float = dataclasses.field(default=0.5, metadata={"help": "fraction of channels to remove per space (or overall with global_ranking)"})
        criterion: Literal["l1", "l2", "bn_scale", "fpgm", "activation", "zero", "reconstruction"] = dataclasses.field(
            default="l1", metadata={"help": "importance: l1, l2, bn_scale, fpgm, activation / reconstruction (need calib) or zero (lossless)"}
        )
        global_ranking: bool = dataclasses.field(default=False, metadata={"help": "rank channels across spaces instead of a uniform ratio"})
        max_space_ratio: float = dataclasses.field(default=0.9, metadata={"help": "with global ranking: most any one space may lose"})
        round_to: int = dataclasses.field(default=1, metadata={"help": "keep channel counts a multiple of this"})
        exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "node-name patterns whose spaces are left alone"})
        layer_ratio: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "PATTERN=R: ratio for the spaces of matching nodes"})
        compensate: bool = dataclasses.field(default=True, metadata={"help": "fold removed channels' mean activation into the next bias"})
        allow_lossy: bool = dataclasses.field(default=False, metadata={"help": "criterion=zero: also remove dead channels compensated only approximately"})
        calib_samples: int = dataclasses.field(default=64, metadata={"help": "calibration samples for activation statistics"})
        reconstruct: bool = dataclasses.field(default=False, metadata={"help": "refit the layers after each cut by least squares on calibration data (needs calib)"})
        ridge: float = dataclasses.field(default=1e-3, metadata={"help": "reconstruction: ridge strength relative to the mean input energy"})
        space_ratio: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "TENSOR=R: ratio for the spaces holding that tensor's channels"})
        target_macs: float | None = dataclasses.field(default=None, metadata={"help": "choose per-space ratios from sensitivity so MACs ≤ this fraction (needs calib)"})
        target_params: float | None = dataclasses.field(default=None, metadata={"help": "as target_macs, for parameters"})
        target_latency: float | None = dataclasses.field(default=None, metadata={"help": "as target_macs, for latency measured with onnxruntime (batch 1, 2 threads; timing-dependent)"})
        steps: int = dataclasses.field(default=1, metadata={"help": "reach the ratio/target in this many prune(+reconstruct) increments"})
        sensitivity_ratios: tuple[float, ...] = dataclasses.field(default=(0.125, 0.25, 0.375, 0.5, 0.625, 0.75), metadata={"help": "ratios tried per space for automatic ratios"})

        def __post_init__(self):
            if not 0.0 <= self.ratio < 1.0:
                raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
            if self.round_to < 1:
                raise ValueError("round_to must be >= 1")
            for item in self.layer_ratio + self.space_ratio:
                _parse_layer_ratio(item)
            if sum(t is not None for t in (self.target_macs, self.target_params, self.target_latency)) > 1:
                raise ValueError("give one of target_macs, target_params, target_latency")
            for t in (self.target_macs, self.target_params, self.target_latency):
                if t is not None and not 0.0 < t < 1.0:
                    raise ValueError(f"targets are fractions in (0, 1), got {t}")
            if self.steps < 1:
                raise ValueError("steps must be >= 1")

    def __init__(self, config=None, context=None):
        super().__init__(config, context)
        self.exact = self.config.criterion == "zero" and not self.config.allow_lossy

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        if self.config.criterion in ("activation", "reconstruction") and self.context.calibration is None:
            raise ir.passes.PreconditionError(f"criterion '{self.config.criterion}' needs calibration data (--calib)")
        if self.config.reconstruct and self.context.calibration is None:
            raise ir.passes.PreconditionError("reconstruction needs calibration data (--calib)")
        if (self.config.target_macs or self.config.target_params or self.config.target_latency) and self.context.calibration is None:
            raise ir.passes.PreconditionError("automatic ratios need calibration data (--calib)")

    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        if cfg.target_macs is None and cfg.target_params is None and cfg.target_latency is None and cfg.steps == 1:
            return self._prune_once(model, cfg.ratio, cfg.space_ratio)
        return self._auto(model)

    def _auto(self, model: ir.Model) -> PassReport:
        """Automatic ratios for a target and/or progressive pruning in ``steps`` increments."""
        from compiler.analysis import analyze
        from passes.pruning import sensitivity

        cfg = self.config
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
            cg0 = ChannelGraph(model)
            cg0.exclude(cfg.exclude)
            widths = {key: cg0.spaces[sp].channels for sp, key in sensitivity.space_keys(cg0).items()}
        for k in range(1, cfg.steps + 1):
            if target is None:
                r_k = 1.0 - (1.0 - cfg.ratio) ** (k / cfg.steps)
                cg = ChannelGraph(model)
                now = {v.name: sp.channels for sp in cg.spaces if not sp.blocked for v in sp.values if v.name in widths}
                items = []
                for key, n0 in widths.items():
                    n = now.get(key)
                    if n:
                        keep = max(1, n0 - int(math.floor(r_k * n0 + 1e-9)))
                        items.append(f"{key}={min(0.999, max(0.0, (n - keep + 0.5) / n)):.9f}")  # +0.5: floor() lands on n - keep
                last = self._prune_once(model, 0.0, tuple(items) + cfg.space_ratio)
                step_reports.append({"step": k, "cumulative_ratio": round(r_k, 4)})
                continue
            goal = base_count * target ** (k / cfg.steps)
            now = count(model)
            if now <= goal:
                continue
            # With reconstruction the curves are measured reconstructed: what is cheap to cut then differs.
            sens = sensitivity.analyse(model, self.context.calibration, labels=self.context.labels, ratios=cfg.sensitivity_ratios,
                                       criterion=cfg.criterion, samples=cfg.calib_samples, reconstruct=cfg.reconstruct,
                                       top_k=self.context.top_k)
            frac = goal / now
            for attempt in range(4):
                trial = clone_model(model)
                alloc = sensitivity.allocate(sens, frac, resource=alloc_resource, max_ratio=cfg.max_space_ratio)
                plain = dataclasses.replace(cfg, target_macs=None, target_params=None, target_latency=None, steps=1)
                report = PrunePass(plain, self.context)._prune_once(
                    trial, 0.0, tuple(f"{key}={r}" for key, r in alloc.items()) + cfg.space_ratio
                )
                got = count(trial)
                tolerance = 1.02 if resource == "latency" else 1.005  # timings are noisy at the 1-2% level
                if got <= goal * tolerance or attempt == 3:
                    break
                frac *= goal / got  # savings overlapped: ask for more
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

    def _prune_once(self, model: ir.Model, ratio: float, space_ratio: tuple[str, ...]) -> PassReport:
        """One analysis + cut + compensation/reconstruction at a uniform ``ratio`` with per-space overrides."""
        cfg = self.config
        prepare(model)
        cg = ChannelGraph(model)
        cg.exclude(cfg.exclude)
        ratios = {}
        for item in space_ratio:
            name, r = _parse_layer_ratio(item)
            hit = [sp for sp in cg.spaces if any(v.name == name for v in sp.values)]
            if not hit:
                raise BadInputError(f"prune: space ratio tensor '{name}' carries no prunable channels")
            for sp in hit:
                ratios[sp.id] = r
        for item in cfg.layer_ratio:
            pat, r = _parse_layer_ratio(item)
            matched = cg.spaces_matching(pat)
            if not matched:
                raise BadInputError(f"prune: --layer-ratio pattern '{pat}' matches no prunable layer")
            for sp in matched:
                ratios[sp.id] = r
        skipped: list[Skipped] = []
        calib = self.context.calibration
        # Calibration statistics of consumer inputs of *this* model: what a caller (sensitivity) computed
        # once, plus what this cut collects, so the activation criterion and compensation share one run.
        calib_stats = dict(self.context.stats_cache)

        if cfg.criterion == "zero":
            removed, why_kept = _dead_selection(cg)
        else:
            if cfg.criterion == "reconstruction":
                values = {node.inputs[idx] for node, idx in cg.consumers}
                covs = {v.name: importance.CovarianceReducer(cg.tracked[v].axis) for v in values}
                ActivationCollector(model, calib).collect({k: [r] for k, r in covs.items()}, limit=cfg.calib_samples)
                score = importance.reconstruction_scores(cg, {k: r.covariance() for k, r in covs.items()}, ridge=cfg.ridge)
            else:
                acts = None
                if cfg.criterion == "activation":  # the statistics also serve the bias compensation below
                    calib_stats.update(_consumer_input_stats(model, cg, calib, cfg, calib_stats))
                    acts = {name: st.mean_abs for name, st in calib_stats.items()}
                score = importance.scores(cg, cfg.criterion, acts)
            strat = importance.Strategy(ratio, cfg.global_ranking, cfg.max_space_ratio, cfg.round_to, 1, ratios)
            removed = importance.select(cg, score, strat)
            why_kept = {}

        # Bias compensation for removed channels that the next layers read as nonzero.
        deltas: dict[ir.Node, np.ndarray] = {}
        lossy_notes: list[str] = []
        data = calib if calib is not None else (_random_set(model) if cfg.criterion == "zero" else None)
        if removed and (cfg.compensate or cfg.criterion == "zero") and data is not None:
            cached = calib_stats if data is calib else {}  # cached stats are calibration statistics
            removed, deltas, lossy_notes, more_kept = _compensate(model, cg, removed, data, cfg, exact=self.exact, cache=cached)
            why_kept.update(more_kept)
        elif removed and cfg.criterion != "zero":
            lossy_notes.append("no calibration data: removed channels' mean activations not compensated")

        original = clone_model(model) if cfg.reconstruct and removed else None
        changed = surgery.apply(cg, removed, deltas)
        infer_shapes(model)
        common.RemoveUnusedNodesPass()(model)
        recon_stats = None
        if original is not None:
            from passes.pruning.reconstruct import ReconstructOptions, reconstruct

            layers = {}
            for node, idx in cg.consumers:
                if cg.removed_indices(node.inputs[idx], removed).size:
                    out = node.outputs[0]
                    gone = cg.removed_indices(out, removed) if out in cg.tracked else np.zeros(0, np.int64)
                    layers[node.name] = np.setdiff1d(np.arange(cg.tracked[out].size), gone) if out in cg.tracked else None
            opts = ReconstructOptions(samples=cfg.calib_samples, ridge=cfg.ridge, seed=self.context.seed)
            done, not_done, recon_stats = reconstruct(original, model, calib, layers, opts)
            skipped.extend(not_done)
            infer_shapes(model)

        spaces = []
        for sp in cg.spaces:
            gone = sum(1 for g in sp.groups if g in removed)
            kept_reason = sorted({why_kept[g] for g in sp.groups if g in why_kept})
            entry = {
                "space": sp.id,
                "members": sp.names()[:12] + ([f"... {len(sp.nodes) - 12} more"] if len(sp.nodes) > 12 else []),
                "channels": sp.channels,
                "kept": sp.channels - gone,
                "status": "blocked" if sp.blocked else ("pruned" if gone else "unchanged"),
            }
            if sp.blocked:
                entry["blocker"] = sp.blocked
                skipped.append(Skipped(_space_label(sp), sp.blocked))
            else:
                partial = sorted({cg.groups[g].blocked for g in sp.groups if cg.groups[g].blocked})
                if partial:
                    entry["partly_blocked"] = partial
                if kept_reason:
                    entry["kept_because"] = kept_reason
                    skipped.append(Skipped(_space_label(sp), "; ".join(kept_reason)))
            spaces.append(entry)
        stats = {
            "criterion": cfg.criterion,
            "groups": len(cg.groups),
            "groups_removed": len(removed),
            "spaces": spaces,
            "prunable_spaces": sum(1 for sp in cg.spaces if not sp.blocked),
            "compensated_layers": [node_label(n) for n in deltas],
        }
        if lossy_notes:
            stats["lossy"] = lossy_notes
        if recon_stats is not None:
            stats["reconstructed"] = recon_stats
        return PassReport(model, bool(removed), changed=changed, skipped=skipped, stats=stats)


def measured_latency_ms(model: ir.Model) -> float:
    """Median batch-1 latency on 2 threads (``compiler.bench``): what --target-latency aims at."""
    from compiler import bench

    return bench.bench_models([("m", model)], threads=2, batch=1, rounds=3, block=10, measure_memory=False).entries[0].median_ms


def prepare(model: ir.Model) -> None:
    """What the analysis needs: weights as initializers, sorted nodes, named nodes, fresh shapes."""
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    names = {n.name for n in model.graph if n.name}
    for i, n in enumerate(model.graph):
        if not n.name:
            base = f"{n.op_type}_{i}"
            n.name = base if base not in names else f"{base}_{len(names)}"
            names.add(n.name)
    common.TopologicalSortPass()(model)
    infer_shapes(model)


def _parse_layer_ratio(item: str) -> tuple[str, float]:
    pat, sep, r = str(item).rpartition("=")
    if not sep or not pat:
        raise ValueError(f"layer ratio '{item}' is not PATTERN=R")
    ratio = float(r)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"layer ratio '{item}': R must be in [0, 1)")
    return pat, ratio


def _space_label(sp) -> str:
    names = sp.names()
    return f"space {sp.id} ({names[0]}{', ...' if len(names) > 1 else ''})" if names else f"space {sp.id}"


def _dead_selection(cg: ChannelGraph) -> tuple[set[int], dict[int, str]]:
    dead = importance.dead_groups(cg)
    removed: set[int] = set()
    kept: dict[int, str] = {}
    for sp in cg.spaces:
        cands = [g for g in sp.groups if g in dead and cg.groups[g].blocked is None]
        for g in cands:
            if cg.groups[g].statistics:
                kept[g] = f"dead channel kept: {cg.groups[g].statistics}"
        cands = [g for g in cands if g not in kept]
        if cands and len(cands) == len(sp.groups):
            kept[cands[0]] = "every channel is dead; one is kept (a space is never pruned to zero)"
            cands = cands[1:]
        removed.update(cands)
    return removed, kept


def _random_set(model: ir.Model) -> CalibrationSet:
    from compiler.verify import verification_feeds

    feeds = verification_feeds(model, None, samples=4, seed=1234)
    return CalibrationSet({k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}, source="random inputs")


def _consumer_input_stats(model, cg: ChannelGraph, calib: CalibrationSet, cfg, cache: dict) -> dict[str, ChannelStats]:
    """Channel statistics of every consumer input on the calibration data (entries of ``cache`` are reused)."""
    values = {node.inputs[idx] for node, idx in cg.consumers}
    stats = {v.name: cache.get(v.name) or ChannelStats(cg.tracked[v].axis) for v in values}
    missing = {k: [r] for k, r in stats.items() if k not in cache}
    if missing:
        ActivationCollector(model, calib).collect(missing, limit=cfg.calib_samples)
    return stats


def _has_padding(node: ir.Node) -> bool:
    if node.op_type != "Conv":
        return False
    auto = _attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return any(k != 1 for k in (_attr(node, "kernel_shape") or []))
    return any(p != 0 for p in (_attr(node, "pads") or []))


def _compensate(model, cg: ChannelGraph, removed: set[int], data: CalibrationSet, cfg, *, exact: bool, cache: dict):
    """Bias deltas per consumer; in exact mode, groups that cannot be compensated exactly are kept."""
    work = []
    for node, idx in cg.consumers:
        x = node.inputs[idx]
        r = cg.removed_indices(x, removed)
        if not r.size:
            continue
        rows = importance.consumer_slices(node)
        r = r[np.any(rows[r] != 0, axis=1)]
        if r.size:
            work.append((node, x, r))
    if not work:
        return removed, {}, [], {}
    reducers = {x.name: [cache[x.name]] if x.name in cache else [ChannelStats(cg.tracked[x].axis)] for _, x, _ in work}
    missing = {k: v for k, v in reducers.items() if k not in cache}
    if missing:
        ActivationCollector(model, data).collect(missing, limit=cfg.calib_samples)
    kept: dict[int, str] = {}
    notes: list[str] = []
    plan = []
    for node, x, r in work:
        st = reducers[x.name][0]
        mean, lo, hi = st.mean[r], st.min[r], st.max[r]
        scale = max(1.0, float(np.max(np.abs(np.concatenate([st.min, st.max])))))
        constant = (hi - lo) <= 1e-5 * scale
        is_zero = constant & (np.abs(mean) <= 1e-7 * scale)
        ok = constant & (is_zero | (not _has_padding(node) and node.op_type != "ConvTranspose"))
        groups = cg.value_groups(x)
        for i, ch in enumerate(r):
            if not ok[i]:
                why = "not constant" if not constant[i] else ("read through zero padding" if _has_padding(node) else "ConvTranspose overlap")
                if exact:
                    kept.setdefault(groups[ch], f"dead channel kept: its value at {node_label(node)} is {why}; compensation would be approximate (allow_lossy)")
                else:
                    notes.append(f"{node_label(node)}: removed input channel {int(ch)} {why}, compensated with its mean")
        plan.append((node, x, r, mean, is_zero))
    if kept:
        removed = removed - set(kept)
    deltas: dict[ir.Node, np.ndarray] = {}
    for node, x, r, mean, is_zero in plan:
        groups = cg.value_groups(x)
        sel = np.array([groups[ch] in removed and not z for ch, z in zip(r, is_zero)], dtype=bool)
        if not sel.any():
            continue
        d = surgery.compensation(node, r[sel], mean[sel])
        deltas[node] = deltas.get(node, 0) + d
    if len(notes) > 20:
        notes = notes[:20] + [f"... {len(notes) - 20} more"]
    return removed, deltas, notes, kept


def spaces_json(cg: ChannelGraph) -> list[dict]:
    out = []
    for sp in cg.spaces:
        entry = {"space": sp.id, "channels": sp.channels, "members": sp.names(), "tensors": [v.name for v in sp.values]}
        entry["status"] = "blocked" if sp.blocked else "prunable"
        if sp.blocked:
            entry["blocker"] = sp.blocked
        partial = sorted({cg.groups[g].blocked for g in sp.groups if cg.groups[g].blocked})
        if partial and not sp.blocked:
            entry["partly_blocked"] = partial
        out.append(entry)
    return out


def space_table(cg: ChannelGraph) -> str:
    """``onnxcc inspect --channels``: one row per channel space."""
    from compiler.analysis import format_table

    rows = []
    for sp in cg.spaces:
        names = sp.names()
        members = ", ".join(names[:4]) + (f", +{len(names) - 4}" if len(names) > 4 else "")
        partial = sum(1 for g in sp.groups if cg.groups[g].blocked)
        status = f"blocked: {sp.blocked}" if sp.blocked else ("prunable" if not partial else f"prunable ({partial} channels blocked)")
        if not sp.blocked and any(cg.groups[g].statistics for g in sp.groups):
            status += "; lossy only (normalisation statistics)"
        rows.append([str(sp.id), str(sp.channels), members, status])
    return format_table(rows, ["space", "channels", "members", "status"])

