"""A pipeline is data: a list of (pass name, options), each verified by onnxruntime.

The CLI flags, recipe files (YAML/JSON) and the Python API all build a
:class:`Pipeline` from :class:`PassSpec` entries through the same registry.

After every pass the model runs in onnxruntime on the verification inputs:

* an **exact** pass must agree with the model before it within the model's
  own float noise (:func:`compiler.verify.exact_tolerances`: at least
  :data:`compiler.verify.EXACT_RTOL`), else :class:`VerificationError`; the
  report states the tolerance per output;
* a **lossy** pass records its error against the *original* model (what the
  user cares about), run as deployed (onnxruntime's graph optimizations on, so
  the fused integer kernels are what is measured), and, when a :class:`Budget` is given, must stay inside it,
  else :class:`BudgetError`.

Either error names the pass, and since nothing is written until the whole
pipeline has succeeded, a failed run leaves no output behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcc.compiler import verify as V
from onnxcc.compiler.calibration import CalibrationSet, feed_samples
from onnxcc.compiler.errors import BadInputError, BudgetError, ModelRejectedError, OnnxccError, VerificationError
from onnxcc.compiler.ir_utils import (
    clone_model,
    concrete_inputs,
    name_unnamed_nodes,
    needs_upgrade,
    replace_contents,
    set_shape_hint,
    shape_hint,
    upgrade_model,
)
from onnxcc.compiler.passbase import OnnxccPass, PassContext, PassReport, Skipped, make_config, missing_calibration
from onnxcc.compiler.registry import get_pass

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PassSpec:
    name: str
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Budget:
    """Largest loss a lossy pipeline may cause.

    ``max_drop``: accuracy drop with labels, else top-1 disagreement with the
    original model, in percentage points. ``min_sqnr_db``: for outputs that are
    not classifier-shaped.
    """

    max_drop: float | None = None
    min_sqnr_db: float | None = None

    def share(self, k: int, n: int) -> "Budget":
        """What the k-th of n lossy passes may have spent, cumulatively: k/n of ``max_drop`` (an
        SQNR floor holds for every pass as it is)."""
        if self.max_drop is None or n <= 1:
            return self
        return dataclasses.replace(self, max_drop=self.max_drop * k / n)

    def check(self, comp: V.Comparison) -> str | None:
        if not comp.ok_structure:
            return "outputs changed: " + "; ".join(o.problem for o in comp.outputs if o.problem)
        drop = comp.metric_drop()
        if self.max_drop is not None and drop is not None and drop > self.max_drop + 1e-9:
            return f"metric drop {drop:.2f} points exceeds the budget of {self.max_drop:g}"
        sq = comp.min_sqnr
        if self.min_sqnr_db is not None and not math.isnan(sq) and sq < self.min_sqnr_db:
            return f"SQNR {sq:.1f} dB is below the budget of {self.min_sqnr_db:g} dB"
        return None


@dataclasses.dataclass
class StepRecord:
    name: str
    exact: bool
    config: dict[str, Any]
    report: PassReport
    seconds: float
    vs_previous: V.Comparison | None
    vs_original: V.Comparison | None
    tolerance: Mapping[str, float] | None = None  # exact steps: the relative tolerance per output

    def to_json(self) -> dict[str, Any]:
        d = {
            "pass": self.name,
            "exact": self.exact,
            "config": self.config,
            "seconds": round(self.seconds, 3),
            **self.report.to_json(),
        }
        if self.tolerance is not None:
            d["exact_tolerance"] = {k: float(f"{v:.3g}") for k, v in self.tolerance.items()}
        if self.vs_previous is not None:
            d["verify_vs_previous"] = self.vs_previous.to_json()
        if self.vs_original is not None:
            d["verify_vs_original"] = self.vs_original.to_json()
        return d


@dataclasses.dataclass
class PipelineResult:
    model: ir.Model
    steps: list[StepRecord]
    verification: dict[str, Any] = dataclasses.field(default_factory=dict)  # samples, source, metric

    def to_json(self) -> dict[str, Any]:
        return {"passes": [s.to_json() for s in self.steps], **({"verification": self.verification} if self.verification else {})}


#: Bisection steps of the budget search: the mildest setting tried is 1/16 of the change asked.
BUDGET_SEARCH_STEPS = 4


def load_recipe(path: str | Path) -> list[PassSpec]:
    """Read a YAML or JSON recipe: ``{"passes": [{"name": ..., "options": {...}}, ...]}``.

    A bare list, or entries written as ``{pass-name: {options}}``, are accepted too.
    """
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"{p}: recipe not found")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise BadInputError(f"{p}: cannot parse the recipe: {str(e).splitlines()[0]}") from e
    return specs_from_data(data, str(p))


def specs_from_data(data: Any, label: str = "recipe") -> list[PassSpec]:
    if isinstance(data, Mapping):
        data = data.get("passes")
    if not isinstance(data, list) or not data:
        raise BadInputError(f"{label}: expected a non-empty list of passes")
    specs = []
    for i, entry in enumerate(data):
        if isinstance(entry, str):
            specs.append(PassSpec(entry, {}))
        elif isinstance(entry, Mapping) and "name" in entry:
            opts = entry.get("options") or {}
            if not isinstance(opts, Mapping):
                raise BadInputError(f"{label}: entry {i} options must be a mapping")
            specs.append(PassSpec(str(entry["name"]), dict(opts)))
        elif isinstance(entry, Mapping) and len(entry) == 1:
            (name, opts), = entry.items()
            specs.append(PassSpec(str(name), dict(opts or {})))
        else:
            raise BadInputError(f"{label}: entry {i} is not a pass")
    return specs


class Pipeline:
    def __init__(
        self,
        specs: Sequence[PassSpec | tuple[str, Mapping[str, Any]] | str],
        *,
        verify: bool = True,
        budget: Budget | None = None,
        verify_samples: int = 8,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        labels: np.ndarray | None = None,
        seed: int = 0,
        metric: Any = 1,
    ):
        self.specs = [self._spec(s) for s in specs]
        # Build every config first: a typo in the last pass fails before any work.
        self.passes: list[tuple[type[OnnxccPass], Any]] = []
        for spec in self.specs:
            cls = get_pass(spec.name)
            self.passes.append((cls, make_config(cls, spec.options)))
        self.verify = verify
        self.budget = budget
        self.verify_samples = verify_samples
        self.input_shapes = input_shapes
        self.labels = labels
        self.seed = seed
        self.metric = V.as_metric(metric)  # top-k accuracy with labels, or a user's score function

    @staticmethod
    def _spec(s: Any) -> PassSpec:
        if isinstance(s, PassSpec):
            return s
        if isinstance(s, str):
            return PassSpec(s, {})
        name, opts = s
        return PassSpec(name, dict(opts or {}))

    def run(
        self,
        model: ir.Model,
        calibration: CalibrationSet | None = None,
        *,
        feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
        on_step: Callable[[StepRecord, ir.Model], None] | None = None,
    ) -> PipelineResult:
        """Run every pass on ``model`` in place, verifying each; ``on_step`` sees each finished step.

        ``feeds`` are the real inputs to verify on (``--data``, see
        :func:`compiler.calibration.verification_data`); without them the calibration samples,
        else seeded random inputs."""
        if calibration is None and not any(not v.is_initializer() for v in model.graph.inputs):
            calibration = CalibrationSet.one_feed({}, "no inputs")  # nothing to calibrate on: constants only
        context = PassContext(calibration=calibration, seed=self.seed, labels=self.labels, metric=self.metric)
        for cls, _ in self.passes:
            if cls.needs_calibration and calibration is None:
                raise BadInputError(missing_calibration(cls))
        _refuse_non_finite_weights(model)
        if not shape_hint(model):
            set_shape_hint(model, concrete_shapes(self.input_shapes, calibration, feeds))
        name_unnamed_nodes(model.graph)  # passes name what they add after its layer
        if any(cls.needs_original for cls, _ in self.passes):  # a teacher: the model as given
            context.original = upgrade_model(model) if needs_upgrade(model) else clone_model(model)
        ref_orig = ref_prev = None
        tolerance: V.ExactTolerance | None = None
        labels = self.labels
        if self.verify:
            given_feeds = feeds is not None
            if feeds is None:
                feeds = V.verification_feeds(
                    model, calibration, samples=self.verify_samples, seed=self.seed, overrides=self.input_shapes
                )
            feeds = [dict(f) for f in feeds]
            if labels is not None:
                labels = np.asarray(labels)[: feed_samples(feeds)]
                context.labels = labels
            context.eval_feeds = feeds
            try:
                source = V.session_source(model)  # serialized once: the plain run and the noise run
                ref_orig = ref_prev = V.run_model(source, feeds)
            except ModelRejectedError as e:
                if given_feeds or calibration is not None:
                    raise
                ints = [v.name for v in model.graph.inputs
                        if not v.is_initializer() and v.dtype is not None and v.dtype.numpy().kind in "iub"]
                why = f" (integer input(s) {', '.join(ints)} got random values)" if ints else ""
                raise BadInputError(
                    f"{e}; onnxcc verifies on random inputs{why}: give real inputs with --data (an .npz by input name)"
                ) from e
            # NaN/Inf in part of an output is compared place by place (±inf by sign: the log-sum
            # of an empty set is -inf everywhere); an output that is NaN everywhere verifies nothing
            bad = [k for k, v in ref_orig.items()
                   if np.issubdtype(v.dtype, np.floating) and v.size and np.all(np.isnan(v))]
            if bad:
                raise BadInputError(
                    f"the input model produces only NaN in output '{bad[0]}' on the verification inputs; "
                    "nothing can be verified against it (check its weights, or give real inputs with --data)"
                )
            tolerance = V.ExactTolerance(source, feeds, ref_orig)
            del source
        steps: list[StepRecord] = []
        passes = list(self.passes)
        if needs_upgrade(model):  # first step: a verified upgrade, the unconverted model being the reference
            passes.insert(0, (UpgradeStep, UpgradeStep.Config()))
        if self.verify and feeds is not None:
            def run_nested(inner: OnnxccPass, m: ir.Model) -> PassReport:
                """An exact pass run inside another (``quantize`` → ``lower-int8``), verified on its own."""
                before = V.run_model(m, feeds)
                rep = inner(m)
                _check_exact(inner.name, before, _run_candidate(inner.name, m, feeds), tolerance=tolerance)
                return rep

            context.exact_runner = run_nested
        verification: dict[str, Any] = {}
        if self.verify and feeds is not None:
            verification = {
                "samples": feed_samples(feeds),
                "source": "data" if given_feeds else ("calibration" if calibration is not None else "random"),
                "metric": self.metric.name if labels is not None or self.metric.fn is not None else "top1 agreement",
            }

        def execute(p: OnnxccPass, m: ir.Model) -> tuple[PassReport, float]:
            t0 = time.perf_counter()
            try:
                with concrete_inputs(m) if p.concrete_shapes else contextlib.nullcontext():
                    report = p(m)
            except ir.passes.PreconditionError as e:
                raise BadInputError(f"pass '{p.name}': {e}") from e
            except ir.passes.PostconditionError as e:  # the pass's own output fails the ONNX checker
                cause = e.__cause__ if e.__cause__ is not None else e
                raise VerificationError(
                    f"pass '{p.name}' produced an invalid model: {str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__}"
                ) from e
            except ModelRejectedError as e:
                if ref_orig is None:  # not verified: the input itself may be what onnxruntime rejects
                    raise
                raise VerificationError(f"pass '{p.name}' made a model onnxruntime rejects: {e}") from e
            _check_unique_node_names(p.name, m)
            if not isinstance(report, PassReport):  # plain PassResult from a wrapped pass
                report = PassReport(report.model, report.modified)
            return report, time.perf_counter() - t0

        def check(p: OnnxccPass, m: ir.Model):
            """The step's comparisons with the model before it and with the original."""
            cand = _run_candidate(p.name, m, feeds)
            vs_prev = V.compare_outputs(ref_prev, cand)
            # a lossy pass is judged on what onnxruntime really computes: with its graph
            # optimizations the integer kernels run (on AVX2 without VNNI their int16 pair sums
            # saturate, which the unfused QDQ graph never shows)
            deployed = cand if p.exact else _run_deployed(m, feeds, cand)
            vs_orig = V.compare_outputs(ref_orig, deployed, labels, self.metric)
            if p.exact:
                _check_exact(p.name, ref_prev, cand, vs_prev, tolerance=tolerance)
            elif not vs_prev.ok_structure:
                raise VerificationError(
                    f"pass '{p.name}' changed the model's outputs: " + "; ".join(o.problem for o in vs_prev.outputs if o.problem)
                )
            return vs_prev, vs_orig, cand

        gated = self.budget is not None and self.verify and feeds is not None
        n_lossy = sum(1 for cls, config in passes if not cls(config, context).exact) if gated else 0
        k_lossy = 0
        current = None
        try:
            for cls, config in passes:
                current = cls.name
                p = cls(config, context)
                limit = None
                if gated and not p.exact:
                    k_lossy += 1
                    limit = self.budget.share(k_lossy, n_lossy)
                    if limit.max_drop is not None:
                        spent = next((st.vs_original.metric_drop() or 0.0 for st in reversed(steps) if st.vs_original is not None), 0.0)
                        config = cls.with_budget(config, limit.max_drop - spent, verification["samples"])
                        p = cls(config, context)
                snapshot = clone_model(model) if limit is not None and cls.milder(config, 0.5) is not None else None
                report, elapsed = execute(p, model)
                vs_prev = vs_orig = None
                if self.verify and feeds is not None:
                    vs_prev, vs_orig, cand = check(p, model)
                    why = limit.check(vs_orig) if limit is not None else None
                    if why and snapshot is None:
                        raise BudgetError(f"pass '{cls.name}': {why}" + _share_note(limit, self.budget))
                    if why:  # the budget drives the pass: the strongest setting that fits, by bisection
                        asked, tries, best, last_why = config, [{"strength": 1.0, "drop": _drop(vs_orig), "fits": False}], None, why
                        lo, hi = 0.0, 1.0
                        for _ in range(BUDGET_SEARCH_STEPS):
                            strength = (lo + hi) / 2
                            cfg_s = cls.milder(asked, strength)
                            trial = clone_model(snapshot)
                            p_s = cls(cfg_s, context)
                            rep_s, el_s = execute(p_s, trial)
                            elapsed += el_s
                            checked = check(p_s, trial)
                            w = limit.check(checked[1])
                            tries.append({"strength": strength, "drop": _drop(checked[1]), "fits": w is None})
                            if w is None:
                                lo, best = strength, (trial, cfg_s, p_s, rep_s, checked)
                            else:
                                hi, last_why = strength, w
                        if best is None:
                            raise BudgetError(
                                f"pass '{cls.name}': no setting fits the budget{_share_note(limit, self.budget)}: as asked, {why}; "
                                f"at 1/{2 ** BUDGET_SEARCH_STEPS} of the change, {last_why}"
                            )
                        trial, config, p, report, (vs_prev, vs_orig, cand) = best
                        replace_contents(model, trial)
                        report.model = model
                        report.stats["budget_search"] = {
                            "budget_points": limit.max_drop, "asked": _config_json(asked), "strength": lo, "tries": tries,
                        }
                        report.skipped.append(Skipped("budget", (
                            f"as asked, {why}: weakened to {lo:g} of the change ({_config_change(asked, config)}), "
                            f"drop {_drop(vs_orig):.2f} points")))
                    ref_prev = cand
                steps.append(
                    StepRecord(cls.name, p.exact, _config_json(config), report, elapsed, vs_prev, vs_orig,
                               dict(tolerance.values) if tolerance is not None and p.exact and vs_prev is not None else None)
                )
                logger.info("%s: %d changed, %d skipped (%.2fs)", cls.name, len(report.changed), len(report.skipped), elapsed)
                if on_step is not None:
                    on_step(steps[-1], model)
        except OnnxccError as e:  # the report of a failed run names the pass and keeps the steps done
            e.failed_pass = current
            e.completed_steps = list(steps)
            raise
        return PipelineResult(model, steps, verification)


