"""``compile_model``: one verified pipeline from a recipe, as a Python call.

    from onnxcc import compile_model
    result = compile_model("resnet.onnx", recipe="int8-x86", calibration="calib.npz", budget=1.0)
    result.save("resnet.int8.onnx")
    result.report["after"]["latency_ms"]

``model`` may be a path, bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model``
(a given ``onnx_ir.Model`` is not modified: the pipeline works on a copy).
``recipe`` is a shipped recipe name (:func:`shipped_recipes`), a YAML/JSON
path, or a list of passes (names, ``(name, options)`` pairs or dicts).
``data`` are real inputs to verify every pass on (an ``.npz`` by input name, a dict of arrays
or a list of feed dicts: :func:`~compiler.calibration.verification_data`), all of them; without
it the first ``verify_samples`` calibration samples (64 under a budget, else 8), else seeded
random inputs. ``labels`` label those evaluation samples, in order; ``metric`` is top-k
(``top_k``) accuracy against them, or a score function ``fn(outputs, labels)``
(:class:`~compiler.verify.Metric`). ``budget`` (points of that metric) drives every lossy pass
that can trade accuracy: mixed precision, prune ratios, factorization ranks, sparsity, codebook
bits (:mod:`compiler.pipeline`).
``calibration`` may be a :class:`~compiler.calibration.CalibrationSet`, a
numpy array or dict of arrays, a ``.npy``/``.npz``/image-folder path (``images``: an
:class:`~compiler.calibration.ImagePreprocessing` or a dict of its fields, for folders), or an
onnxruntime ``CalibrationDataReader``, so existing onnxruntime quantization
code plugs in. The data is read once and shared by every pass.

The report (a JSON-ready dict) has, per pass, what changed, the layers
skipped with reasons, the verification metrics and the time, and before/after
totals: parameters, MACs, file size, measured latency and the metric.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.errors import BadInputError
from onnxcc.compiler.ir_utils import serialized_size
from onnxcc.compiler.pipeline import Budget, PassSpec, Pipeline, PipelineResult, concrete_shapes, load_recipe, specs_from_data

logger = logging.getLogger(__name__)
RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


def specs_from_flags(
    *, prune: float | None = None, factorize: str | None = None, sparsify: float | None = None,
    codebook: int | None = None, quantize: str | None = None, calibrated: bool = False,
) -> list[PassSpec]:
    """Passes for ``onnxcc compile``'s shortcut flags, in the order they compose soundly.

    fold → prune (+ least-squares reconstruction with data) → factorize (+ refit) → fold →
    sparsify → codebook | equalize → quantize. A codebook and INT8 QDQ both own the weights'
    storage: asking for both is refused.
    """
    if codebook is not None and quantize is not None:
        raise BadInputError("--codebook and --quantize both rewrite the weights' storage: give one")
    specs = [PassSpec("fold", {})]
    if prune:
        specs.append(PassSpec("prune", {"ratio": prune, "reconstruct": calibrated}))
    if factorize:
        method, _, rank = factorize.partition(":")
        specs.append(PassSpec("factorize", {"method": method, **({"rank": float(rank)} if rank else {})}))
    if prune or factorize:
        specs.append(PassSpec("fold", {}))
    if sparsify:
        specs.append(PassSpec("sparsify", {"sparsity": sparsify, "reconstruct": calibrated, "steps": 2 if calibrated else 1}))
    if codebook:
        specs.append(PassSpec("codebook", {"bits": codebook}))
    if quantize:
        specs += [PassSpec("equalize", {}), PassSpec("quantize", {"method": quantize})]
    return specs


def recipe_json(specs: Sequence[Any]) -> list[dict[str, Any]]:
    """A recipe as the report and the model's provenance record it: ``[{name, options}, ...]``
    (specs as :func:`resolve_recipe` takes them)."""
    return [{"name": s.name, "options": dict(s.options)} for s in resolve_recipe(list(specs))]


def prune_distill_specs(prune_options: Mapping[str, Any], distill_options: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Prune-distill cycles as a recipe: the prune options' ``steps`` cuts, each followed by a
    ``distill`` pass (teacher: the pipeline's input, the unpruned model). Each cut takes the same
    share of what is left: a ratio r as 1 - (1 - r)^(1/steps) of the current channels, a
    MACs/params/latency target t as t^(1/steps) of the current model."""
    opts = dict(prune_options)
    steps = int(opts.pop("steps", 1) or 1)
    if steps < 1:
        raise BadInputError("steps must be >= 1")
    one = dict(opts, steps=1)
    for key in ("target_macs", "target_params", "target_latency"):
        if opts.get(key) is not None:
            one[key] = float(opts[key]) ** (1.0 / steps)
    if all(opts.get(k) is None for k in ("target_macs", "target_params", "target_latency")) and "ratio" in opts:
        one["ratio"] = 1.0 - (1.0 - float(opts["ratio"])) ** (1.0 / steps)
    distill = {k: v for k, v in distill_options.items() if v is not None}
    specs: list[tuple[str, dict[str, Any]]] = []
    for _ in range(steps):
        specs += [("prune", dict(one)), ("distill", dict(distill))]
    return specs


