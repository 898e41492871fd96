"""``onnxcc search``: the best compressed model for a target under an accuracy budget.

    from onnxcc.compiler.search import search
    res = search("net.onnx", "macs=0.4", calibration="calib.npy", data="eval.npy", labels="labels.npy",
                 budget=1.0, trials=32, workers=2)
    res.save("net.small.onnx"); res.report["search"]["pareto"]

* **Search space**, built from the model: a prune ratio per channel space (the spaces
  sensitivity analysis finds, any ratio in 0 … :data:`MAX_RATIO`), a factorization method and rank (or
  none) with the :data:`PER_LAYER` layers of most MACs each choosing its own rank, the global one
  or none, INT8 or float (targets that INT8 changes: latency, file) with those layers each
  choosing INT8 or float, sparsity and codebook bits (file target). The first trial is exactly
  today's greedy allocation (``prune --target-macs T --reconstruct`` under the same budget, its
  per-space ratios read back from the pass), the next ones the shipped recipes' choices in this
  space (:func:`recipe_trials`), so the search starts where the greedy method and the recipes end
  and its best is never worse than any of them.
* **Every trial is an ordinary verified pipeline** (:func:`~compiler.api.compile_model`) under the
  budget, which also drives its lossy passes: a trial's recorded recipe is what it really ran
  (after the budget weakened a setting) and gives the same model with ``onnxcc compile --recipe``.
  A trial that fails (no setting fits, a broken graph) is a failed trial with its message.
* **Algorithm**: Optuna's multi-objective TPE (or NSGA-II) on (target ratio, metric drop), seeded; the Pareto
  front is reported. The study lives in SQLite (``--study``, by default next to OUT), or any
  storage URL Optuna supports when several machines share it, so a killed search resumes: the
  trials already finished count towards ``trials``; a trial whose worker died (no heartbeat for
  :data:`GRACE_S`) is failed and retried once with the same parameters.
* **Executors**: in this process (``workers=1``), a local process pool (each worker one process
  with its own onnxruntime threads, so latency is measured fairly), or Ray tasks on a cluster
  (``ray="auto"`` or an address; ``ray_resource`` names a custom resource of the nodes that will
  serve, so latency is measured there). Optuna and Ray are optional extras (``search``, ``ray``).
* **The result**: the trial inside the budget that reaches the target with the smallest drop
  (none reaches it: the one with the smallest ratio), recompiled from its recipe and written.
"""

from __future__ import annotations

import dataclasses
import glob  # glob.escape: node names as the passes' fnmatch patterns, matching only themselves
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from onnxcc.compiler.errors import BadInputError, BudgetError, OnnxccError

logger = logging.getLogger(__name__)

TARGETS = ("macs", "params", "latency", "file")
MAX_RATIO = 0.9  # as prune --target-macs's default cap per space
FACTORIZE = ("none", "svd", "spatial-svd", "tucker")
LAYER_RANKS = (None, 0.0, 0.3, 0.5, 0.7)  # per-layer factorization: None takes the global rank, 0 leaves the layer alone
PER_LAYER = 8  # per-layer factorization and INT8 choices for the layers with the most MACs
HEARTBEAT_S = 10
# Ray's switch for "this is not a multi-machine cluster": every Ray process binds and dials 127.0.0.1
RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
GRACE_S = 30


@dataclasses.dataclass(frozen=True)
class Target:
    kind: str
    value: float

    @property
    def key(self) -> str:
        return {"file": "file_bytes", "latency": "latency_ms"}.get(self.kind, self.kind)


def parse_target(spec: str | Target) -> Target:
    """``macs=0.4``, ``params=0.5``, ``latency=0.5`` or ``file=0.25``: the ratio to the input."""
    if isinstance(spec, Target):
        return spec
    kind, sep, value = str(spec).partition("=")
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not sep or kind not in TARGETS or not 0 < v < 1:
        raise BadInputError(f"--target {spec}: expected one of {', '.join(t + '=R' for t in TARGETS)} with 0 < R < 1")
    return Target(kind, v)


