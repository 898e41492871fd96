"""The ``quantize`` pass: QuantizeLinear/DequantizeLinear placed where onnxruntime fuses them.

Placement (what onnxruntime's CPU provider turns into integer kernels):

* Conv, Gemm, MatMul with constant weights: weights stored as **int8
  initializers** (symmetric, per output channel by default) followed by
  DequantizeLinear, bias as int32 with scale ``s_x · s_w``; the activation
  input gets ``Q → DQ``. onnxscript's constant folder never folds Q/DQ, and
  onnxruntime needs the int8 initializer + DQ form to build QLinearConv, so
  this pass writes it directly.
* Add, Mul (two activations), Concat, AveragePool, GlobalAveragePool: every
  activation input and the output quantized.
* The output of a quantized op is quantized *after* a following Relu or
  Clip(0, 6): the activation's range is the quantizer's, and onnxruntime's
  Relu/Clip-quant fusion removes the activation. A quantized Relu output has
  zero point 0 (uint8) and no wasted codes.
* MaxPool, Reshape, Transpose, Flatten, Squeeze, Unsqueeze, Resize, Slice,
  Split, Gather reuse
  their input's scale and zero point on the output, so onnxruntime drops the
  Q/DQ pair around them instead of converting back to float.
* LeakyRelu, Sigmoid and Softmax need no rule of their own: the output of
  every quantized op is quantized, and so is every input of one, so an
  activation between two quantized ops already sits in ``DQ → op → Q`` and
  onnxruntime runs QLinearLeakyRelu / QLinearSigmoid / QLinearSoftmax.
* Each consumer gets its own DequantizeLinear (onnxruntime's node units need
  unshared DQ outputs); graph outputs stay float.

Activations are uint8 asymmetric by default (x86: u8s8 kernels), int8 on request.
Ranges come from :mod:`passes.quantization.ranges`. After the rewrite the
pass asks onnxruntime what it made of the graph (:mod:`passes.quantization.fusion`)
and reports every Conv/Gemm/MatMul left in float.

Before::

    x → Conv(W, b) → Relu → y
After::

    x → Q → DQ → Conv(DQ(W_int8), DQ(b_int32)) → Relu → Q → DQ → y
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from typing import Literal, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from compiler.ir_utils import add_initializer, const_array, infer_shapes, node_label, replace_contents
from compiler.registry import OnnxccPass, PassReport, Skipped, register
from passes.quantization import ranges as R

logger = logging.getLogger(__name__)

# GPTQ needs H to describe the layer's inputs: with fewer calibration rows than this fraction of
# its inputs per output, a layer keeps nearest rounding. Dampened GPTQ still generalised at a third
# (the digits MobileNetV3 classifier: 64 rows for 193 inputs, SQNR up 0.1 dB; the torch-zoo
# EfficientNet's squeeze-excite convs and classifier, 64 rows each, up 1.8 dB with them).
MIN_ROWS_FRACTION = 0.125
WEIGHTED = {"Conv", "Gemm", "MatMul"}
ACTIVATION_ONLY = {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool"}
SAME_SCALE = {"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Slice", "Split", "Gather"}
ABSORBED = {"Relu", "Clip"}


@register
class QuantizePass(OnnxccPass):
    name = "quantize"
    exact = False
    needs_calibration = True
    summary = "INT8 QDQ quantization placed for onnxruntime's integer kernels (per-channel int8 weights, int32 bias)"

    @dataclasses.dataclass(frozen=True)
    class Config:
        method: Literal["minmax", "percentile", "entropy", "mse"] = dataclasses.field(
            default="minmax", metadata={"help": "activation range estimation"}
        )
        percentile: float = dataclasses.field(default=99.999, metadata={"help": "for method=percentile"})
        per_channel: bool = dataclasses.field(default=True, metadata={"help": "per-output-channel weight scales"})
        activations: Literal["uint8", "int8"] = dataclasses.field(default="uint8", metadata={"help": "activation type (uint8 suits x86)"})
        exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "node-name patterns kept in float"})
        calib_samples: int = dataclasses.field(default=256, metadata={"help": "calibration samples used at most"})
        bias_correction: bool = dataclasses.field(default=False, metadata={"help": "correct each layer's bias for its weights' quantization error, from input channel means"})
        check_fusion: bool = dataclasses.field(default=True, metadata={"help": "report the layers onnxruntime leaves in float"})
        max_drop: float | None = dataclasses.field(default=None, metadata={"help": "mixed precision: keep the layers adding the most error in float until the top-1 agreement (accuracy with labels) drop on calibration samples is at most this many points"})
        eval_samples: int = dataclasses.field(default=64, metadata={"help": "mixed precision: calibration samples the drop is measured on"})
        speed_guard: bool = dataclasses.field(default=False, metadata={"help": "profile INT8 against fp32 (batch 1, 2 threads): layers whose integer kernel is slower stay float, and the whole model stays float if INT8 is still slower at batch 1 or 8; the result then depends on timing"})
        layer_errors: bool = dataclasses.field(default=True, metadata={"help": "report each quantized layer's error contribution (dB of SQNR lost across it, first calibration batch)"})
        decompose_hard_activations: bool = dataclasses.field(default=True, metadata={"help": "HardSigmoid/HardSwish as Add/Clip/Mul so they run in uint8"})
        weight_rounding: Literal["nearest", "gptq"] = dataclasses.field(default="gptq", metadata={"help": "int8 weight codes: nearest, or GPTQ (codes chosen for the layer's output on calibration data; same format and kernels)"})
        float_excitation: bool = dataclasses.field(default=False, metadata={"help": "keep squeeze-excite branches (GlobalAveragePool → … → the Mul that scales the feature map) in float: they hold one value per channel, so integer kernels save nothing there, and their error scales every pixel"})

        def __post_init__(self):
            if not 50.0 < self.percentile <= 100.0:
                raise ValueError("percentile must be in (50, 100]")

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger") for n in model.graph):
            raise ir.passes.PreconditionError("the model is already quantized")

    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        from compiler.ir_utils import clone_model

        fp32 = clone_model(model) if (cfg.speed_guard or cfg.max_drop is not None or cfg.layer_errors) else None
        report = self._quantize(model)
        if report.modified and cfg.max_drop is not None:
            report = self._mixed_precision(model, fp32, report)
        all_int8 = None
        if report.modified and cfg.speed_guard:
            all_int8 = (clone_model(model), report)
            report = self._layer_speed_guard(model, fp32, report)
            if not report.stats["speed_guard"]["slower_layers"]:
                all_int8 = None
        if not report.modified or not cfg.speed_guard:
            if report.modified and cfg.layer_errors:
                self._record_layer_errors(model, fp32, report)
            return report
        # Whole model: fp32, the layer-guarded INT8 model and (when the layer guard changed
        # anything) the all-INT8 model, timed side by side; the fastest is kept. Moving layers
        # back to float adds Q/DQ boundaries, so the layer-guarded model is not always faster.
        from compiler.bench import bench_models

        # Batch 1 and batch 8: a model that wins at one and loses at the other (small feature maps,
        # where Q/DQ boundaries cost more per image at batch 1) must not pass as faster.
        candidates = [("fp32", fp32), ("int8", model)] + ([("int8-no-layer-guard", all_int8[0])] if all_int8 else [])
        guard = report.stats["speed_guard"]
        per_batch = {}
        for batch in (1, 8):
            res = bench_models(candidates, threads=2, batch=batch, rounds=3, block=8, measure_memory=False)
            per_batch[batch] = [e.median_ms for e in res.entries]
        ms1, ms8 = per_batch[1], per_batch[8]
        ratios = [(ms1[i] / ms1[0], ms8[i] / ms8[0]) for i in range(1, len(candidates))]  # per INT8 candidate: (batch 1, batch 8)
        guard.update(fp32_ms=ms1[0], fp32_ms_batch8=ms8[0], int8_over_fp32_batch1=round(ratios[0][0], 3), int8_over_fp32_batch8=round(ratios[0][1], 3))
        if all_int8:
            guard.update(unguarded_int8_over_fp32_batch1=round(ratios[1][0], 3), unguarded_int8_over_fp32_batch8=round(ratios[1][1], 3))
            if max(ratios[1]) < max(ratios[0]):
                replace_contents(model, all_int8[0])
                report = all_int8[1]
                report.model = model
                report.stats["speed_guard"] = dict(guard, kept="INT8 without the layer guard: faster than with the slower layers in float")
                guard = report.stats["speed_guard"]
        worst = min(max(r) for r in ratios)
        if worst > 1.0:
            replace_contents(model, fp32)
            why = f"INT8 measured {worst:.2f}x the fp32 latency (2 threads, worse of batch 1 and 8): the model is kept in float"
            return PassReport(model, False, skipped=[Skipped("model", why)], stats={"speed_guard": guard})
        if cfg.layer_errors:
            self._record_layer_errors(model, fp32, report)
        return report

    def _requantize(self, fp32: ir.Model, extra_exclude: Sequence[str]) -> tuple[ir.Model, PassReport]:
        from compiler.ir_utils import clone_model

        trial = clone_model(fp32)
        c = dataclasses.replace(self.config, exclude=self.config.exclude + tuple(extra_exclude), max_drop=None, speed_guard=False)
        return trial, QuantizePass(c, self.context)._quantize(trial)

    def _local_losses(self, fp32: ir.Model, model: ir.Model, names: Sequence[str], samples: int = 16) -> dict[str, float]:
        """dB of SQNR each node loses between its input and its output (quantized vs float, first batch).

        The error a layer *adds* to what reached it: SQNR(input) − SQNR(output),
        both measured against the float model on the first calibration batch.
        """
        from compiler.calibration import ActivationCollector

        calib = self.context.calibration
        layers = {n.name: n for n in fp32.graph if n.name in set(names) and n.inputs and n.inputs[0] is not None and n.outputs}
        pairs = {name: (node.inputs[0].name, node.outputs[0].name) for name, node in layers.items()}
        present = {v.name for v in model.graph.inputs} | {v.name for n in model.graph for v in n.outputs}
        pairs = {k: p for k, p in pairs.items() if p[0] in present and p[1] in present}
        tensors = sorted({t for pair in pairs.values() for t in pair})

        class First:
            def __init__(self):
                self.x = None

            def update(self, x):
                if self.x is None:
                    self.x = x

        got = {}
        for label, m in (("f", fp32), ("q", model)):
            red = {t: [First()] for t in tensors}
            ActivationCollector(m, calib).collect(red, limit=min(samples, calib.batch_size_for(fp32, 16)))
            got[label] = {t: r[0].x for t, r in red.items()}

        def sqnr(t: str) -> float:
            a, b = got["f"][t].astype(np.float64), got["q"][t].astype(np.float64)
            err = float(np.sum((a - b) ** 2))
            return 200.0 if err == 0 else 10 * np.log10(max(float(np.sum(a * a)), 1e-30) / err)

        return {name: sqnr(i) - sqnr(o) for name, (i, o) in pairs.items()}

    def _record_layer_errors(self, model: ir.Model, fp32: ir.Model, report: PassReport) -> None:
        """Every quantized node's error contribution (dB of SQNR lost across it) in ``stats["layers"]``."""
        by_name = {n.name: n for n in fp32.graph if n.name}
        # 4 samples: every layer's input and output of both models are held at once (ResNet-50 at
        # 224x224: ~100 MB a sample and model); the ranking for mixed precision uses 16.
        losses = self._local_losses(fp32, model, [c for c in report.changed if c in by_name], samples=4)
        layers = report.stats.setdefault("layers", {})
        heavy = set(report.stats.get("fusion", {}).get("float_heavy", []))
        for name, loss in losses.items():
            entry = layers.setdefault(name, {"op": by_name[name].op_type})
            entry["error_db"] = round(float(loss), 3)
            if "fusion" in report.stats and by_name[name].op_type in WEIGHTED:
                entry["fused"] = not any(name == h or h.startswith(name + "_token") for h in heavy)
        report.stats["error_ranking"] = sorted(losses, key=lambda k: -losses[k])[:10]

    def _layer_speed_guard(self, model: ir.Model, fp32: ir.Model, report: PassReport) -> PassReport:
        """Keep in float each layer whose integer kernel measures slower than its float kernel.

        Both models are profiled by onnxruntime (batch 1, 2 threads) twice, interleaved; a
        layer's time is the smaller of its two medians. A layer goes back to float when its
        integer kernel takes more than ``1.15 × float + 3 µs``; the model is then re-quantized
        once without those layers. The Q/DQ nodes around a layer are not charged to it: the
        whole-model guard that follows catches a model that is slower overall.
        """
        from compiler.bench import layer_times, profile_nodes

        def times(m: ir.Model) -> dict[str, float]:
            return layer_times(m, profile_nodes(m, threads=2, batch=1, runs=20))

        runs = [times(fp32), times(model), times(fp32), times(model)]
        f = {k: min(runs[0].get(k, np.inf), runs[2].get(k, np.inf)) for k in runs[0]}
        q = {k: min(runs[1].get(k, np.inf), runs[3].get(k, np.inf)) for k in runs[1]}
        quantized = set(report.changed)
        per_layer = {k: {"fp32_us": round(f[k], 1), "int8_us": round(q[k], 1)} for k in quantized if k in f and k in q and np.isfinite(f[k]) and np.isfinite(q[k])}
        slower = sorted(k for k, t in per_layer.items() if t["int8_us"] > 1.15 * t["fp32_us"] + 3.0)
        guard = {"layers": per_layer, "slower_layers": slower}
        if slower:
            trial, rep = self._requantize(fp32, slower)
            replace_contents(model, trial)
            rep.model = model
            if "mixed_precision" in report.stats:
                rep.stats["mixed_precision"] = report.stats["mixed_precision"]
                rep.skipped.extend(s for s in report.skipped if "accuracy budget" in s.reason)
            for k in slower:
                t = per_layer[k]
                rep.skipped.append(Skipped(k, f"kept in float: its integer kernel measured {t['int8_us']:.0f} us vs {t['fp32_us']:.0f} us in float"))
            report = rep
        report.stats["speed_guard"] = guard
        return report

    def _mixed_precision(self, model: ir.Model, fp32: ir.Model, report: PassReport) -> PassReport:
        """Keep the weighted layers that add the most error in float until the metric drop fits ``max_drop``.

        Layers are ranked once by the SQNR they lose between their input and their output
        (quantized vs float, first calibration batch); the number kept in float doubles until the
        drop fits, then a bisection finds the smallest such number. Each try re-quantizes the
        float model with those layers excluded.
        """
        from compiler import verify as V

        cfg = self.config
        calib = self.context.calibration
        feeds = list(calib.batches(calib.batch_size_for(fp32, 16), limit=cfg.eval_samples))
        n = sum(next(iter(f.values())).shape[0] for f in feeds)
        labels = None if self.context.labels is None else np.asarray(self.context.labels)[:n]
        ref = V.run_model(fp32, feeds)

        def drop(m: ir.Model) -> float:
            d = V.compare_outputs(ref, V.run_model(m, feeds), labels, self.context.top_k).metric_drop()
            return 0.0 if d is None else d

        d0 = drop(model)
        info = {"budget": cfg.max_drop, "drop_all_int8": round(d0, 3), "float_layers": [], "tries": 1}
        if d0 <= cfg.max_drop:
            report.stats["mixed_precision"] = dict(info, drop=round(d0, 3))
            return report
        local = self._local_losses(fp32, model, report.changed)
        kinds = {n_.name: n_.op_type for n_ in fp32.graph}
        weighted = [k_ for k_ in local if kinds.get(k_) in WEIGHTED]
        # Weighted layers first (they carry the integer speed-up), activation-only nodes last.
        order = sorted(weighted, key=lambda k_: -local[k_]) + sorted(set(local) - set(weighted), key=lambda k_: -local[k_])

        def attempt(k: int) -> tuple[ir.Model, PassReport, float]:
            trial, rep = self._requantize(fp32, order[:k])
            return trial, rep, drop(trial)

        best = None
        k, lo = 1, 0
        while True:
            trial, rep, d = attempt(k)
            info["tries"] += 1
            if d <= cfg.max_drop:
                best = (k, trial, rep, d)
                break
            lo = k
            if k >= len(order):
                best = (k, trial, rep, d)
                break
            k = min(2 * k, len(order))
        hi = best[0]
        while best[3] <= cfg.max_drop and hi - lo > 1:  # smallest k that still fits
            mid = (lo + hi) // 2
            trial, rep, d = attempt(mid)
            info["tries"] += 1
            if d <= cfg.max_drop:
                best, hi = (mid, trial, rep, d), mid
            else:
                lo = mid
        k, trial, rep, d = best
        replace_contents(model, trial)
        rep.model = model
        info.update(drop=round(d, 3), float_layers=order[:k], local_sqnr_loss_db={n_: round(local[n_], 2) for n_ in order[:k]})
        rep.stats["mixed_precision"] = info
        if d > cfg.max_drop:
            rep.skipped.append(Skipped("budget", f"drop {d:.2f} points exceeds {cfg.max_drop} even with every layer in float"))
        for name in order[:k]:
            rep.skipped.append(Skipped(name, f"kept in float for the accuracy budget (adds {local[name]:.1f} dB of error)"))
        return rep

    def _quantize(self, model: ir.Model) -> PassReport:
        cfg = self.config
        if model.opset_imports.get("", 0) < 13:  # per-axis QuantizeLinear/DequantizeLinear (paddle2onnx exports at 11/12)
            from compiler.ir_utils import convert_opset

            replace_contents(model, convert_opset(model, 13))
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common.TopologicalSortPass()(model)
        infer_shapes(model)
        graph = model.graph
        names_before = _value_names(graph)
        skipped: list[Skipped] = []
        limits: dict[ir.Value, tuple[float, float]] = {}  # value → interval its consumers can see
        decomposed = decompose_hard_activations(graph, limits) if cfg.decompose_hard_activations else 0
        decomposed += batchnorm_to_depthwise(graph)
        from passes.fold import reduce_mean_to_global_pool

        decomposed += reduce_mean_to_global_pool(model, squeezed=True)  # x.mean((2, 3)) → QLinearGlobalAveragePool
        if decomposed:
            infer_shapes(model)
        plan = _plan(graph, cfg, skipped)
        if not plan.nodes:
            return PassReport(model, False, skipped=skipped, stats={"quantized_layers": 0})

        names = [v.name for v in plan.calibrated]
        cache = self.context.activation_cache
        before = dict(cache.get("_stats", {"collected": 0, "reused": 0}))
        rng = R.collect_ranges(model, self.context.calibration, names, method=cfg.method, percentile=cfg.percentile, samples=cfg.calib_samples, cache=cache)
        reused = cache["_stats"]["reused"] - before["reused"]
        params: dict[ir.Value, tuple[np.float32, int]] = {}
        clamped = 0
        for v in plan.calibrated:
            lo, hi = rng[v.name]
            if v in limits:
                lo2, hi2 = max(lo, min(limits[v][0], 0.0)), min(hi, max(limits[v][1], 0.0))
                if (lo2, hi2) != (lo, hi):
                    clamped += 1
                    params[v] = _reaching_qparams(lo2, hi2, cfg.activations)
                    continue
            params[v] = R.qparams(lo, hi, dtype=cfg.activations)
        rescaled = []
        for out, src, factor in plan.same_scale:  # topological order: src already has params
            if src in params:
                params[out] = (np.float32(params[src][0] * factor), params[src][1])
                if factor != 1.0:
                    rescaled.append(out)

        means = _input_means(model, self.context.calibration, plan, cfg) if cfg.bias_correction else {}
        rounded = _gptq_weights(model, self.context.calibration, [n for n in plan.weighted if n.inputs[0] in params], cfg, skipped, self.context.activation_cache) if cfg.weight_rounding == "gptq" else {}
        layers = {}
        cache: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value]] = {}
        for node in plan.weighted:
            x = node.inputs[0]
            if x not in params:
                skipped.append(Skipped(node_label(node), "input activation not quantized"))
                continue
            layers[node_label(node)] = _quantize_weights(graph, node, params[x][0], cfg, cache, means.get(node), rounded.get(node))
        for v, (scale, zp) in params.items():
            _insert_qdq(graph, v, scale, zp, cfg.activations)
        for out in rescaled:
            _bypass_rescale(out)
        for node in plan.nodes:
            if node.op_type in ("Add", "Mul"):
                for i, v in enumerate(node.inputs):
                    if v is not None and not _is_activation(v) and _small_float_const(v):
                        _quantize_constant_operand(graph, node, i, cfg.activations)
        compacted = _compact_constants(graph)
        common.TopologicalSortPass()(model)  # nodes were appended: sort first so dead chains go in one sweep
        common.RemoveUnusedNodesPass()(model)
        ranges = {v.name: [float(rng[v.name][0]), float(rng[v.name][1])] for v in plan.calibrated}  # under the names calibration saw
        _shorten_new_names(graph, names_before)

        stats = {
            "constants_compacted": compacted,
            "method": cfg.method,
            "activations": cfg.activations,
            "quantized_layers": len(plan.nodes),
            "quantized_tensors": len(params),
            "ranges_reused": reused,  # from earlier passes / tries, the tensors' computation unchanged
            "float_ops_rewritten": decomposed,
            "ranges_clamped": clamped,  # pre-activation ranges cut to where HardSigmoid/HardSwish is not flat
            "layers": layers,
            "ranges": ranges,
        }
        if cfg.check_fusion:
            from passes.quantization.fusion import fusion_report

            fusion = fusion_report(model)
            stats["fusion"] = fusion
            for name in fusion["float_heavy"]:
                skipped.append(Skipped(name, "onnxruntime left this layer in float (not fused into an integer kernel)"))
        changed = [node_label(n) for n in plan.nodes]
        return PassReport(model, True, changed=changed, skipped=skipped, stats=stats)