class UpgradeStep(OnnxccPass):
    """Not a registered pass: the pipeline's own first step for a model at an old opset or IR < 4
    (ir_utils.upgrade_model), verified like any exact pass."""

    name = "upgrade"
    exact = True
    concrete_shapes = False

    @dataclasses.dataclass(frozen=True)
    class Config:
        pass

    def call(self, model: ir.Model) -> PassReport:
        why = needs_upgrade(model)
        replace_contents(model, upgrade_model(model))
        logger.warning("upgraded the model first: %s", "; ".join(why))
        return PassReport(model, True, changed=why)


def concrete_shapes(
    overrides: Mapping[str, Sequence[int]] | None,
    calibration: CalibrationSet | None,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes for dims a model leaves dynamic: ``--input-shape`` first, else the
    first verification feed's shapes (``--data``), else one calibration sample's shape."""
    shapes = {k: tuple(int(d) for d in v) for k, v in (overrides or {}).items()}
    for name, arr in (feeds[0] if feeds else {}).items():
        shapes.setdefault(name, tuple(np.shape(arr)))
    if calibration is not None:
        for name, arr in calibration.arrays.items():
            shapes.setdefault(name, tuple(arr.shape[1:]) if calibration.whole_feed else (1,) + tuple(arr.shape[1:]))
    return shapes


def _run_deployed(model: ir.Model, feeds, fallback: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    """Outputs with onnxruntime's graph optimizations on (as deployed); ``fallback`` (the unfused
    run) when onnxruntime refuses to optimize this graph."""
    try:
        return V.run_model(model, feeds, optimize=True)
    except BadInputError:
        return fallback


def _check_unique_node_names(name: str, model: ir.Model) -> None:
    """Node names stay unique after every pass (onnxruntime refuses a graph where two nodes share
    one): a duplicate is the pass's bug, reported as its error, never as bad input."""
    seen: set[str] = set()
    for node in model.graph.all_nodes():
        if node.name and node.name in seen:
            raise VerificationError(f"pass '{name}' left two nodes named '{node.name}'")
        if node.name:
            seen.add(node.name)