def onnxcc_version() -> str:
    from importlib.metadata import version

    return version("onnxcc")


def shipped_recipes() -> dict[str, Path]:
    """Name → path of the recipes shipped with onnxcc (``compiler/recipes/*.yaml``)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.yaml"))}


def resolve_recipe(recipe: Any) -> list[PassSpec]:
    if recipe is None:
        return []
    if isinstance(recipe, (str, os.PathLike)):
        shipped = shipped_recipes()
        if str(recipe) in shipped:
            return load_recipe(shipped[str(recipe)])
        if not Path(recipe).exists():
            raise BadInputError(f"recipe '{recipe}': no such file, and not a shipped recipe ({', '.join(shipped)})")
        return load_recipe(recipe)
    if isinstance(recipe, (list, tuple, Mapping)):
        if isinstance(recipe, (list, tuple)) and all(isinstance(r, (PassSpec, tuple, str)) for r in recipe):
            return [r if isinstance(r, PassSpec) else PassSpec(r, {}) if isinstance(r, str) else PassSpec(r[0], dict(r[1] or {}))
                    for r in recipe]
        return specs_from_data(recipe)
    raise BadInputError(f"recipe: cannot use a {type(recipe).__name__}")


def as_images(images: Any):
    """An :class:`~compiler.calibration.ImagePreprocessing` from one, a dict of its fields, or None."""
    from onnxcc.compiler.calibration import ImagePreprocessing

    if images is None or isinstance(images, ImagePreprocessing):
        return images
    if isinstance(images, Mapping):
        try:
            return ImagePreprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in images.items()})
        except TypeError as e:
            raise BadInputError(f"images: {e}") from e
    raise BadInputError(f"images: cannot use a {type(images).__name__}")


def as_calibration(calibration: Any, model: ir.Model, images: Any = None):
    from onnxcc.compiler.calibration import CalibrationSet

    if calibration is None or isinstance(calibration, CalibrationSet):
        return calibration
    if isinstance(calibration, np.ndarray):
        if len(model.graph.inputs) != 1:
            raise BadInputError("calibration: an array fits a single-input model; give a dict of arrays")
        return CalibrationSet({model.graph.inputs[0].name: calibration}, source="array")
    if isinstance(calibration, Mapping):
        return CalibrationSet.load(calibration, model)  # stacked samples, or one whole feed
    if isinstance(calibration, (str, os.PathLike)):
        return CalibrationSet.load(str(calibration), model, images=as_images(images))
    if hasattr(calibration, "get_next"):  # onnxruntime CalibrationDataReader
        return CalibrationSet.from_reader(calibration)
    raise BadInputError(f"calibration: cannot use a {type(calibration).__name__}")


@dataclasses.dataclass
class CompileResult:
    """The compiled model, its report (JSON-serialisable as it is: ``json.dumps(result.report)``),
    the pipeline's steps, and the input as given (``before``, for the HTML report)."""

    model: ir.Model
    report: dict[str, Any]
    result: PipelineResult
    before: ir.Model | None = None

    def save(self, path: str | os.PathLike, **kwargs: Any) -> None:
        from onnxcc.compiler.ir_utils import save_model

        save_model(self.model, path, **kwargs)