@dataclasses.dataclass
class _Plan:
    nodes: list[ir.Node]
    weighted: list[ir.Node]
    calibrated: list[ir.Value]
    same_scale: list[tuple[ir.Value, ir.Value, float]]  # (output, input, scale factor)


def _is_float(v: ir.Value | None) -> bool:
    return v is not None and (v.dtype is None or v.dtype == ir.DataType.FLOAT)


def _is_activation(v: ir.Value | None) -> bool:
    return v is not None and _is_float(v) and const_array(v) is None


def _plan(graph: ir.Graph, cfg, skipped: list[Skipped]) -> _Plan:
    outputs = set(graph.outputs)
    excluded = lambda n: any(fnmatch.fnmatchcase(n.name or "", p) for p in cfg.exclude)  # noqa: E731
    nodes, weighted = [], []
    marked: dict[ir.Value, None] = {}
    excitation = excitation_branches(graph) if cfg.float_excitation else set()

    def mark(v: ir.Value) -> None:
        if v not in outputs:
            marked.setdefault(v, None)

    for node in graph:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or (op not in WEIGHTED and op not in ACTIVATION_ONLY):
            continue
        if excluded(node):
            skipped.append(Skipped(node_label(node), "excluded by pattern: kept in float"))
            continue
        if node in excitation:
            if op in WEIGHTED:
                skipped.append(Skipped(node_label(node), "squeeze-excite branch (one value per channel): kept in float"))
            continue
        if _positive_scalar_mul(node) is not None:
            continue  # a rescale: folded into the dequantization scale below, if its input is quantized
        why = _why_not(node)
        if why:
            skipped.append(Skipped(node_label(node), why))
            continue
        nodes.append(node)
        if op in WEIGHTED:
            weighted.append(node)
            mark(node.inputs[0])
        else:
            for v in node.inputs:
                if _is_activation(v):
                    mark(v)
        out = node.outputs[0]
        uses = out.uses()
        if len(uses) == 1 and uses[0].node.op_type in ABSORBED and _absorbable(uses[0].node) and not excluded(uses[0].node):
            out = uses[0].node.outputs[0]
        mark(out)
    # Same-scale ops: Q/DQ around them are dropped by onnxruntime when scales match.
    # Mul by a positive scalar α: its output is the input's codes read with scale s·α (no kernel at all).
    same: list[tuple[ir.Value, ir.Value, float]] = []
    for node in graph:
        alpha = _positive_scalar_mul(node)
        if alpha is not None and not excluded(node):
            x = next(v for v in node.inputs if _is_activation(v))
            out = node.outputs[0]
            if x in marked and out not in outputs and len(x.uses()) == 1:
                marked.setdefault(out, None)
                same.append((out, x, alpha))
            continue
        if node.op_type in SAME_SCALE and node.inputs and node.inputs[0] in marked:
            for out in node.outputs:
                if out not in outputs and _is_float(out) and out.uses() and (node.op_type != "MaxPool" or out is node.outputs[0]):
                    marked.setdefault(out, None)
                    same.append((out, node.inputs[0], 1.0))
    same_outs = {o for o, _, _ in same}
    calibrated = [v for v in marked if v not in same_outs]
    return _Plan(nodes, weighted, calibrated, same)