def _run_candidate(name: str, model: ir.Model, feeds) -> dict[str, np.ndarray]:
    try:
        return V.run_model(model, feeds)
    except BadInputError as e:  # the input ran: a model onnxruntime rejects now is this pass's fault
        raise VerificationError(f"pass '{name}' produced a model onnxruntime rejects: {e}") from e


def _check_exact(
    name: str,
    before: Mapping[str, np.ndarray],
    after: Mapping[str, np.ndarray],
    comp: V.Comparison | None = None,
    *,
    tolerance: V.ExactTolerance | None = None,
) -> None:
    """An exact pass must agree with its input to the model's float noise (per output
    ``tolerance``, at least :data:`verify.EXACT_RTOL`; measured the first time the floor is exceeded)."""
    comp = comp if comp is not None else V.compare_outputs(before, after)

    def limits() -> dict[str, float]:
        tol = tolerance.values if tolerance is not None else {}
        return {o.name: tol.get(o.name, V.EXACT_RTOL) for o in comp.outputs}

    if not comp.within(limits()) and not (tolerance is not None and tolerance.widen() and comp.within(limits())):
        lim = limits()

        def excess(o: V.OutputMetrics) -> float:
            return math.inf if (o.problem or math.isnan(o.rel)) else o.rel / lim[o.name]

        worst = max(comp.outputs, key=excess)
        limit = lim[worst.name]
        detail = worst.problem or f"relative error {worst.rel:.3g} on output '{worst.name}'"
        raise VerificationError(f"pass '{name}' is exact but changed the model's outputs: {detail} (tolerance {limit:.3g})")


_WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization", "LayerNormalization", "PRelu"}


def _refuse_non_finite_weights(model: ir.Model) -> None:
    """NaN/Inf in a layer's weights make every output meaningless: refuse up front, naming the layer."""
    from onnxcc.compiler.ir_utils import const_array, node_label

    for node in model.graph.all_nodes():
        if node.op_type not in _WEIGHTED:
            continue
        for v in node.inputs[1:]:
            arr = const_array(v) if v is not None else None
            # min and max are NaN/Inf when any element is (no boolean copy of a large weight)
            if arr is not None and np.issubdtype(arr.dtype, np.floating) and arr.size and not (
                    np.isfinite(arr.min()) and np.isfinite(arr.max())):
                raise BadInputError(f"weight '{v.name}' of layer {node_label(node)} contains NaN/Inf")


def _drop(comp: V.Comparison) -> float | None:
    d = comp.metric_drop()
    return None if d is None else round(d, 3)


def _share_note(limit: Budget, budget: Budget) -> str:
    return "" if limit.max_drop == budget.max_drop else f" (this pass's share: {limit.max_drop:g} of {budget.max_drop:g} points, cumulative)"


def _config_change(asked: Any, got: Any) -> str:
    a, g = _config_json(asked), _config_json(got)
    return ", ".join(f"{k} {a[k]} -> {g[k]}" for k in a if a[k] != g[k]) or "same options"


def _config_json(config: Any) -> dict[str, Any]:
    d = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
