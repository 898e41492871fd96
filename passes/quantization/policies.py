"""Which layers of a quantized model stay float: the accuracy budget and the speed guard.

Both start from the all-INT8 model the ``quantize`` pass wrote and call back into
it (``requantize(excluded)``: the float model quantized again with those layers
left float), so the placement and emission rules are never duplicated here.

* :func:`mixed_precision`: layers ranked once by the SQNR they lose between their
  input and their output; the number kept float doubles until the metric drop
  fits the budget, then a bisection finds the smallest such number;
* :func:`layer_speed_guard`: layers whose integer kernel onnxruntime measures
  slower than their float kernel go back to float (:mod:`onnxcc.compiler.speed`);
* :func:`model_speed_guard`: fp32, the guarded and the unguarded INT8 model timed
  side by side at batch 1 and 8, the fastest kept;
* :func:`record_layer_errors`: every quantized layer's error contribution.
"""

from __future__ import annotations

import logging
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcc.compiler import speed
from onnxcc.compiler import verify as V
from onnxcc.compiler.calibration import ActivationCollector, CalibrationSet, feed_samples
from onnxcc.compiler.ir_utils import replace_contents
from onnxcc.compiler.metrics import sqnr_db
from onnxcc.compiler.passbase import PassContext, PassReport, Skipped
from onnxcc.passes.quantization.placement import WEIGHTED

log = logging.getLogger(__name__)

#: The float model quantized again with these layers (name → why) kept float.
Requantize = Callable[[Mapping[str, str]], "tuple[ir.Model, PassReport]"]


class _First:
    """Keeps the first batch of a tensor."""

    def __init__(self):
        self.x = None

    def update(self, x):
        if self.x is None:
            self.x = x


def layer_sqnrs(fp32: ir.Model, model: ir.Model, names: Sequence[str], calib: CalibrationSet, samples: int = 16) -> dict[str, tuple[float, float]]:
    """(SQNR of its input, SQNR of its output) for each named node: quantized vs float, first batch."""
    layers = {n.name: n for n in fp32.graph if n.name in set(names) and n.inputs and n.inputs[0] is not None and n.outputs}
    pairs = {name: (node.inputs[0].name, node.outputs[0].name) for name, node in layers.items()}
    present = {v.name for v in model.graph.inputs} | {v.name for n in model.graph for v in n.outputs}
    pairs = {k: p for k, p in pairs.items() if p[0] in present and p[1] in present}
    tensors = sorted({t for pair in pairs.values() for t in pair})
    got = {}
    for label, m in (("f", fp32), ("q", model)):
        red = {t: [_First()] for t in tensors}
        ActivationCollector(m, calib).collect(red, limit=min(samples, calib.batch_size_for(fp32, 16)))
        got[label] = {t: r[0].x for t, r in red.items()}

    def sqnr(t: str) -> float:
        return sqnr_db(got["f"][t], got["q"][t], cap=200.0)

    return {name: (sqnr(i), sqnr(o)) for name, (i, o) in pairs.items()}


def local_losses(fp32: ir.Model, model: ir.Model, names: Sequence[str], calib: CalibrationSet, samples: int = 16) -> dict[str, float]:
    """The noise each node adds relative to its output (:func:`noise_added_db`: quantized vs float,
    first batch; higher is worse): what mixed precision ranks by, as the report's ``error_ranking``.

    The SQNR a node loses (input minus output) would put a layer fed the exact graph input first
    (about 160 dB against the 200 dB cap) however little noise it adds."""
    return {k: noise_added_db(i, o) for k, (i, o) in layer_sqnrs(fp32, model, names, calib, samples).items()}


def noise_added_db(sqnr_in: float, sqnr_out: float) -> float:
    """The noise a layer adds, relative to its output's power, in dB (higher is worse): a layer fed
    an exact input (SQNR at the cap) that outputs 40 dB adds -40 dB; one taking 25 dB to 16 dB adds
    -16.6 dB. The SQNR difference (``error_db``) ranks those the other way round (160 and 9)."""
    added = 10.0 ** (-sqnr_out / 10.0) - 10.0 ** (-sqnr_in / 10.0)
    return round(float(10.0 * np.log10(added)), 3) if added > 0 else -200.0