@dataclasses.dataclass
class Space:
    """What a trial may choose for one model and target (see the module docstring)."""

    target: Target
    spaces: list[str]  # channel-space keys (tensors only that space owns), in the order found
    seed: dict[str, Any]  # the first trial's parameters (search() puts the greedy allocation's ratios in)
    # the shipped recipes' choices inside this space, as trials after the first (see recipe_trials)
    recipes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    calibrated: bool = True
    factorize: tuple[str, ...] = FACTORIZE[1:]  # methods a trial may pick (besides none)
    layers: list[str] = dataclasses.field(default_factory=list)  # node names with per-layer choices

    def sample(self, trial: Any) -> list[tuple[str, dict[str, Any]]]:
        """A recipe from an Optuna trial's choices."""
        recipe: list[tuple[str, dict[str, Any]]] = [("fold", {})]
        ratios = {key: trial.suggest_float(f"prune:{key}", 0.0, MAX_RATIO) for key in self.spaces}
        cut = tuple(f"{k}={r:.6g}" for k, r in ratios.items() if r >= 1e-3)
        if cut:
            recipe.append(("prune", {"ratio": 0.0, "space_ratio": cut, "reconstruct": self.calibrated}))
        method = trial.suggest_categorical("factorize", ("none", *self.factorize)) if self.factorize else "none"
        if method != "none":
            rank = trial.suggest_float("factorize_rank", 0.2, 0.8, step=0.1)
            # the heaviest layers choose their own rank, or none; the rest take ``rank``
            own = {name: trial.suggest_categorical(f"factorize:{name}", LAYER_RANKS) for name in self.layers}
            opts: dict[str, Any] = {"method": method, "rank": rank}
            if any(r for r in own.values()):
                opts["layer_rank"] = tuple(f"{glob.escape(n)}={r}" for n, r in own.items() if r)
            if any(r == 0 for r in own.values()):
                opts["exclude"] = tuple(glob.escape(n) for n, r in own.items() if r == 0)
            recipe.append(("factorize", opts))
        if cut or method != "none":
            recipe.append(("fold", {}))
        if self.target.kind == "file":
            sparsity = trial.suggest_float("sparsity", 0.0, 0.8, step=0.1)
            if sparsity > 0:
                recipe.append(("sparsify", {"sparsity": sparsity, "reconstruct": self.calibrated}))
            storage = trial.suggest_categorical("storage", ["float", "int8", "codebook4", "codebook6"])
            if storage.startswith("codebook"):
                recipe.append(("codebook", {"bits": int(storage[8:])}))
            elif storage == "int8":
                recipe.append(self._quantize(trial))
        elif self.target.kind == "latency":
            if trial.suggest_categorical("quantize", ["float", "int8"]) == "int8":
                recipe.append(self._quantize(trial))
        return recipe

    def _quantize(self, trial: Any) -> tuple[str, dict[str, Any]]:
        """INT8, with each of the heaviest layers choosing INT8 or float (a factorized layer's
        pieces, ``NAME_f1``..., follow their layer)."""
        opts: dict[str, Any] = {"bias_correction": True, "force_int8": True}  # the trial measures: no prediction
        kept = [name for name in self.layers if not trial.suggest_categorical(f"int8:{name}", (True, False))]
        if kept:
            opts["exclude"] = tuple(p for name in kept for p in (glob.escape(name), glob.escape(name) + "_f[0-9]*"))
        return ("quantize", opts)


def heavy_layers(model: Any, count: int = PER_LAYER) -> list[str]:
    """Names of the ``count`` weighted layers with the most MACs (ties: graph order)."""
    from onnxcc.compiler.analysis import analyze

    layers = [(layer.macs or 0, i, layer.name) for i, layer in enumerate(analyze(model, stats=False).layers)
              if layer.op in ("Conv", "ConvTranspose", "Gemm", "MatMul") and layer.name and layer.params]
    return [name for _, _, name in sorted(layers, key=lambda t: (-t[0], t[1]))[:count]]