def _reaching_qparams(lo: float, hi: float, dtype: str) -> tuple[np.float32, int]:
    """``qparams(lo, hi)`` widened until the end codes dequantize to ``lo`` and ``hi`` or beyond.

    A range cut where an activation turns flat is exact only if the clamped value is still on
    the flat side: with a rounded zero point, code 0 may dequantize to −2.99 instead of −3, and
    every value below −3 would then come out of HardSwish as −0.005 instead of 0.
    """
    qmin, qmax = (0, 255) if dtype == "uint8" else (-128, 127)
    for _ in range(8):
        scale, zp = R.qparams(lo, hi, dtype=dtype)
        low, high = (qmin - zp) * float(scale), (qmax - zp) * float(scale)
        if low <= lo and high >= hi:
            break
        lo, hi = (lo - float(scale) if low > lo else lo), (hi + float(scale) if high < hi else hi)
    return scale, zp


def _per_channel(v: ir.Value) -> bool:
    """``v`` holds one value per channel: shape known, rank ≥ 3 and every spatial dim 1."""
    dims = v.shape.dims if v.shape is not None else None
    return dims is not None and len(dims) >= 3 and all(d == 1 for d in dims[2:])


def excitation_branches(graph: ir.Graph) -> set[ir.Node]:
    """Nodes of squeeze-excite branches: from a GlobalAveragePool through per-channel tensors to the Mul(s) that scale a feature map.

    A branch counts only when every path out of the pool stays per-channel (``N×C×1×1``)
    until it multiplies a tensor with spatial extent; a pool that feeds a classifier head
    (Reshape/Flatten to ``N×C``) or anything else is left alone. The pool and the scaling Mul
    are not in the branch: they touch whole feature maps and stay QLinearGlobalAveragePool and
    QLinearMul, so only C values a branch cross between uint8 and float.
    """
    found: set[ir.Node] = set()
    for pool in graph:
        if pool.op_type != "GlobalAveragePool" or pool.domain not in ("", "ai.onnx") or not _per_channel(pool.outputs[0]):
            continue
        branch, ends, todo, ok = set(), 0, [pool.outputs[0]], True
        while todo and ok:
            v = todo.pop()
            if v.is_graph_output():
                ok = False
                break
            for use in v.uses():
                n = use.node
                if n in branch:
                    continue
                others = [o for o in n.inputs if o is not None and o is not v and _is_activation(o)]
                if n.op_type == "Mul" and others and not any(_per_channel(o) for o in others):
                    ends += 1  # scales the feature map
                elif n.domain in ("", "ai.onnx") and n.outputs and all(_per_channel(o) for o in n.outputs):
                    branch.add(n)
                    todo.extend(n.outputs)
                else:
                    ok = False
                    break
        if ok and ends:
            found |= branch
    return found


