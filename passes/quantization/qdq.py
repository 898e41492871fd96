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

The pass is split by concern, and this module only drives it:

* :mod:`.lower` — the exact rewrites run first (``lower-int8``, verified on its own);
* :mod:`.placement` — where Q/DQ go (the rules above);
* :mod:`.ranges` — activation ranges from calibration;
* :mod:`.gptq` — GPTQ weight rounding;
* :mod:`.emission` — int8 weights, int32 biases, Q/DQ nodes, compact constants;
* :mod:`.policies` — mixed precision under a budget, the speed guard, per-layer errors;
* :mod:`.fusion` — what onnxruntime made of the graph: every Conv/Gemm/MatMul left in float is reported.

Before::

    x → Conv(W, b) → Relu → y
After::

    x → Q → DQ → Conv(DQ(W_int8), DQ(b_int32)) → Relu → Q → DQ → y
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxcc.compiler.analysis import dense_intensity
from onnxcc.compiler.calibration import ChannelStats, Statistics
from onnxcc.compiler import weights as W
from onnxcc.compiler.ir_utils import clone_model, const_array, exclude_match, infer_shapes, node_label
from onnxcc.compiler.passbase import OnnxccPass, PassReport, Skipped
from onnxcc.passes.quantization import emission as E
from onnxcc.passes.quantization import gptq as G
from onnxcc.passes.quantization import placement as P
from onnxcc.passes.quantization import policies
from onnxcc.passes.quantization import ranges as R
from onnxcc.passes.quantization.dynamic import quantize_lstms
from onnxcc.passes.quantization.fusion import fusion_report
from onnxcc.passes.quantization.lower import LowerInt8Pass, flat_limits, lower
from onnxcc.passes.quantization.weights import int8_weight