def record_layer_errors(model: ir.Model, fp32: ir.Model, report: PassReport, calib: CalibrationSet) -> None:
    """Every quantized node's error contribution in ``stats["layers"]``: ``error_db`` (dB of SQNR
    lost across it) and ``noise_added_db`` (the noise it adds relative to its output, which
    ``error_ranking`` orders by)."""
    by_name = {n.name: n for n in fp32.graph if n.name}
    # 4 samples: every layer's input and output of both models are held at once (ResNet-50 at
    # 224x224: ~100 MB a sample and model); the ranking for mixed precision uses 16.
    sqnrs = layer_sqnrs(fp32, model, [c for c in report.changed if c in by_name], calib, samples=4)
    layers = report.stats.setdefault("layers", {})
    heavy = set(report.stats.get("fusion", {}).get("float_heavy", []))
    added = {}
    for name, (sq_in, sq_out) in sqnrs.items():
        entry = layers.setdefault(name, {"op": by_name[name].op_type})
        entry["error_db"] = round(float(sq_in - sq_out), 3)
        entry["noise_added_db"] = added[name] = noise_added_db(sq_in, sq_out)
        if "fusion" in report.stats and by_name[name].op_type in WEIGHTED:
            entry["fused"] = not any(name == h or h.startswith(name + "_token") for h in heavy)
    report.stats["error_ranking"] = sorted(added, key=lambda k: -added[k])[:10]


def predicted_slower(model: ir.Model, intensity: float) -> PassReport | None:
    """Without the speed guard nothing is timed: a model with fewer dense MACs per activation element
    than :data:`speed.INT8_MIN_INTENSITY` is predicted slower in INT8 on x86 and stays float (a
    report that changes nothing, saying why); None when INT8 is predicted to pay off."""
    if intensity >= speed.INT8_MIN_INTENSITY:
        return None
    why = (f"INT8 is predicted slower than fp32 on x86: {intensity:.1f} dense MACs per activation element (INT8 has "
           f"paid off from about 11 in onnxcc's measurements and lost below 7): the model is kept in float; "
           f"--speed-guard (the int8-x86 recipe) measures it instead, --force-int8 quantizes anyway")
    log.warning("%s", why)
    return PassReport(model, False, skipped=[Skipped("model", why)],
                      stats={"dense_macs_per_element": round(intensity, 2), "predicted_slower": True})


def layer_speed_guard(model: ir.Model, fp32: ir.Model, report: PassReport, requantize: Requantize) -> PassReport:
    """Keep in float each layer whose integer kernel measures slower than its float kernel
    (:data:`onnxcc.compiler.speed.INT8`); the model is then re-quantized once without those layers.
    The Q/DQ nodes around a layer are not charged to it: the whole-model guard that follows
    catches a model that is slower overall.
    """
    f, q = speed.layer_profiles(fp32, model)
    quantized = set(report.changed)
    per_layer = {k: {"fp32_us": round(f[k], 1), "int8_us": round(q[k], 1)} for k in quantized if k in f and k in q and np.isfinite(f[k]) and np.isfinite(q[k])}
    slower = sorted(k for k, t in per_layer.items() if speed.is_slower(t["fp32_us"], t["int8_us"], speed.INT8))
    guard = {"layers": per_layer, "slower_layers": slower}
    if slower:
        why = {k: f"kept in float by the speed guard: its integer kernel measured {per_layer[k]['int8_us']:.0f} us "
                  f"vs {per_layer[k]['fp32_us']:.0f} us in float" for k in slower}
        trial, rep = requantize({**report.stats.get("kept_float", {}), **why})  # the budget's float layers stay float
        replace_contents(model, trial)
        rep.model = model
        if "mixed_precision" in report.stats:
            rep.stats["mixed_precision"] = report.stats["mixed_precision"]
        report = rep
    report.stats["speed_guard"] = guard
    return report