#: How compile times the model before and after: `onnxcc bench`'s protocol, both in one run.
LATENCY_PROTOCOL = {"threads": 2, "batch": 1, "rounds": 5, "block": 10, "method": "alternating blocks, median"}


def paired_latency(before: ir.Model, after: ir.Model, threads: int | None = None) -> tuple[float, float]:
    """Median latency (ms) of both models timed in the same run, in alternating blocks (as
    ``onnxcc bench`` does), so that the ratio does not depend on what the machine did in between."""
    from onnxcc.compiler.bench import bench_models

    p = LATENCY_PROTOCOL
    res = bench_models([("before", before), ("after", after)], threads=threads or p["threads"], batch=p["batch"],
                       rounds=p["rounds"], block=p["block"], measure_memory=False)
    return round(res.entries[0].median_ms, 4), round(res.entries[1].median_ms, 4)


def totals(model: ir.Model) -> dict[str, Any]:
    """Parameters, MACs, nodes and serialized size of ``model`` (latency: :func:`paired_latency`).

    Parameters are counted per layer element by element, also when stored as int8/int4, FP16 or a
    codebook (one parameter per weight, whatever its storage); ``file_bytes`` shows the storage
    (the written file and its external data, once the model is saved: see :func:`compile_model`).
    """
    from onnxcc.compiler.analysis import analyze, per_layer_totals

    s = analyze(model, stats=False)
    params = sum(v["params"] for v in per_layer_totals(model).values())
    return {"params": params, "macs": s.macs, "nodes": s.nodes, "op_counts": dict(sorted(s.op_counts.items())),
            "file_bytes": serialized_size(model), "latency_ms": None}


def _counted(model: ir.Model, specs: Sequence[PassSpec]) -> ir.Model | None:
    """An exactly folded copy to count ``model`` on (raw exports hide spatial shapes in Resize scales
    and shape chains that MAC counting needs, and carry BatchNorm that folding absorbs); None when
    the recipe starts with a fold, whose verified output (exact: the same function) serves. A
    second fold would hold a second copy of every weight (a 2.4 GB model: 7.7 GB peak, not 5.1)."""
    from onnxcc.compiler.ir_utils import clone_model

    if specs and specs[0].name == "fold":
        return None
    m = clone_model(model)
    try:
        Pipeline(["fold"], verify=False).run(m)
    except Exception:  # counting is best effort; the pipeline reports real failures
        return clone_model(model)
    return m


#: Verification samples (from --data, else the calibration set, else seeded random inputs): a
#: budget is judged on more of them than an exact check needs.
VERIFY_SAMPLES = 8
VERIFY_SAMPLES_BUDGET = 64