def build_space(model: Any, target: Target, calib: Any = None, *, factorize: Sequence[str] = FACTORIZE[1:]) -> Space:
    """The channel spaces and heaviest layers of the folded model; the seed cuts nothing (see
    :func:`greedy_trial` for the first trial's ratios)."""
    from onnxcc.compiler.ir_utils import clone_model
    from onnxcc.compiler.pipeline import Pipeline

    m = clone_model(model)
    Pipeline(["fold"], verify=False).run(m)
    keys = _space_keys(m)
    seed: dict[str, Any] = {f"prune:{k}": 0.0 for k in keys}
    if factorize:
        seed["factorize"] = "none"
    layers = heavy_layers(m)
    if target.kind == "file":
        seed.update(sparsity=0.0, storage="int8")
    elif target.kind == "latency":
        seed["quantize"] = "int8"
    if target.kind in ("file", "latency"):
        seed.update({f"int8:{name}": True for name in layers})
    space = Space(target, keys, seed, calibrated=calib is not None, factorize=tuple(factorize), layers=layers)
    space.recipes = recipe_trials(space)
    return space


def recipe_trials(space: Space) -> list[dict[str, Any]]:
    """The shipped recipes (``compiler/recipes``) as trials of ``space``: each one's factorization
    (method and rank, every layer at that rank) and, for latency and file targets, its INT8, with
    nothing pruned. Enqueued after the greedy allocation, so the search's best is never worse than
    a shipped recipe's choices either; recipes that change nothing this space can say (lossless)
    or that repeat an earlier trial are left out."""
    from onnxcc.compiler.api import resolve_recipe, shipped_recipes

    out: list[dict[str, Any]] = []
    for name in shipped_recipes():
        params = dict(space.seed)
        changed = False
        for spec in resolve_recipe(name):
            o = spec.options
            if spec.name == "factorize" and o.get("method", "svd") in space.factorize and "rank" in o:
                rank = round(min(0.8, max(0.2, float(o["rank"]))), 1)
                params.update({"factorize": o.get("method", "svd"), "factorize_rank": rank})
                params.update({f"factorize:{n}": None for n in space.layers})
                changed = True
            elif spec.name == "quantize" and space.target.kind in ("latency", "file"):
                params.update({"quantize": "int8"} if space.target.kind == "latency" else {"storage": "int8"})
                params.update({f"int8:{n}": True for n in space.layers})
                changed = True
        if changed and params != space.seed and params not in out:
            out.append(params)
    return out