class QuantizePass(OnnxccPass):
    name = "quantize"
    exact = False
    needs_calibration = True
    without_calibration = "or --weight-only / --fp16 / --dynamic"
    summary = "INT8 QDQ quantization placed for onnxruntime's integer kernels (per-channel int8 weights, int32 bias)"

    @dataclasses.dataclass(frozen=True)
    class Config:
        method: Literal["minmax", "percentile", "entropy", "mse"] = dataclasses.field(
            default="minmax", metadata={"help": "activation range estimation"}
        )
        percentile: float = dataclasses.field(default=99.999, metadata={"help": "for method=percentile"})
        per_channel: bool = dataclasses.field(default=True, metadata={"help": "per-output-channel weight scales"})
        reduce_range: bool = dataclasses.field(default=True, metadata={"help": "7-bit weights (codes -63..63) with uint8 activations: the same results on every x86 CPU and onnxruntime build. With 8 bits, older onnxruntime AVX2 kernels without VNNI saturate their int16 pair sums (255 x 127 x 2 > 32767): ddddocr's CRNN fell from 11.5 to -0.1 dB. onnxruntime 1.32 on AVX2 no longer saturates (a worst-case conv matches float exactly), and 8 bits gain about 1 dB on depthwise nets: turn off when the deployment's onnxruntime is that recent, or for VNNI/AMX/ARM targets"})
        activations: Literal["uint8", "int8"] = dataclasses.field(default="uint8", metadata={"help": "activation type (uint8 suits x86)"})
        exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "node-name patterns kept in float"})
        calib_samples: int = dataclasses.field(default=256, metadata={"help": "calibration samples used at most"})
        bias_correction: bool = dataclasses.field(default=False, metadata={"help": "correct each layer's bias for its weights' quantization error, from input channel means"})
        check_fusion: bool = dataclasses.field(default=True, metadata={"help": "report the layers onnxruntime leaves in float"})
        max_drop: float | None = dataclasses.field(default=None, metadata={"help": "mixed precision: keep the layers adding the most error in float until the top-1 agreement (accuracy with labels) drop on calibration samples is at most this many points"})
        eval_samples: int = dataclasses.field(default=64, metadata={"help": "mixed precision: calibration samples the drop is measured on"})
        speed_guard: bool = dataclasses.field(default=False, metadata={"help": "profile INT8 against fp32 (batch 1, 2 threads): layers whose integer kernel is slower stay float, and the whole model stays float if INT8 is still slower at batch 1 or 8; the result then depends on timing"})
        force_int8: bool = dataclasses.field(default=False, metadata={"help": "quantize even a model that INT8 is predicted to slow down on x86 (fewer than 10 dense MACs per activation element, e.g. PaddleOCR's direction classifier at 6.2: 1.07-1.4x fp32); without it such a model stays float and the report says why. For a smaller file or a non-x86 target"})
        layer_errors: bool = dataclasses.field(default=True, metadata={"help": "report each quantized layer's error contribution (dB of SQNR lost across it, first calibration batch)"})
        decompose_hard_activations: bool = dataclasses.field(default=True, metadata={"help": "HardSigmoid/HardSwish as Add/Clip/Mul so they run in uint8"})
        weight_rounding: Literal["nearest", "gptq"] = dataclasses.field(default="gptq", metadata={"help": "int8 weight codes: nearest, or GPTQ (codes chosen for the layer's output on calibration data; same format and kernels)"})
        lstm: bool = dataclasses.field(default=True, metadata={"help": "LSTMs with constant weights as onnxruntime's DynamicQuantizeLSTM (int8 weights; input and hidden state quantized at run time): ONNX has no QDQ form of a recurrent layer"})
        narrow_constants: bool = dataclasses.field(default=False, metadata={"help": "store per-channel weight scales as float16 and int32 biases that fit as int16, each behind a Cast that onnxruntime folds when it loads the model: the same fused kernels, a smaller file (PP-OCRv4's detector 0.273 -> 0.270 of the folded fp32). For onnxruntime (on in the int8-x86 recipe); runtimes that need Q/DQ scales as initializers without folding first would not fuse"})
        float_excitation: bool = dataclasses.field(default=False, metadata={"help": "keep squeeze-excite branches (GlobalAveragePool → … → the Mul that scales the feature map) in float: they hold one value per channel, so integer kernels save nothing there, and their error scales every pixel"})

        def __post_init__(self):
            if not 50.0 < self.percentile <= 100.0:
                raise ValueError("percentile must be in (50, 100]")

    @classmethod
    def with_budget(cls, config: "QuantizePass.Config", points: float, samples: int) -> "QuantizePass.Config":
        """Under a budget, mixed precision spends the pass's share of it, measured on as many
        samples as the pipeline verifies on (an explicit max_drop is kept)."""
        if config.max_drop is not None:
            return config
        return dataclasses.replace(config, max_drop=max(0.0, points), eval_samples=samples)

    @classmethod
    def milder(cls, config: "QuantizePass.Config", strength: float) -> "QuantizePass.Config | None":
        return None if config.max_drop is None else dataclasses.replace(config, max_drop=config.max_drop * strength)

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger", "DynamicQuantizeLSTM") for n in model.graph):
            raise ir.passes.PreconditionError("the model is already quantized")

    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        intensity = None if cfg.speed_guard else dense_intensity(model)
        if intensity is not None and not cfg.force_int8 and (kept := policies.predicted_slower(model, intensity)) is not None:
            return kept
        fp32 = clone_model(model) if (cfg.speed_guard or cfg.max_drop is not None or cfg.layer_errors) else None
        names_before = E.value_names(model.graph)  # what the lowering adds gets short names too
        lowered = self.context.run_exact(LowerInt8Pass(LowerInt8Pass.Config(hard_activations=cfg.decompose_hard_activations), self.context), model)
        report = self._quantize(model, names_before)
        report.stats["lowered"] = lowered.stats
        if report.modified and cfg.max_drop is not None:
            report = policies.mixed_precision(model, fp32, report, max_drop=cfg.max_drop, eval_samples=cfg.eval_samples,
                                              context=self.context, requantize=lambda ex: self._requantize(fp32, ex))
        all_int8 = None
        if report.modified and cfg.speed_guard:
            all_int8 = (clone_model(model), report)
            report = policies.layer_speed_guard(model, fp32, report, lambda ex: self._requantize(fp32, ex))
            if not report.stats["speed_guard"]["slower_layers"]:
                all_int8 = None
            report = policies.model_speed_guard(model, fp32, report, all_int8)
        if report.modified and cfg.layer_errors:
            policies.record_layer_errors(model, fp32, report, self.context.calibration)
        if intensity is not None:
            report.stats["dense_macs_per_element"] = round(intensity, 2)
        return report

    def _requantize(self, fp32: ir.Model, kept: Mapping[str, str]) -> tuple[ir.Model, PassReport]:
        """The float model quantized again with the ``kept`` layers (name → why) left float, lowered
        as the first time."""
        trial = clone_model(fp32)
        names_before = E.value_names(trial.graph)
        lower(trial, hard_activations=self.config.decompose_hard_activations)
        c = dataclasses.replace(self.config, max_drop=None, speed_guard=False)
        return trial, QuantizePass(c, self.context)._quantize(trial, names_before, kept)

    def _quantize(self, model: ir.Model, names_before: set[str], kept: Mapping[str, str] | None = None) -> PassReport:
        """Place, calibrate and emit QDQ on a lowered model; tensors not in ``names_before`` get short names."""
        cfg = self.config
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        common.TopologicalSortPass()(model)
        infer_shapes(model)
        graph = model.graph
        nodes_before = set(graph)  # the Q/DQ nodes this pass adds are the others
        skipped: list[Skipped] = []
        limits = flat_limits(graph)  # value → interval outside which its activation is flat
        plan = P.plan(graph, cfg, skipped, kept)
        if not plan.nodes:
            lstms = self._lstms(model, kept, skipped)
            return PassReport(model, bool(lstms), changed=list(lstms), skipped=skipped,
                              stats={"quantized_layers": len(lstms), "layers": lstms, "kept_float": dict(kept or {})})

        # Every statistic this pass needs is declared first and gathered in one run over the data:
        # ranges of the calibrated tensors, input means (bias correction), Gram matrices (GPTQ).
        stats = Statistics(model, self.context.calibration, batch_size=8, limit=cfg.calib_samples)
        cache = self.context.activation_cache
        before = dict(cache.get("_stats", {"collected": 0, "reused": 0}))
        range_request = R.RangeRequest(stats, [v.name for v in plan.calibrated], method=cfg.method, percentile=cfg.percentile, cache=cache)
        convs = [n for n in plan.weighted if n.op_type == "Conv"] if cfg.bias_correction else []
        mean_of = {n: stats.add(n.inputs[0].name, ChannelStats(1)) for n in convs}
        quantized = set(plan.calibrated) | {out for out, _, _ in plan.same_scale}  # the tensors that get Q/DQ
        gptq = G.GptqRounding(stats, [n for n in plan.weighted if n.inputs[0] in quantized], cfg, skipped, cache) if cfg.weight_rounding == "gptq" else None
        stats.collect()  # the one run
        rng = range_request.result()
        reused = cache["_stats"]["reused"] - before["reused"]
        params: dict[ir.Value, tuple[np.float32, int]] = {}
        clamped = 0
        for v in plan.calibrated:
            lo, hi = rng[v.name]
            if v in limits:
                lo2, hi2 = max(lo, min(limits[v][0], 0.0)), min(hi, max(limits[v][1], 0.0))
                if (lo2, hi2) != (lo, hi):
                    clamped += 1
                    params[v] = E.reaching_qparams(lo2, hi2, cfg.activations)
                    continue
            params[v] = R.qparams(lo, hi, dtype=cfg.activations)
        rescaled = []
        for out, src, factor in plan.same_scale:  # topological order: src already has params
            if src in params:
                params[out] = (np.float32(params[src][0] * factor), params[src][1])
                if factor != 1.0:
                    rescaled.append(out)

        means = {n: st.mean for n, st in mean_of.items()}
        rounded = gptq.result() if gptq is not None else {}
        layers = {}
        cache: dict[tuple[int, int], tuple[ir.Value, ir.Value, ir.Value]] = {}
        for node in plan.weighted:
            x = node.inputs[0]
            if x not in params:
                skipped.append(Skipped(node_label(node), "input activation not quantized"))
                continue
            layers[node_label(node)] = E.quantize_weights(graph, node, params[x][0], cfg, cache, means.get(node), rounded.get(node))
        stored = self._int8_storage(graph, kept or {})
        layers.update(stored)
        for v, (scale, zp) in params.items():
            E.insert_qdq(graph, v, scale, zp, cfg.activations)
        for out in rescaled:
            E.bypass_rescale(out)
        for node in plan.nodes:
            if node.op_type in ("Add", "Mul"):
                for i, v in enumerate(node.inputs):
                    if v is not None and not P.is_activation(v) and P.small_float_const(v):
                        E.quantize_constant_operand(graph, node, i, cfg.activations)
        layers.update(lstms := self._lstms(model, kept, skipped))
        compacted = E.compact_constants(graph)
        common.TopologicalSortPass()(model)  # nodes were appended: sort first so dead chains go in one sweep
        common.RemoveUnusedNodesPass()(model)
        ranges = {v.name: [float(rng[v.name][0]), float(rng[v.name][1])] for v in plan.calibrated}  # under the names calibration saw
        E.shorten_new_names(graph, names_before)
        compact = E.compact_qdq(graph, nodes_before, names_before)
        if cfg.narrow_constants:
            compact["narrowed"] = E.narrow_constants(graph, names_before)

        stats = {
            "constants_compacted": compacted,
            "qdq_compacted": compact,
            "method": cfg.method,
            "activations": cfg.activations,
            "quantized_layers": len(plan.nodes) + len(lstms),
            "quantized_tensors": len(params),
            "ranges_reused": reused,  # from earlier passes / tries, the tensors' computation unchanged
            "ranges_clamped": clamped,  # pre-activation ranges cut to where HardSigmoid/HardSwish is not flat
            "layers": layers,
            "ranges": ranges,
            "kept_float": dict(kept or {}),  # layers a policy keeps float (budget, speed guard), and why
        }
        if cfg.check_fusion:
            fusion = fusion_report(model)
            stats["fusion"] = fusion
            if "unchecked" in fusion:
                skipped.append(Skipped("fusion check", fusion["unchecked"]))
            already = {s.layer for s in skipped}  # kept float on purpose: that reason stands
            for name in fusion["float_heavy"]:
                if name not in already:
                    skipped.append(Skipped(name, "onnxruntime left this layer in float (not fused into an integer kernel)"))
        changed = [node_label(n) for n in plan.nodes] + list(lstms) + list(stored)
        return PassReport(model, True, changed=changed, skipped=skipped, stats=stats)

    #: weights below this many elements are left float by :meth:`_int8_storage` (as ``weight-only``)
    STORAGE_MIN_SIZE = 1024

    def _int8_storage(self, graph: ir.Graph, kept: Mapping[str, str]) -> dict[str, dict]:
        """ConvTranspose weights as int8 codes + DequantizeLinear, the compute in float.

        onnxruntime's CPU provider has no integer ConvTranspose kernel (it fuses no QDQ form of it,
        per-tensor or per-channel, opset 13 or 21), so the layer runs in float either way; its
        weights are still 4x smaller this way (PP-OCRv4's detector: 9.3 of its 1,295 kB), for one
        dequantization per run. 8-bit codes: the float kernel has no int16 sums to saturate.
        """
        out = {}
        for node in list(graph):
            if node.op_type != "ConvTranspose" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 or node.name in kept:
                continue
            if exclude_match(node, self.config.exclude):
                continue
            w = const_array(node.inputs[1])
            if w is None or w.dtype != np.float32 or w.size < self.STORAGE_MIN_SIZE:
                continue
            dq, sqnr = int8_weight(graph, node, w, W.out_axis(node), zero_point=False)
            dq.outputs[0].name = f"{node.inputs[1].name}_rebuilt"
            dq.outputs[0].dtype = ir.DataType.FLOAT
            dq.outputs[0].shape = ir.Shape(w.shape)
            graph.insert_before(node, dq)
            node.replace_input_with(1, dq.outputs[0])
            out[node_label(node)] = {"op": "ConvTranspose", "weight_only": "int8", "weight_sqnr_db": sqnr,
                                     "why": "no integer ConvTranspose kernel in onnxruntime: float compute, int8 weights"}
        return out

    def _lstms(self, model: ir.Model, kept: Mapping[str, str] | None, skipped: list[Skipped]) -> dict:
        """The LSTMs as ``DynamicQuantizeLSTM`` (unless excluded, kept float by a policy, or off)."""
        cfg = self.config
        if not cfg.lstm:
            return {}

        def why_float(node: ir.Node) -> str | None:
            if exclude_match(node, cfg.exclude):
                return "excluded by pattern: kept in float"
            return (kept or {}).get(node_label(node))

        layers, lstm_skipped = quantize_lstms(model, 63 if cfg.reduce_range else 127, why_float)
        skipped += lstm_skipped
        return layers