def model_speed_guard(model: ir.Model, fp32: ir.Model, report: PassReport, all_int8: tuple[ir.Model, PassReport] | None) -> PassReport:
    """fp32, the layer-guarded INT8 model and (when the layer guard changed anything) the all-INT8
    model, timed side by side; the fastest is kept. Moving layers back to float adds Q/DQ
    boundaries, so the layer-guarded model is not always faster."""
    candidates = [("fp32", fp32), ("int8", model)] + ([("int8-no-layer-guard", all_int8[0])] if all_int8 else [])
    guard = report.stats["speed_guard"]
    ms = speed.median_ms(candidates, speed.INT8)
    ms1, ms8 = ms[1], ms[8]
    guard.update(fp32_ms=ms1[0], fp32_ms_batch8=ms8[0], int8_over_fp32_batch1=round(ms1[1] / ms1[0], 3), int8_over_fp32_batch8=round(ms8[1] / ms8[0], 3))
    if all_int8:
        guard.update(unguarded_int8_over_fp32_batch1=round(ms1[2] / ms1[0], 3), unguarded_int8_over_fp32_batch8=round(ms8[2] / ms8[0], 3))
        if speed.worst_ratio(ms, 2) < speed.worst_ratio(ms, 1):
            replace_contents(model, all_int8[0])
            report = all_int8[1]
            report.model = model
            report.stats["speed_guard"] = dict(guard, kept="INT8 without the layer guard: faster than with the slower layers in float")
            guard = report.stats["speed_guard"]
    worst = min(speed.worst_ratio(ms, i) for i in range(1, len(candidates)))
    if worst > speed.INT8.model_ratio:
        replace_contents(model, fp32)
        why = f"INT8 measured {worst:.2f}x the fp32 latency (2 threads, worse of batch 1 and 8): the model is kept in float"
        return PassReport(model, False, skipped=[Skipped("model", why)], stats={"speed_guard": guard})
    return report


def mixed_precision(model: ir.Model, fp32: ir.Model, report: PassReport, *, max_drop: float, eval_samples: int,
                    context: PassContext, requantize: Requantize) -> PassReport:
    """Keep the weighted layers that add the most error in float until the metric drop fits ``max_drop``.

    Layers are ranked once by the noise they add relative to their output (:func:`local_losses`,
    quantized vs float, first calibration batch); the number kept in float doubles until the
    drop fits, then a bisection finds the smallest such number. Each try re-quantizes the
    float model with those layers excluded.
    """
    calib = context.calibration
    # the pipeline's evaluation samples, which the labels and the budget are about; else calibration's
    feeds = context.eval_feeds or list(calib.batches(calib.batch_size_for(fp32, 16), limit=eval_samples))
    n = feed_samples(feeds)
    labels = None if context.labels is None else np.asarray(context.labels)[:n]
    ref = V.run_model(fp32, feeds)

    def drop(m: ir.Model) -> float:
        d = V.compare_outputs(ref, V.run_model(m, feeds), labels, context.metric).metric_drop()
        return 0.0 if d is None else d

    d0 = drop(model)
    info = {"budget": max_drop, "drop_all_int8": round(d0, 3), "float_layers": [], "tries": 1}
    if d0 <= max_drop:
        report.stats["mixed_precision"] = dict(info, drop=round(d0, 3))
        return report
    local = local_losses(fp32, model, report.changed, calib)
    kinds = {n_.name: n_.op_type for n_ in fp32.graph}
    weighted = [k_ for k_ in local if kinds.get(k_) in WEIGHTED]
    # Weighted layers first (they carry the integer speed-up), activation-only nodes last.
    order = sorted(weighted, key=lambda k_: -local[k_]) + sorted(set(local) - set(weighted), key=lambda k_: -local[k_])

    def attempt(k: int) -> tuple[ir.Model, PassReport, float]:
        trial, rep = requantize({n_: f"kept in float for the accuracy budget (adds noise at {local[n_]:.1f} dB of its output)" for n_ in order[:k]})
        return trial, rep, drop(trial)

    best = None
    k, lo = 1, 0
    while True:
        trial, rep, d = attempt(k)
        info["tries"] += 1
        if d <= max_drop:
            best = (k, trial, rep, d)
            break
        lo = k
        if k >= len(order):
            best = (k, trial, rep, d)
            break
        k = min(2 * k, len(order))
    hi = best[0]
    while best[3] <= max_drop and hi - lo > 1:  # smallest k that still fits
        mid = (lo + hi) // 2
        trial, rep, d = attempt(mid)
        info["tries"] += 1
        if d <= max_drop:
            best, hi = (mid, trial, rep, d), mid
        else:
            lo = mid
    k, trial, rep, d = best
    replace_contents(model, trial)
    rep.model = model
    info.update(drop=round(d, 3), float_layers=order[:k], noise_added_db={n_: round(local[n_], 2) for n_ in order[:k]})
    rep.stats["mixed_precision"] = info
    if d > max_drop:
        rep.skipped.append(Skipped("budget", f"drop {d:.2f} points exceeds {max_drop} even with every layer in float"))
    return rep