def compile_model(
    model: Any,
    recipe: Any = None,
    *,
    calibration: Any = None,
    data: Any = None,
    images: Any = None,
    labels: Any = None,
    budget: float | Budget | None = None,
    seed: int = 0,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    verify_samples: int | None = None,
    top_k: int = 1,
    metric: Any = None,
    measure_latency: bool = True,
    latency_threads: int | None = None,
    profile_layers: bool = False,
) -> CompileResult:
    """Run ``recipe`` on ``model``, verifying every pass; raises on bad input (BadInputError) or budget (BudgetError).

    This is the one compile path: ``onnxcc compile`` and every per-command shortcut of the CLI
    (``fold``, ``prune``, ``quantize``, ...) are a recipe run through here.
    """
    from onnxcc.compiler.ir_utils import clone_model, load_model

    if verify_samples is None:  # the CLI and the API verify on the same number
        verify_samples = VERIFY_SAMPLES_BUDGET if budget is not None else VERIFY_SAMPLES
    specs = resolve_recipe(recipe)
    if not specs:
        raise BadInputError("nothing to do: give a recipe")
    m = clone_model(model) if isinstance(model, ir.Model) else load_model(model)
    calib = as_calibration(calibration, m, images)
    if calib is not None:
        calib.validate(m)
    feeds = None
    if data is not None:
        from onnxcc.compiler.calibration import verification_data

        feeds = verification_data(data, m, images=as_images(images))  # all of it: the user chose these samples
    if isinstance(budget, (int, float)):
        budget = Budget(max_drop=float(budget))
    if labels is not None and not isinstance(labels, np.ndarray):
        labels = np.load(labels) if isinstance(labels, (str, os.PathLike)) else np.asarray(labels)
    from onnxcc.compiler.ir_utils import set_shape_hint

    set_shape_hint(m, concrete_shapes(input_shapes, calib, feeds))  # before/after totals count at this shape
    pipeline = Pipeline(specs, budget=budget, verify_samples=verify_samples, input_shapes=input_shapes, labels=labels, seed=seed, metric=metric if metric is not None else top_k)
    original = clone_model(m)
    counted = _counted(original, specs)
    before: dict[str, Any] = {} if counted is None else totals(counted)

    def first_fold(step, folded: ir.Model) -> None:
        if not before:  # the recipe's own first fold: the same function as the input, shapes known
            before.update(totals(folded))

    t0 = time.perf_counter()
    result = pipeline.run(m, calib, feeds=feeds, on_step=first_fold)
    elapsed = time.perf_counter() - t0
    before["file_bytes"] = serialized_size(original)
    # MACs and parameters are counted on a folded copy (shapes known), but the node count is the
    # input's own: `onnxcc fold` on a raw export would otherwise show its result on both sides
    ops = Counter(n.op_type for n in original.graph.all_nodes())
    before["nodes"], before["op_counts"] = sum(ops.values()), dict(sorted(ops.items()))
    after = totals(result.model)
    if measure_latency:  # the input as given against the result, in one run (onnxruntime optimizes both)
        before["latency_ms"], after["latency_ms"] = paired_latency(original, result.model, latency_threads)
    report: dict[str, Any] = {"status": "ok", "recipe": recipe_json(specs), "seconds": round(elapsed, 2), "before": before, "after": after, **result.to_json()}
    if budget is not None:
        report["budget"] = budget.max_drop if budget.max_drop is not None else budget.min_sqnr_db
    last = next((s.vs_original for s in reversed(result.steps) if s.vs_original is not None), None)
    if last is not None:
        report["metric"] = {
            "top1_agreement": last.outputs[0].top1 if last.outputs else None,
            "min_sqnr_db": last.min_sqnr,
            "accuracy_before": last.accuracy_ref,
            "accuracy_after": last.accuracy_cand,
            "drop_points": last.metric_drop(),
            "name": result.verification.get("metric"),
            "samples": result.verification.get("samples"),
        }
    if budget is None and last is not None and any(not st.exact and st.report.modified for st in result.steps):
        warning = far_drop_warning(last)
        if warning:
            logger.warning(warning)
            report["warning"] = warning
    if measure_latency and before.get("latency_ms"):
        report["latency_ratio"] = round(after["latency_ms"] / before["latency_ms"], 3)
        report["latency_protocol"] = dict(LATENCY_PROTOCOL, threads=latency_threads or LATENCY_PROTOCOL["threads"])
    if profile_layers:
        from onnxcc.compiler.bench import layer_times, profile_nodes

        report["layer_latency_us"] = {
            "before": layer_times(original, profile_nodes(original, runs=10)),
            "after": layer_times(result.model, profile_nodes(result.model, runs=10)),
        }
    report["provenance"] = stamp_provenance(result.model, specs, calib)
    return CompileResult(result.model, report, result, before=original)


#: Without a budget, a lossy result this far from the input still succeeds, with a warning.
WARN_DROP_POINTS = 5.0
WARN_SQNR_DB = 20.0


