"""One structured-pruning cut with the channel graph: analyse, decide, compensate, cut, refit.

1. normalise (:func:`prepare`): constants lifted to initializers, nodes sorted, shapes inferred;
2. analyse: :class:`~onnxcc.passes.pruning.dependency.ChannelGraph` (groups, spaces, blockers);
3. decide: importance per group (:mod:`onnxcc.passes.pruning.importance`), then a
   strategy (uniform ratio per space, or global ranking with a per-space cap,
   ``round_to``, per-layer ratios and exclusions by node-name pattern);
   ``criterion=zero`` removes only provably dead groups;
4. compensate: removed channels whose activation is not zero are folded into
   the consumer's bias. For dead channels the activation is a constant, read
   from onnxruntime on seeded random inputs (exact unless the consumer
   zero-pads it); for channels removed by importance, the calibration mean;
5. cut: :func:`onnxcc.passes.pruning.surgery.apply`, shapes re-inferred; with
   ``reconstruct``, the layers after the cut are refit by least squares.

``criterion=zero`` is exact: a dead group whose removal cannot be compensated
exactly (a nonzero constant read through zero padding, a LayerNorm over the
channels) is kept and reported, unless ``allow_lossy`` is set.

The ``prune`` pass (:mod:`onnxcc.passes.pruning.prune`) calls :func:`prune_once`
directly, or through the automatic-ratio driver (:mod:`onnxcc.passes.pruning.auto`)
above the sensitivity sweep (:mod:`onnxcc.passes.pruning.sensitivity`), which
itself makes single cuts with :func:`prune_once`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxcc.compiler.calibration import ActivationCollector, CalibrationSet, ChannelStats
from onnxcc.compiler.errors import BadInputError
from onnxcc.compiler.ir_utils import attr, clone_model, infer_shapes, name_unnamed_nodes, node_label
from onnxcc.compiler.passbase import PassContext, PassReport, Skipped
from onnxcc.compiler import weights as W
from onnxcc.passes.pruning import importance, surgery
from onnxcc.passes.pruning.dependency import ChannelGraph

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Options of the ``prune`` pass (``PrunePass.Config``)."""

    ratio: float = dataclasses.field(default=0.5, metadata={"help": "fraction of channels to remove per space (or overall with global_ranking)"})
    criterion: Literal["l1", "l2", "bn_scale", "fpgm", "activation", "zero", "reconstruction"] = dataclasses.field(
        default="l1", metadata={"help": "importance: l1, l2, bn_scale, fpgm, activation / reconstruction (need calib) or zero (lossless)"}
    )
    global_ranking: bool = dataclasses.field(default=False, metadata={"help": "rank channels across spaces instead of a uniform ratio"})
    max_space_ratio: float = dataclasses.field(default=0.9, metadata={"help": "with global ranking: most any one space may lose"})
    round_to: int = dataclasses.field(default=1, metadata={"help": "keep channel counts a multiple of this"})
    grouped: Literal["auto", "within", "whole"] = dataclasses.field(
        default="auto", metadata={"help": "grouped convs: within (the same positions from every group), whole (whole groups); auto: whole for criterion=zero, else within"}
    )
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

def grouped_mode(cfg: PruneConfig) -> str:
    """How grouped convs lose channels (see :class:`ChannelGraph`): a framework's structured masks
    zero whole groups, which ``criterion=zero`` removes exactly; a ranked cut narrows every group."""
    return cfg.grouped if cfg.grouped != "auto" else ("whole" if cfg.criterion == "zero" else "within")


def is_exact(cfg: PruneConfig) -> bool:
    """Removing only provably dead channels, compensated exactly, is an exact rewrite."""
    return cfg.criterion == "zero" and not cfg.allow_lossy


def prune_once(model: ir.Model, cfg: PruneConfig, context: PassContext, ratio: float, space_ratio: tuple[str, ...]) -> PassReport:
    """One analysis + cut + compensation/reconstruction at a uniform ``ratio`` with per-space overrides."""
    exact = is_exact(cfg)
    prepare(model)
    cg = ChannelGraph(model, grouped=grouped_mode(cfg))
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
    calib = context.calibration
    # Calibration statistics of consumer inputs of *this* model: what a caller (sensitivity) computed
    # once, plus what this cut collects, so the activation criterion and compensation share one run.
    calib_stats = dict(context.stats_cache)

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
    data = calib if calib is not None else (_random_set(model) if cfg.criterion == "zero" and removed else None)
    if removed and (cfg.compensate or cfg.criterion == "zero") and data is not None:
        cached = calib_stats if data is calib else {}  # cached stats are calibration statistics
        removed, deltas, lossy_notes, more_kept = _compensate(model, cg, removed, data, cfg, exact=exact, cache=cached)
        why_kept.update(more_kept)
    elif removed and cfg.criterion != "zero":
        lossy_notes.append("no calibration data: removed channels' mean activations not compensated")

    original = clone_model(model) if cfg.reconstruct and removed else None
    changed = surgery.apply(cg, removed, deltas)
    infer_shapes(model)
    common.RemoveUnusedNodesPass()(model)
    recon_stats = None
    if original is not None:
        from onnxcc.passes.refit import ReconstructOptions, reconstruct

        layers = {}
        for node, idx in cg.consumers:
            if cg.removed_indices(node.inputs[idx], removed).size:
                out = node.outputs[0]
                gone = cg.removed_indices(out, removed) if out in cg.tracked else np.zeros(0, np.int64)
                layers[node.name] = np.setdiff1d(np.arange(cg.tracked[out].size), gone) if out in cg.tracked else None
        opts = ReconstructOptions(samples=cfg.calib_samples, ridge=cfg.ridge, seed=context.seed)
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


def prepare(model: ir.Model) -> None:
    """What the analysis needs: weights as initializers, sorted nodes, named nodes, fresh shapes."""
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    name_unnamed_nodes(model.graph)
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


def _random_set(model: ir.Model) -> CalibrationSet | None:
    """Seeded random inputs as a sample set for the zero criterion's compensation; None when the
    inputs have no sample axis to stack on (scalars), or there are none."""
    from onnxcc.compiler.verify import verification_feeds

    feeds = verification_feeds(model, None, samples=4, seed=1234)
    if not feeds or not feeds[0] or any(np.ndim(a) == 0 for f in feeds for a in f.values()):
        return None
    try:
        return CalibrationSet({k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}, source="random inputs")
    except BadInputError:  # inputs without a shared sample axis (an operator test's tensors)
        return None


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
    auto = attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return any(k != 1 for k in (attr(node, "kernel_shape") or []))
    return any(p != 0 for p in (attr(node, "pads") or []))


def _compensate(model, cg: ChannelGraph, removed: set[int], data: CalibrationSet, cfg, *, exact: bool, cache: dict):
    """Bias deltas per consumer; in exact mode, groups that cannot be compensated exactly are kept."""
    work = []
    for node, idx in cg.consumers:
        x = node.inputs[idx]
        r = cg.removed_indices(x, removed)
        if not r.size:
            continue
        rows = W.by_input(node).astype(np.float64)
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
        d = W.input_contribution(node, r[sel], mean[sel])
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
    from onnxcc.compiler.analysis import format_table

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

