"""Numerical verification of one model against another with onnxruntime.

Both models run in onnxruntime with graph optimizations off (so what is
compared is the graph onnxcc wrote, not what onnxruntime fused) on the same
inputs: given calibration samples or seeded random inputs of the declared
shapes. Per output we report

* ``max_abs``: max |ref - cand|;
* ``rel``: max |ref - cand| / max |ref| (the tolerance test for exact passes);
* ``sqnr_db``: 10·log10(Σref² / Σ(ref-cand)²), infinite when identical;
* ``cosine``: cosine similarity of the flattened outputs;
* ``top1``: fraction of rows whose argmax agrees, for classifier-shaped
  outputs ((N, C) or (N, C, 1, 1) with C > 1);
* ``accuracy_ref`` / ``accuracy_cand`` when labels are given.

Exact passes use :data:`EXACT_RTOL` (coarser dtypes: :func:`dtype_floor`). A float32 conv/gemm output is a sum of K
products, each rounded with relative error ≤ 2⁻²⁴ ≈ 6e-8; folding BatchNorm
into a weight or reordering a sum changes roundings, and the differences
compound through depth. Measured on the sample models (ResNet/MobileNet/
DenseNet families, 20–60 layers) the largest normalised difference after
folding is 1e-6–4e-6; 1e-4 leaves ~25× headroom for deeper real models while
still catching any real rewrite bug, which shows up as 1e-2 or worse.

That floor is not enough for every real model: deep exports whose output sits
in a saturated tail (a DB text detector's sigmoid map of ~1e-5 on inputs with
no text) amplify float reassociation far beyond it, and onnxruntime's *own*
graph optimizations move such an output as much as BN folding does. So the
tolerance for exact passes is per output and relative to the model's own float
noise (:func:`exact_tolerances`): ``max(EXACT_RTOL, NOISE_FACTOR × spread)``,
where ``spread`` is how far onnxruntime with all its graph optimizations moves
that output from the unoptimized run on the same inputs, capped at
:data:`MAX_EXACT_RTOL`. The reports state the tolerance each output was held to.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.calibration import CalibrationSet, input_specs, random_inputs
from onnxcc.compiler.errors import BadInputError
from onnxcc.compiler.metrics import sqnr_db
from onnxcc.compiler.sessions import make_session, run_model, run_session, session_source  # noqa: F401  (verify's public API)

EXACT_RTOL = 1e-4
NOISE_FACTOR = 8.0  # an exact rewrite may move an output by this many times onnxruntime's own spread
MAX_EXACT_RTOL = 0.05  # never looser than this, however noisy the model


def exact_tolerances(
    model: ir.Model | bytes, feeds: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Per-output relative tolerance for exact passes on ``model``, from its own float noise
    (see the module docstring). ``reference`` is the unoptimized run on ``feeds``."""
    tol = {name: dtype_floor(ref.dtype) for name, ref in reference.items()}
    try:
        optimized = run_model(model, feeds, optimize=True)
    except BadInputError:  # onnxruntime refuses its own optimizations: the floor it is
        return tol
    for name, ref in reference.items():
        m = compare_arrays(name, ref, optimized.get(name))
        if m.problem is None and math.isfinite(m.rel) and np.issubdtype(ref.dtype, np.floating):
            tol[name] = float(min(max(tol[name], NOISE_FACTOR * m.rel), max(MAX_EXACT_RTOL, tol[name])))
    return tol