def greedy_trial(model: Any, space: Space, *, calibration: Any, data: Any, labels: Any, metric: Any,
                 budget: float | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Today's greedy allocation as the first trial: ``prune --target-macs`` (``--target-params``
    for a params target; MACs to max(T, 0.3) for latency and file targets, which then quantize)
    with reconstruction, compiled once under the budget. Returns the trial's parameters (the
    per-space ratios the pass chose) and, for MACs and params targets, its outcome (the trial
    needs no second compile); without calibration data, or when the greedy cut fails, the seed
    cuts nothing."""
    params = dict(space.seed)
    if calibration is None or not space.spaces:
        return params, None
    target = space.target
    option = "target_params" if target.kind == "params" else "target_macs"
    goal = target.value if target.kind in ("macs", "params") else max(target.value, 0.3)
    recipe = [("fold", {}), ("prune", {option: goal, "reconstruct": True}), ("fold", {})]
    try:
        out = _compile_trial(model, recipe, target, calibration=calibration, data=data, labels=labels, metric=metric,
                             budget=budget, threads=1)
    except OnnxccError as e:
        logger.warning("search: the greedy allocation failed (%s): the first trial cuts nothing", str(e).splitlines()[0])
        return params, None
    ratios = out.pop("ratios")
    params.update({f"prune:{k}": min(MAX_RATIO, max(0.0, float(r))) for k, r in ratios.items() if f"prune:{k}" in params})
    return params, (out if target.kind in ("macs", "params") else None)


@dataclasses.dataclass
class Job:
    """Everything a worker needs, picklable: paths (or arrays) rather than loaded objects."""

    model: Any
    target: Target
    calibration: Any
    data: Any
    labels: Any
    metric: Any
    budget: float | None
    space: Space
    storage: str
    study_name: str
    trials: int
    time_limit_s: float | None
    seed: int
    threads: int
    sampler: str = "tpe"
    first: tuple[dict[str, Any], dict[str, Any]] | None = None  # the greedy trial's (parameters, outcome), already compiled


def run_trial(job: Job, recipe: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """One verified compile of ``recipe``: its ratio to the input on the target, its metric drop,
    and the recipe as it ran (each pass's config after the budget search)."""
    out = _compile_trial(job.model, recipe, job.target, calibration=job.calibration, data=job.data, labels=job.labels,
                         metric=job.metric, budget=job.budget, threads=job.threads)
    out.pop("ratios")
    return out


def _compile_trial(model: Any, recipe: Sequence[tuple[str, Mapping[str, Any]]], target: Target, *, calibration: Any, data: Any,
                   labels: Any, metric: Any, budget: float | None, threads: int) -> dict[str, Any]:
    from onnxcc.compiler.api import compile_model

    t0 = time.perf_counter()
    res = compile_model(model, list(recipe), calibration=calibration, data=data, labels=labels,
                        metric=metric, budget=budget, measure_latency=target.kind == "latency",
                        latency_threads=threads)
    rep = res.report
    key = target.key
    ratio = rep["after"][key] / rep["before"][key] if rep["before"].get(key) else 1.0
    drop = (rep.get("metric") or {}).get("drop_points") or 0.0
    used = [{"name": p["pass"], "options": _options(p)} for p in rep["passes"] if p["pass"] != "upgrade"]
    ratios: dict[str, float] = {}
    for p in rep["passes"]:  # the per-space ratios an automatic prune chose (the greedy trial's parameters)
        for step in (p.get("stats") or {}).get("steps") or ():
            ratios.update(step.get("ratios") or {})
    return {"ratio": round(float(ratio), 5), "drop": round(float(drop), 4), "recipe": used,
            "seconds": round(time.perf_counter() - t0, 2), "after": {k: rep["after"][k] for k in ("params", "macs", "file_bytes", "latency_ms")},
            "ratios": ratios}


def _options(step: Mapping[str, Any]) -> dict[str, Any]:
    """A step's config as recipe options: only what differs from the pass's defaults."""
    from onnxcc.compiler.passbase import config_fields
    from onnxcc.compiler.registry import get_pass

    defaults = {name: default for name, _, default, _ in config_fields(get_pass(step["pass"]))}
    norm = {k: (list(v) if isinstance(v, tuple) else v) for k, v in defaults.items()}
    return {k: v for k, v in step["config"].items() if norm.get(k, object()) != v}


def study_storage(url: str) -> Any:
    """The study's storage, with heartbeats: a trial whose worker died is failed after
    :data:`GRACE_S` and retried once with the same parameters."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                      engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {})


def _objective(job: Job, trial_runner: Callable[[Job, Any], dict[str, Any]]):
    def objective(trial: Any) -> tuple[float, float]:
        recipe = job.space.sample(trial)
        trial.set_user_attr("asked", [{"name": n, "options": o} for n, o in recipe])
        if job.first is not None and trial.number == 0 and trial.params == job.first[0]:
            out = job.first[1]  # the greedy trial, compiled before the workers started
        else:
            try:
                out = trial_runner(job, recipe)
            except OnnxccError as e:
                trial.set_user_attr("error", f"{type(e).__name__}: {e}")
                raise
        for k, v in out.items():
            trial.set_user_attr(k, v)
        return out["ratio"], out["drop"]

    return objective


def work(job: Job, index: int = 0, trial_runner: Callable | None = None) -> None:
    """Worker ``index`` (its sampler is seeded ``seed + index``): run trials of the shared study
    until it holds ``job.trials`` finished ones (or the time limit passes)."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", str(job.threads))
    study = optuna.load_study(study_name=job.study_name, storage=study_storage(job.storage),
                              sampler=make_sampler(job.sampler, job.seed + index, job.trials))
    done = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
    if sum(t.state in done for t in study.get_trials(deepcopy=False)) < job.trials:
        study.optimize(_objective(job, trial_runner or run_trial), timeout=job.time_limit_s, catch=(OnnxccError,),
                       callbacks=[MaxTrialsCallback(job.trials, states=done)], gc_after_trial=True)


def _first_trial(job: Job, trial_runner: Callable[[Job, Any], dict[str, Any]]) -> None:
    """The enqueued first trial, in this process (its outcome is usually already compiled)."""
    import optuna

    study = optuna.load_study(study_name=job.study_name, storage=study_storage(job.storage),
                              sampler=make_sampler(job.sampler, job.seed, job.trials))
    study.optimize(_objective(job, trial_runner), n_trials=1, catch=(OnnxccError,), gc_after_trial=True)