def _absorbable(node: ir.Node) -> bool:
    if node.op_type == "Relu":
        return True
    lo = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    return lo is not None and lo.size == 1 and float(lo.reshape(-1)[0]) == 0.0


def _why_not(node: ir.Node) -> str | None:
    op = node.op_type
    if op in WEIGHTED:
        if not _is_activation(node.inputs[0]):
            return "input is not a float activation"
        w = const_array(node.inputs[1])
        if w is None or w.dtype != np.float32:
            return "weight is not a float constant"
        if op == "Gemm" and node.attributes.get("transA") is not None and node.attributes["transA"].value:
            return "Gemm with transA"
        if op == "MatMul" and w.ndim != 2:
            return "MatMul weight is not 2-D"
        if op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and const_array(node.inputs[2]) is None:
            return "Gemm bias is not constant"
        return None
    ins = [v for v in node.inputs if v is not None]
    if op in ("Add", "Mul"):
        # one operand may be a small float constant: it is stored as a uint8 initializer + DQ
        acts = [v for v in ins if _is_activation(v)]
        consts = [v for v in ins if not _is_activation(v)]
        if acts and all(_small_float_const(v) for v in consts):
            return None
        return "has a non-float or large constant operand (kept in float)"
    if not all(_is_activation(v) for v in ins):
        return "has a constant or non-float operand (kept in float)"
    return None