def far_drop_warning(comp: Any) -> str | None:
    """One line when a lossy result moved far from the input (more than :data:`WARN_DROP_POINTS`
    of accuracy / top-1 agreement, or an SQNR under :data:`WARN_SQNR_DB`), saying how to bound it."""
    drop, sq = comp.metric_drop(), comp.min_sqnr
    if drop is not None and drop > WARN_DROP_POINTS:
        what = f"{'accuracy' if comp.accuracy_ref is not None else 'top-1 agreement with the input'} dropped {drop:.1f} points"
    elif drop is None and math.isfinite(sq) and sq < WARN_SQNR_DB:
        what = f"the outputs are at {sq:.1f} dB SQNR from the input's"
    else:
        return None
    return f"{what} and no budget was given: pass --budget PTS (budget= in Python) to bound the loss"


def calibration_digest(calib: Any) -> dict[str, Any]:
    """What identifies the calibration data: its source, sample count and a SHA-256 of its arrays
    (names, dtypes, shapes and bytes, in name order)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(calib.arrays):
        a = calib.arrays[name]
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        for chunk in calib.chunks(name):  # a memory-mapped set is hashed without reading it whole
            h.update(np.ascontiguousarray(chunk).tobytes())
    return {"source": os.path.basename(str(calib.source)), "samples": len(calib), "sha256": h.hexdigest()}


def stamp_provenance(model: ir.Model, specs: Sequence[PassSpec], calib: Any) -> dict[str, Any]:
    """Record in the output model what was done to it, where Netron and other tools show it:
    ``producer_name``/``producer_version`` are onnxcc's, and ``metadata_props`` gain
    ``onnxcc.recipe`` (the passes and options), ``onnxcc.calibration`` (source, sample count,
    SHA-256) and ``onnxcc.precision`` (per weighted layer: int8, int8-weights, float16-weights,
    codebook, float32; as :func:`compact_precision` writes it), as JSON strings. The model's own metadata is kept. Returns the same
    record for the report."""
    import json

    from onnxcc.compiler.analysis import layer_precisions

    record: dict[str, Any] = {
        "producer": {"name": "onnxcc", "version": onnxcc_version()},
        "recipe": recipe_json(specs),
        "precision": layer_precisions(model),
    }
    if calib is not None:
        record["calibration"] = calibration_digest(calib)
    model.producer_name, model.producer_version = "onnxcc", record["producer"]["version"]
    stamped = dict(record, precision=compact_precision(record["precision"]))
    for key in ("recipe", "calibration", "precision"):
        if key in stamped:
            model.metadata_props[f"onnxcc.{key}"] = json.dumps(stamped[key], sort_keys=True, default=str)
    return record


def compact_precision(per_layer: Mapping[str, str]) -> dict[str, Any]:
    """``{"default": P, "layers": {name: precision}}``: the most common precision once, and only the
    layers that differ from it by name (a per-layer map of a 400-layer recognizer was 15 kB of its
    INT8 file). :func:`layer_precision` reads it back."""
    from collections import Counter

    if not per_layer:
        return {"default": None, "layers": {}}
    default = Counter(per_layer.values()).most_common(1)[0][0]
    return {"default": default, "layers": {k: v for k, v in sorted(per_layer.items()) if v != default}}


def layer_precision(stamped: Mapping[str, Any], layer: str) -> str | None:
    """The precision an output model's ``onnxcc.precision`` metadata records for ``layer``."""
    return stamped.get("layers", {}).get(layer, stamped.get("default"))


REPORT_SCHEMA_VERSION = 1
#: The JSON Schema every report follows (shipped with the package; the tests validate every
#: report they write against it).
REPORT_SCHEMA = Path(__file__).resolve().parent / "schemas" / "report.schema.json"


def json_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """The report without in-memory objects (what ``--report`` writes), stamped with its schema
    version and onnxcc's; numbers are JSON numbers: a value that is not finite (an infinite SQNR
    of an unchanged model) is null, never a string or ``Infinity``."""
    def finite(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, Mapping):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    body = {k: finite(v) for k, v in report.items() if not k.startswith("_")}
    return {"schema_version": REPORT_SCHEMA_VERSION, "onnxcc_version": onnxcc_version(), **body}