def make_sampler(name: str, seed: int, trials: int = 40) -> Any:
    """Optuna's multi-objective TPE (``tpe``) or NSGA-II (``nsga2``, better with hundreds of trials), seeded.
    TPE draws a quarter of the trials at random (Optuna's 10 at most) before it models the
    good ones: with Optuna's default of 10, a search of 8 trials would be all random draws."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=max(2, min(10, trials // 4)))
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise BadInputError(f"sampler: expected tpe or nsga2, got {name!r}")


def _work_remote(job: Job, index: int) -> None:
    work(job, index)


@dataclasses.dataclass
class SearchResult:
    model: Any
    report: dict[str, Any]
    result: Any = None  # the best model's PipelineResult (its verified steps)
    before: Any = None  # the input model, for the HTML report

    def save(self, path: str | os.PathLike) -> None:
        from onnxcc.compiler.ir_utils import save_model

        save_model(self.model, path)


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both (ratio, drop), lower being better."""
    front = []
    for i, (r, d) in enumerate(points):
        if not any((r2 <= r and d2 <= d) and (r2 < r or d2 < d) for j, (r2, d2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def choose(trials: Sequence[Mapping[str, Any]], target: Target, budget: float | None) -> Mapping[str, Any] | None:
    """The trial inside the budget that reaches the target with the smallest drop (ties: the
    smaller ratio); when none reaches it, the one with the smallest ratio."""
    ok = [t for t in trials if budget is None or t["drop"] <= budget + 1e-9]
    if not ok:
        return None
    reached = [t for t in ok if t["ratio"] <= target.value]
    if reached:
        return min(reached, key=lambda t: (t["drop"], t["ratio"], t["number"]))
    return min(ok, key=lambda t: (t["ratio"], t["drop"], t["number"]))


def search(
    model: Any,
    target: str | Target,
    *,
    calibration: Any = None,
    data: Any = None,
    labels: Any = None,
    metric: Any = None,
    budget: float | None = None,
    trials: int = 32,
    time_limit_min: float | None = None,
    workers: int = 1,
    ray: str | None = None,
    ray_resource: str | None = None,
    study: str | os.PathLike | None = None,
    seed: int = 0,
    threads: int | None = None,
    factorize: Sequence[str] = FACTORIZE[1:],
    sampler: str = "tpe",
    trial_runner: Callable | None = None,
) -> SearchResult:
    """Search (see the module docstring); ``study`` is a SQLite file path or an Optuna storage
    URL (default: a temporary file, so nothing resumes). ``threads``: onnxruntime threads per
    trial (default: 2 with one worker, else 1). ``trial_runner`` replaces :func:`run_trial`
    (tests inject failures through it; in-process workers only)."""
    try:
        import optuna
    except ImportError as e:
        raise BadInputError("search needs Optuna: pip install 'onnxcc[search]'") from e
    from onnxcc.compiler.api import as_calibration, compile_model
    from onnxcc.compiler.ir_utils import load_model
    import tempfile

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    target = parse_target(target)
    if trials < 1 or workers < 1:
        raise BadInputError("--trials and --workers must be at least 1")
    if workers > 1 and trial_runner is not None and ray is None:
        raise BadInputError("trial_runner works with in-process trials only (workers=1)")
    bad = [m for m in factorize if m not in FACTORIZE[1:]]
    if bad:
        raise BadInputError(f"factorize: unknown method {bad[0]} (methods: {', '.join(FACTORIZE[1:])})")
    make_sampler(sampler, seed, trials)  # a bad name fails before any study is created
    loaded = load_model(model) if not hasattr(model, "graph") else model
    calib = as_calibration(calibration, loaded)
    if calib is not None:
        calib.validate(loaded)
    tmp = None
    if study is None:
        tmp = tempfile.TemporaryDirectory(prefix="onnxcc-search-")
        study = Path(tmp.name) / "study.db"
    url = str(study) if "://" in str(study) else f"sqlite:///{Path(study).resolve()}"
    name = f"onnxcc-{target.kind}"
    directions = ["minimize", "minimize"]
    st = optuna.create_study(study_name=name, storage=study_storage(url), directions=directions, load_if_exists=True,
                             sampler=make_sampler(sampler, seed, trials))
    t0 = time.perf_counter()
    space = build_space(loaded, target, calib, factorize=factorize)
    first = None
    fresh = not st.get_trials(deepcopy=False)
    if fresh:  # the greedy allocation first (a resumed study has it)
        params, out = greedy_trial(model if isinstance(model, (str, os.PathLike)) else loaded, space, calibration=calib,
                                   data=data, labels=labels, metric=metric, budget=budget)
        st.enqueue_trial(params, skip_if_exists=True)
        first = (params, out) if out is not None else None
        extras = space.recipes[:max(0, trials - 1)]
        for extra in extras:  # then the shipped recipes' choices
            st.enqueue_trial(extra, skip_if_exists=True)
    job = Job(model if isinstance(model, (str, os.PathLike)) else _bytes(loaded), target, calibration if calibration is None or isinstance(calibration, (str, os.PathLike)) else calib,
              data, labels, metric, budget, space, url, name, trials, time_limit_min * 60 if time_limit_min else None, seed,
              threads or (2 if workers == 1 and ray is None else 1), sampler, first)
    if fresh and not (workers == 1 and ray is None):
        # The enqueued trials finish before the workers start: two workers on one SQLite study
        # can both pop the same enqueued trial (Optuna's pop is not atomic there) and the second
        # then fails with "Cannot tell a COMPLETE trial". The greedy trial (already compiled)
        # is told here; the recipes' trials run one after another (as one Ray task on a cluster).
        _first_trial(job, trial_runner or run_trial)
        job = dataclasses.replace(job, first=None)
        if extras:
            map_parallel(_work_remote, [(dataclasses.replace(job, trials=1 + len(extras)), 0)], workers=1, ray=ray,
                         ray_resource=ray_resource, threads=job.threads)
    if workers == 1 and ray is None:
        work(job, 0, trial_runner)  # in this process: trial_runner may be a closure
    else:
        map_parallel(_work_remote, [(job, i) for i in range(workers)], workers=workers, ray=ray, ray_resource=ray_resource,
                     threads=job.threads)
    st = optuna.load_study(study_name=name, storage=study_storage(url))
    rows = [_row(t) for t in st.get_trials(deepcopy=False)]
    finished = [r for r in rows if r["state"] == "COMPLETE"]
    best = choose(finished, target, budget)
    if best is None:
        failed = [r for r in rows if r["state"] == "FAIL"]
        why = failed[-1].get("error") if failed else "no trial finished"
        raise BudgetError(f"search: no trial fits the budget ({len(rows)} trials; last failure: {why})")
    res = compile_model(model if isinstance(model, (str, os.PathLike)) else loaded, [(s["name"], s["options"]) for s in best["recipe"]],
                        calibration=calib, data=data, labels=labels, metric=metric, budget=budget,
                        measure_latency=True)
    front = pareto([(r["ratio"], r["drop"]) for r in finished])
    res.report["search"] = {
        "target": {"kind": target.kind, "ratio": target.value}, "budget": budget, "study": url, "trials": rows,
        "pareto": [finished[i]["number"] for i in front], "best": best["number"], "reached": best["ratio"] <= target.value,
        "seconds": round(time.perf_counter() - t0, 2), "workers": workers, "executor": "ray" if ray else ("process" if workers > 1 else "in-process"),
        "spaces": len(space.spaces),
    }
    if tmp is not None:
        tmp.cleanup()
    return SearchResult(res.model, res.report, res.result, res.before)


def _bytes(model: Any) -> bytes:
    import onnx_ir as ir

    return ir.to_proto(model).SerializeToString()


def _row(t: Any) -> dict[str, Any]:
    attrs = dict(t.user_attrs)
    row = {"number": t.number, "state": t.state.name, "params": dict(t.params)}
    for k in ("ratio", "drop", "recipe", "seconds", "after", "error", "asked"):
        if k in attrs:
            row[k] = attrs[k]
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
    if retried is not None:
        row["retry_of"] = retried
    return row


def _space_keys(model: Any) -> list[str]:
    """The prunable channel spaces of a folded model, by key, in the order sensitivity analysis
    measures them (the model is not modified)."""
    from onnxcc.compiler.ir_utils import clone_model
    from onnxcc.passes.pruning import sensitivity as S
    from onnxcc.passes.pruning.cut import prepare
    from onnxcc.passes.pruning.dependency import ChannelGraph

    base = clone_model(model)
    prepare(base)
    return list(S.space_keys(ChannelGraph(base)).values())


def map_parallel(fn: Callable, args: Sequence[tuple], *, workers: int = 1, ray: str | None = None,
                 ray_resource: str | None = None, threads: int = 1) -> list[Any]:
    """``[fn(*a) for a in args]`` on an executor: in this process (one worker), a spawn-context
    process pool, or Ray tasks (each asking for ``threads`` CPUs and ``ray_resource``; a task whose
    worker dies is retried). ``fn`` must be importable (module level) for the last two."""
    if ray is not None:
        if ray == "local":
            # one machine: every Ray process on loopback (Ray otherwise advertises and dials the
            # machine's network address); read by Ray at import and by the processes it starts
            os.environ.setdefault(RAY_LOOPBACK_ENV, "0")
        try:
            import ray as ray_
        except ImportError as e:
            raise BadInputError("--ray needs Ray: pip install 'onnxcc[ray]'") from e
        started = False
        if not ray_.is_initialized():
            ray_.init(address=None if ray == "local" else ray, include_dashboard=False, log_to_driver=False,
                      num_cpus=max(1, workers) * threads if ray == "local" else None)  # each task asks for its threads
            started = True
        try:
            threads = feasible_threads(ray_, threads, ray_resource)
            opts: dict[str, Any] = {"num_cpus": threads, "max_retries": 2}
            if ray_resource:
                opts["resources"] = {ray_resource: 1}
            remote = ray_.remote(**opts)(fn)
            return ray_.get([remote.remote(*a) for a in args])
        finally:
            if started:
                ray_.shutdown()
    if workers > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            return [f.result() for f in [pool.submit(fn, *a) for a in args]]
    return [fn(*a) for a in args]


def feasible_threads(ray_: Any, threads: int, resource: str | None) -> int:
    """The CPUs a task may ask for on this cluster: a task asking for more than any (serving) node
    has would wait forever, so the request is capped at the largest node's CPUs (said in the
    log); a resource no node offers is bad input."""
    nodes = [n.get("Resources", {}) for n in ray_.nodes() if n.get("Alive")]
    if resource:
        nodes = [r for r in nodes if r.get(resource, 0) >= 1]
        if not nodes:
            raise BadInputError(f"--ray-resource {resource}: no node of the Ray cluster offers it")
    most = int(max((r.get("CPU", 0) for r in nodes), default=0))
    if most < 1:
        raise BadInputError("the Ray cluster has no node with a CPU to run trials on")
    if threads > most:
        logger.warning("Ray: tasks ask for %d CPUs but the largest node has %d: using %d", threads, most, most)
        return most
    return threads


def _no_progress(done: int, total: int) -> None:
    """Workers draw no bars of their own (a picklable callback)."""


def _sensitivity_share(model: bytes, calib: Any, kwargs: dict[str, Any], keys: Sequence[str], threads: int) -> Any:
    from onnxcc.compiler.ir_utils import load_model
    from onnxcc.passes.pruning import sensitivity as S

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    return S.analyse(load_model(model), calib, only=keys, **kwargs)


def sensitivity(model: Any, calib: Any, *, workers: int = 1, ray: str | None = None, ray_resource: str | None = None,
                **kwargs: Any) -> Any:
    """:func:`onnxcc.passes.pruning.sensitivity.analyse` with the channel spaces shared out over
    ``workers`` (processes or Ray tasks): each (space, ratio) cut is independent. The curves come
    back in the order one process would give them."""
    from onnxcc.passes.pruning import sensitivity as S

    if workers <= 1 and ray is None:
        return S.analyse(model, calib, **kwargs)
    t0 = time.perf_counter()
    keys = _space_keys(model)
    n = max(1, min(workers, len(keys)))
    shares = [keys[i::n] for i in range(n)]
    kwargs = dict(kwargs, progress=_no_progress)
    parts = map_parallel(_sensitivity_share, [(_bytes(model), calib, kwargs, share, 1) for share in shares],
                         workers=n, ray=ray, ray_resource=ray_resource)
    order = {k: i for i, k in enumerate(keys)}
    curves = sorted((c for p in parts for c in p.curves), key=lambda c: order[c.key])
    first = parts[0]
    return S.Sensitivity(first.base_macs, first.base_params, first.metric, curves, time.perf_counter() - t0)