def _positive_scalar_mul(node: ir.Node) -> float | None:
    """α when ``node`` is ``Mul(x, α)`` with a positive scalar constant α and x an activation."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    acts = [v for v in node.inputs if _is_activation(v)]
    consts = [const_array(v) for v in node.inputs if v is not None and not _is_activation(v)]
    if len(acts) != 1 or len(consts) != 1 or consts[0] is None or consts[0].size != 1 or consts[0].dtype != np.float32:
        return None
    alpha = float(consts[0].reshape(-1)[0])
    return alpha if alpha > 0 and np.isfinite(alpha) else None


def _bypass_rescale(out: ir.Value) -> None:
    """``Q(x) → DQ → Mul(α) → Q(s·α) → DQ_k``  ⇒  ``Q(x) → DQ_k(scale s·α)``: the Mul and its quantizer go."""
    mul = out.producer()
    q_out = next((u.node for u in out.uses() if u.node.op_type == "QuantizeLinear"), None)
    dq_in = next((v.producer() for v in mul.inputs if v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"), None)
    if q_out is None or dq_in is None or len(out.uses()) != 1:
        return
    codes = dq_in.inputs[0]
    for use in list(q_out.outputs[0].uses()):
        use.node.replace_input_with(0, codes)


def _small_float_const(v: ir.Value) -> bool:
    c = const_array(v)
    return c is not None and c.dtype == np.float32 and c.size <= 4096 and bool(np.all(np.isfinite(c)))


def _dq_node(graph: ir.Graph, q: ir.Value, scale: ir.Value, zp: ir.Value | None, axis: int | None, name: str) -> ir.Node:
    """DequantizeLinear(q, scale[, zp]); no ``zp``: the operator's default zero point 0."""
    attrs = {"axis": axis} if axis is not None else {}
    node = ir.node("DequantizeLinear", [q, scale] if zp is None else [q, scale, zp], attributes=attrs, name=name)
    node.outputs[0].name = f"{name}_out"
    node.outputs[0].dtype = ir.DataType.FLOAT
    graph.append(node)
    return node