class ExactTolerance:
    """The per-output tolerances exact passes are held to, measured only when needed: each output's
    dtype floor (:func:`dtype_floor`) until an exact step exceeds it, then the model's own float
    noise (:func:`exact_tolerances`, once, on the original model's serialized ``source``). A step
    inside the floor is inside any noise-widened tolerance, so skipping the optimized run there
    changes no verdict; it saves one session and one run of the model per pipeline (seconds on a
    large one). A ``source`` that is not bytes (a model that must go through a file, which the
    passes then change in place) is measured at once."""

    def __init__(self, source: ir.Model | bytes, feeds: Sequence[Mapping[str, np.ndarray]], reference: Mapping[str, np.ndarray]):
        self.values = {name: dtype_floor(ref.dtype) for name, ref in reference.items()}
        self._pending: tuple[Any, ...] | None = (source, feeds, reference)
        if not isinstance(source, bytes):
            self.widen()

    def widen(self) -> bool:
        """Measure the noise-relative tolerances (once); False when they were measured already."""
        if self._pending is None:
            return False
        source, feeds, reference = self._pending
        self._pending = None
        self.values = exact_tolerances(source, feeds, reference)
        return True


def dtype_floor(dtype: np.dtype) -> float:
    """The least relative tolerance for an exact pass on an output of ``dtype``: :data:`EXACT_RTOL`,
    or four units in the last place where the dtype is coarser (float16: 3.9e-3, below which a
    reordered sum differs by rounding alone)."""
    if np.issubdtype(dtype, np.floating):
        return max(EXACT_RTOL, 4.0 * float(np.finfo(dtype).eps))
    return EXACT_RTOL