def _weight_axis(node: ir.Node) -> int:
    """The output-channel axis of a Conv/Gemm/MatMul weight."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        tb = node.attributes.get("transB")
        return 0 if tb is not None and tb.value else 1
    return 1


def _gptq_weights(model: ir.Model, calib, nodes: list[ir.Node], cfg, skipped: list[Skipped], cache: dict) -> dict[ir.Node, tuple[np.ndarray, np.ndarray, dict]]:
    """GPTQ codes per layer, ``{node: (int8 weight, scales, stats)}``: each layer's input Gram matrix
    from the float model, accumulated while streaming the calibration data.

    ``cache`` (the pipeline's activation cache) keeps the codes by the fingerprint of the layer's
    output, which covers its weights and everything before it: the re-quantizations of mixed
    precision and of the speed guard round each unchanged layer once.
    """
    from compiler.calibration import ActivationCollector, tensor_fingerprints
    from compiler.progress import bar
    from passes.quantization import gptq as G

    out = {}
    fps = tensor_fingerprints(model)
    key = {n: ("gptq", fps.get(n.outputs[0].name), cfg.per_channel, cfg.calib_samples) for n in nodes}
    order = {n: i for i, n in enumerate(model.graph)}
    todo: dict[ir.Node, int] = {}  # node → bytes of its Gram matrices
    for node in sorted(nodes, key=order.__getitem__):
        if key[node] in cache:
            hit = cache[key[node]]
            if isinstance(hit, str):
                skipped.append(Skipped(node_label(node), hit))
            else:
                out[node] = hit
            continue
        why = G.is_supported(node)
        g, _, n = G.weight_groups(node, const_array(node.inputs[1]))[0].shape if why is None else (0, 0, 0)
        if why is None and n > G.MAX_INPUTS:
            why = f"{n} inputs per output (GPTQ's H would be too large)"
        if why:
            skipped.append(Skipped(node_label(node), f"weights rounded to nearest: {why}"))
            continue
        todo[node] = g * n * n * 4  # float32
    if not todo:
        return out
    # Streaming passes over the calibration data (memory flat in the number of samples), each
    # accumulating the Gram matrices of as many layers as fit in GRAM_BUDGET bytes.
    passes: list[list[ir.Node]] = [[]]
    size = 0
    for node, need in todo.items():
        if passes[-1] and size + need > G.GRAM_BUDGET:
            passes.append([])
            size = 0
        passes[-1].append(node)
        size += need
    progress = bar("GPTQ rounding")
    done = 0
    for group in passes:
        grams = {node: G.InputGram(node) for node in group}
        reducers: dict[str, list] = {}
        for node, gram in grams.items():
            reducers.setdefault(node.inputs[0].name, []).append(gram)
        ActivationCollector(model, calib, batch_size=8).collect(reducers, limit=cfg.calib_samples)
        for node in group:
            gram = grams.pop(node)
            done += 1
            if progress:
                progress(done, len(todo))
            _gptq_layer(node, gram, cfg, key[node], cache, out, skipped)
    return out


def _gptq_layer(node: ir.Node, gram, cfg, key, cache: dict, out: dict, skipped: list[Skipped]) -> None:
    """One layer's GPTQ codes from its input Gram matrix, into ``out`` and ``cache``; nearest rounding (with the reason) when too few rows."""
    from passes.quantization import gptq as G

    w = const_array(node.inputs[1])
    m, back = G.weight_groups(node, w)
    if gram.rows < MIN_ROWS_FRACTION * m.shape[2]:  # H says too little about the inputs: codes would fit these rows only
        why = f"weights rounded to nearest: {gram.rows} calibration rows for {m.shape[2]} inputs per output (GPTQ needs at least {MIN_ROWS_FRACTION:g} of that)"
        skipped.append(Skipped(node_label(node), why))
        cache[key] = why
        return
    axis = _weight_axis(node)
    q_near, s_w = R.per_channel_weight(w, axis, per_channel=cfg.per_channel)
    s_full = np.broadcast_to(_bcast(s_w, axis, w.ndim), w.shape)
    s_g = G.weight_groups(node, s_full)[0][:, :, 0]  # per output: constant along the inputs
    codes = G.gptq_codes(m, s_g, gram.h)
    q = back(codes).astype(np.int8)
    near, hat = G.weight_groups(node, q_near.astype(np.float64) * s_full)[0], G.weight_groups(node, q.astype(np.float64) * s_full)[0]
    e_near, e_gptq = G.output_error(m, near, gram.h), G.output_error(m, hat, gram.h)
    if not e_gptq < e_near:  # dampening and clipping can make it worse on a layer: keep nearest there
        q, e_gptq = q_near, e_near
    out[node] = cache[key] = (q, s_w, {"gptq_output_error_ratio": round(e_gptq / e_near, 4) if e_near > 0 else 1.0})


def _quantize_weights(graph, node, s_x: np.float32, cfg, cache, mean_x: np.ndarray | None, rounded: tuple | None = None) -> dict:
    op = node.op_type
    w_val = node.inputs[1]
    w = const_array(w_val)
    axis = _weight_axis(node)
    q, s_w = R.per_channel_weight(w, axis, per_channel=cfg.per_channel) if rounded is None else rounded[:2]
    key = (id(w_val), axis)
    if key not in cache:
        base = w_val.name or f"{node.name}_w"
        qv = add_initializer(graph, f"{base}_int8", q)
        sv = add_initializer(graph, f"{base}_scale", s_w)
        # Symmetric: zero point 0, left to the operator's default for Conv. Gemm/MatMul store it,
        # because onnxruntime's QGemm selector does not fuse without it.
        zv = None if op == "Conv" else add_initializer(graph, f"{base}_zero_point", np.zeros(s_w.shape, np.int8))
        cache[key] = (qv, sv, zv)
    qv, sv, zv = cache[key]
    dq = _dq_node(graph, qv, sv, zv, axis if cfg.per_channel else None, f"{node.name or 'w'}_weight_dq")
    node.replace_input_with(1, dq.outputs[0])
    info = {"op": op, "input_scale": float(s_x), "weight_scale_max": float(np.max(s_w)), "weight_sqnr_db": _sqnr(w, q.astype(np.float32) * _bcast(s_w, axis, w.ndim))}
    if rounded is not None:
        info.update(rounded[2])

    # bias: int32 with scale s_x · s_w (per output channel), zero point 0
    if op == "MatMul":
        return info
    b_val = node.inputs[2] if len(node.inputs) > 2 else None
    b = const_array(b_val) if b_val is not None else None
    n_out = w.shape[axis]
    if cfg.bias_correction and mean_x is not None and op == "Conv":
        w_err = q.astype(np.float64) * _bcast(s_w, axis, w.ndim) - w.astype(np.float64)
        g = node.attributes.get("group")
        group = g.value if g is not None else 1
        delta = _conv_mean_shift(w_err, mean_x, group)
        b = (np.zeros(n_out) if b is None else b.astype(np.float64)) - delta
        info["bias_correction_max"] = float(np.max(np.abs(delta)))
    if b is None:
        return info
    if b.ndim != 1 or b.shape[0] != n_out:
        if b.size == 1:
            b = np.full(n_out, float(b.reshape(-1)[0]))
        else:
            info["bias"] = "kept in float (not a per-channel vector)"
            return info
    if op == "Gemm":
        beta = node.attributes.get("beta")
        if beta is not None:
            b = b * beta.value
            node.attributes.pop("beta")
    s_b = (np.float64(s_x) * np.broadcast_to(s_w.astype(np.float64), (n_out,))).astype(np.float32)
    qb = np.round(b.astype(np.float64) / s_b)
    if np.any(np.abs(qb) > 2**31 - 1):
        info["bias"] = "kept in float (int32 overflow)"
        return info
    base = (b_val.name if b_val is not None and b_val.name else f"{node.name}_b")
    bq = add_initializer(graph, f"{base}_int32", qb.astype(np.int32))
    bs = add_initializer(graph, f"{base}_scale", s_b)
    dq = _dq_node(graph, bq, bs, None, 0, f"{node.name or 'b'}_bias_dq")  # zero point 0: the default
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, dq.outputs[0])
    return info


def _compact_constants(graph: ir.Graph) -> int:
    """Store a bias's int32 scale as ``Mul(s_x, s_w)`` of the two scales already stored; returns bytes saved.

    The scale is exactly ``s_x · s_w`` in float32. onnxruntime folds the Mul (level 1) before its
    QDQ fusion (level 2), so the layer still becomes one QLinearConv/QGemm, bit for bit. With the
    zero points left to their default (bias, Conv weights: see :func:`_quantize_weights`), that is
    9·C of the 13·C bytes of scales and zero points around an int8 layer of C channels: about 1.5%
    of the fp32 file on depthwise networks. Done once every activation has its scale stored.
    """
    saved = 0
    for node in list(graph):
        if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        x_dq, w_dq, b_dq = (v.producer() for v in node.inputs[:3])
        if any(p is None or p.op_type != "DequantizeLinear" for p in (x_dq, w_dq, b_dq)):
            continue
        s_x, s_w, s_b = (const_array(p.inputs[1]) for p in (x_dq, w_dq, b_dq))
        if s_x is None or s_w is None or s_b is None or s_x.size != 1 or s_b.size < 4:
            continue
        if s_w.size != s_b.size or not np.array_equal(s_x * s_w, s_b):  # per-tensor: a stored scalar is smaller than a Mul
            continue
        old = b_dq.inputs[1]
        mul = ir.node("Mul", [x_dq.inputs[1], w_dq.inputs[1]], name=f"{b_dq.name}_scale")
        mul.outputs[0].name = f"{b_dq.name}_scale_out"
        mul.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(b_dq, mul)
        b_dq.replace_input_with(1, mul.outputs[0])
        if not old.uses() and old.name in graph.initializers:
            saved += old.const_value.nbytes
            graph.initializers.pop(old.name)
    return saved


def _value_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    names.update(o.name for n in graph for o in n.outputs if o.name)
    return names


def _shorten_new_names(graph: ir.Graph, before: set[str]) -> None:
    """Give the tensors this pass made up (Q and DQ outputs, scales, zero points) short names, ``q0, q1, ...``.

    Exporters name tensors by module path (torch: 40-80 characters), and the names made from
    them were repeated about ten times per quantized tensor (its Q, its DQs, their scale and zero
    point): a third of the INT8 file of the digits MobileNetV3 (0.58 of fp32 with them, 0.40
    without). Node names keep the long form, so a viewer still shows which layer each Q/DQ
    belongs to; the int8/int32 weights keep their weight's name; graph inputs and outputs and
    every tensor the model had before are untouched.
    """
    taken = _value_names(graph)
    k = 0
    for v in [*graph.initializers.values(), *(o for n in graph for o in n.outputs)]:
        if not v.name or v.name in before or v.is_graph_output() or v.name.endswith(("_int8", "_int32")):
            continue
        while f"q{k}" in taken:
            k += 1
        v.name = f"q{k}"
        taken.add(v.name)