# --------------------------------------------------------------------------- inputs
def verification_feeds(
    model: ir.Model,
    calibration: CalibrationSet | None = None,
    *,
    samples: int = 8,
    seed: int = 0,
    overrides: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Calibration samples when given (first ``samples``), else seeded random inputs."""
    if calibration is not None:
        return calibration.feeds(model, samples)
    specs = input_specs(model)
    fixed = {s.fixed_batch for s in specs if s.fixed_batch is not None}
    if fixed:
        per = max(fixed)
        if per < 1:  # a declared batch of 0: one empty feed is all there is to run
            return random_inputs(specs, n=1, seed=seed, batch=per, overrides=overrides)
        return random_inputs(specs, n=max(1, samples // per), seed=seed, batch=per, overrides=overrides)
    return random_inputs(specs, n=1, seed=seed, batch=samples, overrides=overrides)


# --------------------------------------------------------------------------- metrics
@dataclasses.dataclass
class OutputMetrics:
    name: str
    shape_ref: tuple[int, ...]
    shape_cand: tuple[int, ...] | None
    max_abs: float = math.nan
    rel: float = math.nan
    sqnr_db: float = math.nan
    cosine: float = math.nan
    top1: float | None = None
    problem: str | None = None  # missing output, shape mismatch, NaN

    def to_json(self) -> dict[str, Any]:
        """JSON numbers only: a value that is not finite is null (an infinite SQNR, no error at
        all, is ``identical: true``; an infinite error comes with its ``problem``)."""
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        d["identical"] = self.identical
        return d

    @property
    def identical(self) -> bool:
        return self.max_abs == 0.0 and self.problem is None


@dataclasses.dataclass
class Comparison:
    outputs: list[OutputMetrics]
    accuracy_ref: float | None = None
    accuracy_cand: float | None = None

    @property
    def ok_structure(self) -> bool:
        return all(o.problem is None for o in self.outputs)

    @property
    def max_rel(self) -> float:
        vals = [o.rel for o in self.outputs]
        return max(vals) if vals else 0.0

    @property
    def min_sqnr(self) -> float:
        vals = [o.sqnr_db for o in self.outputs if not math.isnan(o.sqnr_db)]
        return min(vals) if vals else math.nan

    @property
    def top1(self) -> float | None:
        vals = [o.top1 for o in self.outputs if o.top1 is not None]
        return min(vals) if vals else None

    def within(self, rtol: float | Mapping[str, float], atol: float = 0.0) -> bool:
        """Every output agrees within ``rtol`` (one number, or one per output name)."""
        if not self.ok_structure:
            return False
        for o in self.outputs:
            limit = rtol.get(o.name, EXACT_RTOL) if isinstance(rtol, Mapping) else rtol
            if not (o.max_abs <= atol or o.rel <= limit):
                return False
        return True

    def metric_drop(self) -> float | None:
        """Accuracy drop in points with labels, else top-1 disagreement in points."""
        if self.accuracy_ref is not None and self.accuracy_cand is not None:
            return round(100.0 * (self.accuracy_ref - self.accuracy_cand), 9)  # 1 of 400 samples is 0.25, not 0.2500000000000009
        t = self.top1
        return None if t is None else round(100.0 * (1.0 - t), 9)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"outputs": [o.to_json() for o in self.outputs]}
        sq = self.min_sqnr
        d["min_sqnr_db"] = sq if math.isfinite(sq) else None
        d["identical"] = bool(self.outputs) and all(o.identical for o in self.outputs)
        d["metric_drop"] = self.metric_drop()
        if self.accuracy_ref is not None:
            d["accuracy_ref"] = self.accuracy_ref
            d["accuracy_cand"] = self.accuracy_cand
        return d


def is_classifier(shape: tuple[int, ...]) -> bool:
    s = [d for d in shape]
    while len(s) > 2 and s[-1] == 1:
        s.pop()
    return len(s) == 2 and s[1] > 1


def compare_arrays(name: str, ref: np.ndarray, cand: np.ndarray | None) -> OutputMetrics:
    m = OutputMetrics(name, tuple(ref.shape), None if cand is None else tuple(cand.shape))
    if cand is None:
        m.problem = "output missing from candidate"
        return m
    if ref.shape != cand.shape:
        m.problem = f"shape {tuple(ref.shape)} vs {tuple(cand.shape)}"
        return m
    if not (np.issubdtype(ref.dtype, np.number) and np.issubdtype(cand.dtype, np.number)):
        m.max_abs = 0.0 if np.array_equal(ref, cand) else math.inf
        m.rel = m.max_abs
        return m
    r = ref.astype(np.float64)
    c = cand.astype(np.float64)
    fr, fc = np.isfinite(r), np.isfinite(c)
    if not np.all(fc) and np.all(fr):
        m.problem = "candidate output contains NaN/Inf"
        m.max_abs = m.rel = math.inf
        return m
    if not np.all(fr):  # NaN/Inf in the reference (Log/Sqrt of negatives, -inf masks): same places, same values
        if not (np.array_equal(fr, fc) and np.array_equal(np.isnan(r), np.isnan(c))
                and np.array_equal(r[np.isinf(r)], c[np.isinf(r)])):
            m.problem = "NaN/Inf in other places than the reference's"
            m.max_abs = m.rel = math.inf
            return m
        r, c = r[fr], c[fr]  # the rest is compared as usual
    diff = np.abs(r - c)
    m.max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(r).max()) if r.size else 0.0
    m.rel = m.max_abs / scale if scale > 0 else (0.0 if m.max_abs == 0 else math.inf)
    m.sqnr_db = sqnr_db(r, c)
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    m.cosine = float((r.ravel() @ c.ravel()) / (nr * nc)) if nr > 0 and nc > 0 else (1.0 if nr == nc else 0.0)
    if is_classifier(r.shape) and r.shape == ref.shape and r.size:
        r2, c2 = r.reshape(r.shape[0], -1), c.reshape(c.shape[0], -1)
        m.top1 = float(np.mean(r2.argmax(1) == c2.argmax(1)))
    return m


def accuracy(outputs: np.ndarray, labels: np.ndarray, k: int = 1) -> float:
    logits = outputs.reshape(outputs.shape[0], -1)
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != logits.shape[0]:
        raise BadInputError(f"labels: {labels.shape[0]} labels for {logits.shape[0]} samples")
    if k == 1:
        return float(np.mean(logits.argmax(1) == labels))
    topk = np.argsort(-logits, axis=1)[:, :k]
    return float(np.mean((topk == labels[:, None]).any(1)))


@dataclasses.dataclass(frozen=True)
class Metric:
    """What the budget measures: top-k accuracy of the first output against labels (without
    labels, top-1 agreement with the original), or a user's score function.

    A score function ``fn(outputs, labels) -> float`` takes the outputs of all verification
    samples (a dict output name → array, samples joined along each output's batch axis) and
    the labels given with ``--labels`` (any array: class ids, strings, boxes), or, without labels,
    the *original model's* outputs on the same samples (so a detector can be scored against the
    original's own detections). Higher is better; a fraction in [0, 1] like accuracy (the budget
    is in points: 100 × the score's drop).
    """

    top_k: int = 1
    fn: Callable[[Mapping[str, np.ndarray], Any], float] | None = None
    name: str = "top1"

    def score(self, outputs: Mapping[str, np.ndarray], truth: Any) -> float:
        try:
            value = self.fn(dict(outputs), truth)
        except Exception as e:
            raise BadInputError(f"metric {self.name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise BadInputError(f"metric {self.name} returned {value!r}: it must return a finite number (higher is better)")
        return value


def as_metric(metric: "int | Metric | Callable | None") -> Metric:
    """A :class:`Metric` from top-k (an int), a score function, or a Metric."""
    if metric is None:
        return Metric()
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, int):
        return Metric(top_k=metric, name=f"top{metric}")
    if callable(metric):
        return Metric(fn=metric, name=getattr(metric, "__qualname__", "metric"))
    raise BadInputError(f"metric: cannot use a {type(metric).__name__}")


def load_metric(spec: str) -> Metric:
    """``top1``, ``top5``, or a score function ``module:function`` (an importable module, or a
    ``path/to/file.py:function``)."""
    import importlib
    import importlib.util
    import os
    import sys

    if spec in ("top1", "top5"):
        return Metric(top_k=int(spec[3:]), name=spec)
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name.isidentifier():
        raise BadInputError(f"--metric {spec}: expected top1, top5 or module:function")
    try:
        if mod_name.endswith(".py"):
            if not os.path.isfile(mod_name):
                raise BadInputError(f"--metric {spec}: {mod_name}: no such file")
            loader = importlib.util.spec_from_file_location(f"onnxcc_metric_{abs(hash(mod_name))}", mod_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # a module next to the user's data, as python -m finds it
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except BadInputError:
        raise
    except Exception as e:
        raise BadInputError(f"--metric {spec}: cannot import {mod_name}: {type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise BadInputError(f"--metric {spec}: {mod_name} has no function {fn_name}")
    return Metric(fn=fn, name=spec)


def compare_outputs(
    ref: Mapping[str, np.ndarray],
    cand: Mapping[str, np.ndarray],
    labels: np.ndarray | None = None,
    metric: "int | Metric | Callable" = 1,
) -> Comparison:
    """Per-output agreement of ``cand`` with ``ref``, and the metric of both (:class:`Metric`;
    an int is top-k accuracy against ``labels``)."""
    outs = [compare_arrays(name, r, cand.get(name)) for name, r in ref.items()]
    for name in cand:
        if name not in ref:
            outs.append(OutputMetrics(name, (), tuple(cand[name].shape), problem="output not in reference"))
    comp = Comparison(outs)
    metric = as_metric(metric)
    top_k = metric.top_k
    if metric.fn is not None and ref:
        truth = labels if labels is not None else ref
        comp.accuracy_ref = metric.score(ref, truth)
        if comp.ok_structure:
            comp.accuracy_cand = metric.score(cand, truth)
        return comp
    if labels is not None and ref:
        first = next(iter(ref))
        comp.accuracy_ref = accuracy(ref[first], labels, top_k)
        if first in cand and cand[first].shape == ref[first].shape:
            comp.accuracy_cand = accuracy(cand[first], labels, top_k)
    return comp


def verify_models(
    reference: ir.Model,
    candidate: ir.Model,
    feeds: Sequence[Mapping[str, np.ndarray]],
    labels: np.ndarray | None = None,
) -> Comparison:
    return compare_outputs(run_model(reference, feeds), run_model(candidate, feeds), labels)