def _bcast(s: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if s.ndim == 0:
        return s
    shape = [1] * ndim
    shape[axis] = -1
    return s.reshape(shape)


def _sqnr(ref: np.ndarray, q: np.ndarray) -> float:
    err = float(np.sum((ref.astype(np.float64) - q) ** 2))
    sig = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if err == 0 else round(10 * np.log10(sig / err), 2)


def _conv_mean_shift(w_err: np.ndarray, mean_x: np.ndarray, group: int) -> np.ndarray:
    """E[(W_q − W) * x] per output channel for inputs with per-channel means (border effects ignored)."""
    cout, cin_g = w_err.shape[0], w_err.shape[1]
    per = w_err.reshape(cout, cin_g, -1).sum(2)
    cout_g = cout // group
    out = np.zeros(cout)
    for g in range(group):
        m = mean_x[g * cin_g:(g + 1) * cin_g]
        out[g * cout_g:(g + 1) * cout_g] = per[g * cout_g:(g + 1) * cout_g] @ m
    return out


def _input_means(model, calib, plan: _Plan, cfg) -> dict[ir.Node, np.ndarray]:
    from compiler.calibration import ActivationCollector, ChannelStats

    convs = [n for n in plan.weighted if n.op_type == "Conv"]
    reducers = {n.inputs[0].name: [ChannelStats(1)] for n in convs}
    ActivationCollector(model, calib).collect(reducers, limit=cfg.calib_samples)
    return {n: reducers[n.inputs[0].name][0].mean for n in convs}


def _quantize_constant_operand(graph: ir.Graph, node: ir.Node, idx: int, dtype: str) -> None:
    """A constant operand of Add/Mul as an 8-bit initializer + DequantizeLinear (so QLinearAdd/Mul can take it)."""
    v = node.inputs[idx]
    c = const_array(v).astype(np.float32)
    scale, zp = R.qparams(float(c.min()), float(c.max()), dtype)
    np_t = np.uint8 if dtype == "uint8" else np.int8
    info = np.iinfo(np_t)
    q = np.clip(np.round(c / scale) + zp, info.min, info.max).astype(np_t)
    base = v.name or f"{node.name}_const"
    qv = add_initializer(graph, f"{base}_q", q)
    sv = add_initializer(graph, f"{base}_q_scale", np.array(scale, np.float32))
    zv = add_initializer(graph, f"{base}_q_zero_point", np.array(zp, np_t))
    dq = _dq_node(graph, qv, sv, zv, None, f"{node.name or base}_const{idx}_dq")
    node.replace_input_with(idx, dq.outputs[0])


def batchnorm_to_depthwise(graph: ir.Graph) -> int:
    """A BatchNormalization left after folding (pre-activation: BN → ReLU → Conv) → depthwise 1×1 Conv.

    ``BN(x) = s·x + (β − μ·s)`` with ``s = γ/√(σ²+ε)`` is exactly a depthwise 1×1 convolution with
    one weight per channel, which quantizes per channel without loss (each channel's single weight
    is ±127 codes) and runs as QLinearConv instead of a float island between Q/DQ pairs.
    """
    count = 0
    for node in list(graph):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx") or any(o.uses() for o in node.outputs[1:]):
            continue
        x = node.inputs[0]
        params = [const_array(v) for v in node.inputs[1:5]]
        if x is None or x.shape is None or len(x.shape) != 4 or any(p is None for p in params):
            continue
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = node.attributes["epsilon"].value if "epsilon" in node.attributes else 1e-5
        s = gamma / np.sqrt(var + eps)
        c = s.shape[0]
        base = node.name or node.outputs[0].name or "bn"
        w = add_initializer(graph, f"{base}_dw_w", s.astype(np.float32).reshape(c, 1, 1, 1))
        b = add_initializer(graph, f"{base}_dw_b", (beta - mean * s).astype(np.float32))
        conv = ir.node("Conv", [x, w, b], attributes={"group": c, "kernel_shape": [1, 1]}, name=base)
        graph.insert_before(node, conv)
        out = node.outputs[0]
        conv.outputs[0].dtype, conv.outputs[0].shape = out.dtype, out.shape
        name = out.name
        out.replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        conv.outputs[0].name = name
        count += 1
    return count


def decompose_hard_activations(graph: ir.Graph, limits: dict[ir.Value, tuple[float, float]] | None = None) -> int:
    """HardSigmoid / HardSwish → Add, Clip, Mul (exact in float) so the pieces quantize to integer kernels.

    ``HardSigmoid(x) = α · clip(x + β/α, 0, 1/α)`` (α > 0) and ``HardSwish(x) = x · HardSigmoid(x)``
    with α = 1/6, β = 1/2. onnxruntime has no integer HardSigmoid/HardSwish; as QLinearAdd, a
    Clip absorbed by the quantizer, and QLinearMul, MobileNetV3-style networks stay in uint8.

    ``limits`` receives, for an input ``x`` read by nothing else, the interval outside which the
    activation does not depend on it: HardSigmoid is flat outside ``[−β/α, (1−β)/α]`` and
    HardSwish is 0 below ``−β/α`` (x times an exact uint8 zero). Clamping ``x``'s quantization
    range to it changes no output and spends the 256 codes where they matter (a BN-folded
    conv's pre-activations often reach −10 or lower).
    """
    count = 0
    for node in list(graph):
        if node.op_type not in ("HardSigmoid", "HardSwish") or node.domain not in ("", "ai.onnx"):
            continue
        x = node.inputs[0]
        alpha = node.attributes["alpha"].value if node.op_type == "HardSigmoid" and "alpha" in node.attributes else (0.2 if node.op_type == "HardSigmoid" else 1 / 6)
        beta = node.attributes["beta"].value if node.op_type == "HardSigmoid" and "beta" in node.attributes else 0.5
        if alpha <= 0 or x is None:
            continue
        if limits is not None and len(x.uses()) == 1 and not x.is_graph_output():
            lo = -beta / alpha
            limits[x] = (lo, (1.0 - beta) / alpha if node.op_type == "HardSigmoid" else np.inf)
        base = node.name or node.outputs[0].name or "hard"
        c_shift = add_initializer(graph, f"{base}_shift", np.array(beta / alpha, np.float32))
        c_lo = add_initializer(graph, f"{base}_lo", np.array(0.0, np.float32))
        c_hi = add_initializer(graph, f"{base}_hi", np.array(1.0 / alpha, np.float32))
        c_alpha = add_initializer(graph, f"{base}_alpha", np.array(alpha, np.float32))
        add = ir.node("Add", [x, c_shift], name=f"{base}_add")
        clip = ir.node("Clip", [add.outputs[0], c_lo, c_hi], name=f"{base}_clip")
        mul = ir.node("Mul", [clip.outputs[0], c_alpha], name=f"{base}_scale")
        new = [add, clip, mul]
        if node.op_type == "HardSwish":
            new.append(ir.node("Mul", [x, mul.outputs[0]], name=f"{base}_mul"))
        for i, n in enumerate(new):
            n.outputs[0].name = f"{base}_dec{i}"
            n.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(node, new)
        out = node.outputs[0]
        name, was_output = out.name, out.is_graph_output()
        out.replace_all_uses_with(new[-1].outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if was_output:
            new[-1].outputs[0].name = name
        count += 1
    return count


def _insert_qdq(graph: ir.Graph, v: ir.Value, scale: np.float32, zp: int, dtype: str) -> None:
    uses = list(v.uses())
    if not uses:
        return
    base = v.name or "t"
    np_t = np.uint8 if dtype == "uint8" else np.int8
    s = add_initializer(graph, f"{base}_scale", np.array(scale, np.float32))
    z = add_initializer(graph, f"{base}_zero_point", np.array(zp, np_t))
    qn = ir.node("QuantizeLinear", [v, s, z], name=f"{base}_Q")
    qn.outputs[0].name = f"{base}_quantized"
    qn.outputs[0].dtype = ir.DataType.UINT8 if dtype == "uint8" else ir.DataType.INT8
    graph.append(qn)
    for i, use in enumerate(uses):
        dq = _dq_node(graph, qn.outputs[0], s, z, None, f"{base}_DQ{i}")
        use.node.replace_input_with(use.idx, dq.outputs[0])
