"""INT8 QDQ quantization: placement onnxruntime fuses, calibration methods, equalization, bias correction, CLI."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcc.compiler import weights as weight_view
from onnxcc.compiler.calibration import CalibrationSet, input_specs, random_inputs
from onnxcc.compiler.ir_utils import clone_model, const_array, save_model
from onnxcc.compiler.pipeline import Pipeline
from onnxcc.compiler.metrics import sqnr_db
from onnxcc.compiler.verify import EXACT_RTOL, compare_outputs, run_model
from onnxcc.models.builders import FAMILIES, build
from onnxcc.passes.quantization import ranges as R
from tests.conftest import digest, model_from_text, named_model_from_text


def calib_for(model: ir.Model, n: int = 32, seed: int = 0) -> CalibrationSet:
    spec = input_specs(model)[0]
    shape = (n,) + tuple(spec.concrete(1))[1:]
    return CalibrationSet({spec.name: np.random.default_rng(seed).standard_normal(shape).astype(np.float32)})


# Measured on these random-weight tiny builders (minmax, per-channel): resnet 13 dB, mobilenet_v2 5 dB,
# densenet 2 dB. Random weights at 1/8 width are far noisier than trained networks; the floor here
# catches a broken placement (which gives ~0 dB or worse), not the accuracy target.
SQNR_FLOOR = {"densenet": 0.5, "mobilenet_v2": 3.0, "mobilenet_v3": 3.0}


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_every_family_fuses_and_agrees(folded, family):
    model = folded(family)
    ref = clone_model(model)
    calib = calib_for(model)
    res = Pipeline([("quantize", {"force_int8": True, "force_int8": True})], verify_samples=16).run(model, calib)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    stats = res.steps[0].report.stats
    fusion = stats["fusion"]
    assert fusion["float_heavy"] == []  # every Conv/Gemm became an integer kernel
    assert fusion["integer_kernels"] >= stats["quantized_layers"] * 0.5
    comp = res.steps[0].vs_original
    assert comp.min_sqnr > SQNR_FLOOR.get(family, 5.0), comp.to_json()
    # weights are int8 initializers behind DequantizeLinear, biases int32
    dtypes = {v.const_value.dtype for v in model.graph.initializers.values()}
    assert ir.DataType.INT8 in dtypes and ir.DataType.INT32 in dtypes
    assert not any(n.op_type == "Conv" and const_array(n.inputs[1]) is not None for n in model.graph)
    del ref


def test_no_leftover_qdq_on_resnet_and_mobilenets(folded):
    # mobilenet_v3: HardSwish/HardSigmoid become QLinearAdd + absorbed Clip + rescaled DQ + QLinearMul
    for family in ("resnet", "mobilenet_v2", "mobilenet_v3", "efficientnet", "densenet"):
        model = folded(family)
        res = Pipeline([("quantize", {"force_int8": True, "force_int8": True})], verify=False).run(model, calib_for(model))
        f = res.steps[0].report.stats["fusion"]
        assert f["dequantize_linear"] == 0 and f["quantize_linear"] == 1  # only the graph input is quantized in float


def test_constants_compacted_without_changing_what_onnxruntime_runs(folded, monkeypatch, tmp_path):
    """Bias scales as Mul(s_x, s_w), zero-valued bias / Conv-weight zero points left out, equal
    scalars stored once, one DequantizeLinear per quantized tensor, short Q/DQ node names: still
    every layer fused, bit for bit the same optimized outputs, and a smaller file."""
    import onnxcc.passes.quantization.emission as Q

    model = folded("mobilenet_v2")
    calib = calib_for(model)
    feeds = [{"input": calib.arrays["input"][:8]}]
    plain = clone_model(model)
    monkeypatch.setattr(Q, "compact_constants", lambda graph: 0)
    monkeypatch.setattr(Q, "compact_qdq", lambda graph, nodes, names: {})
    Pipeline([("quantize", {"force_int8": True, "force_int8": True})], verify=False).run(plain, calib)
    monkeypatch.undo()
    res = Pipeline([("quantize", {"force_int8": True, "force_int8": True})], verify=False).run(model, calib)
    stats = res.steps[0].report.stats
    assert stats["fusion"]["float_heavy"] == [] and stats["fusion"]["dequantize_linear"] == 0
    saved = stats["constants_compacted"]
    assert saved > 0
    assert not any(v.const_value.dtype == ir.DataType.INT32 and not np.any(v.const_value.numpy()) for v in model.graph.initializers.values())
    bias_dq = [n.inputs[2].producer() for n in model.graph if n.op_type == "Conv" and len(n.inputs) > 2]
    assert bias_dq and all(d.inputs[1].producer().op_type == "Mul" for d in bias_dq if const_array(d.inputs[1]) is None)
    a, b = run_model(plain, feeds, optimize=True), run_model(model, feeds, optimize=True)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    save_model(plain, tmp_path / "plain.onnx")
    save_model(model, tmp_path / "compact.onnx")
    assert (tmp_path / "plain.onnx").stat().st_size - (tmp_path / "compact.onnx").stat().st_size >= saved - 2000  # the Mul nodes cost ~100 B each
    compact = stats["qdq_compacted"]
    assert compact["shared_scalars"] > 0 and compact["shared_dequantize"] > 0 and compact["short_node_names"] > 0
    dqs = [tuple(v.name for v in n.inputs) for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == len(set(dqs))  # one DQ per quantized tensor
    scalars = [(v.const_value.dtype, v.const_value.numpy().tobytes()) for v in model.graph.initializers.values() if v.const_value.numpy().ndim == 0]
    assert len(scalars) == len(set(scalars))
    assert all(len(n.name) <= 6 for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear"))
    # Tensors the pass made up have short names; every original tensor keeps its name, and each
    # QuantizeLinear node's input still names the tensor it quantizes.
    fp32_names = {v.name for v in folded("mobilenet_v2").graph.inputs} | {o.name for n in folded("mobilenet_v2").graph for o in n.outputs}
    made = [o.name for n in model.graph if n.op_type in ("QuantizeLinear", "DequantizeLinear") for o in n.outputs]
    assert made and all(len(x) <= 6 for x in made)
    assert all(n.inputs[0].name in fp32_names for n in model.graph if n.op_type == "QuantizeLinear")
    assert {o.name for n in model.graph for o in n.outputs if o.name in fp32_names} >= {o.name for n in model.graph if n.op_type == "Conv" for o in n.outputs}


@pytest.mark.parametrize("method", R.METHODS)
def test_every_calibration_method(folded, method):
    model = folded("resnet_bottleneck")
    res = Pipeline([("quantize", {"method": method})], verify_samples=16).run(model, calib_for(model))
    assert res.steps[0].vs_original.min_sqnr > 5.0


def test_clipping_methods_tighten_the_range_around_outliers():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(200_000), [40.0, -35.0]])  # two outliers
    h = R.Histogram(x.min(), x.max(), R.BINS)
    h.update(x)
    full = (x.min(), x.max())
    for method in ("percentile", "entropy", "mse"):
        lo, hi = R.choose_range(h.counts, h.edges, method)
        assert full[0] <= lo < 0 < hi <= full[1]
        assert hi - lo < 0.8 * (full[1] - full[0]), (method, lo, hi)


def test_qparams_and_weight_quantization():
    s, zp = R.qparams(0.0, 6.0, "uint8")
    assert zp == 0 and np.isclose(s, 6 / 255)
    s, zp = R.qparams(-1.0, 3.0, "uint8")
    assert 0 < zp < 255 and np.isclose(-1.0, (0 - zp) * s, atol=s)
    w = np.random.default_rng(1).standard_normal((8, 4, 3, 3)).astype(np.float32)
    q, scale = R.per_channel_weight(w, 0)
    assert q.dtype == np.int8 and np.abs(q).max() == 127
    assert np.all(np.abs(q * scale[:, None, None, None] - w) <= scale[:, None, None, None] / 2 + 1e-7)


def test_weights_on_an_integer_grid_are_stored_exactly():
    """YOLOv8's DFL conv holds 0, 1, ..., 15: max/qmax (15/63 per code at 7 bits) rounds them, a
    step of 1/4 stores them exactly with codes up to 60. Weights off any grid keep max/qmax."""
    w = np.zeros((2, 16, 1, 1), np.float32)
    w[0, :, 0, 0] = np.arange(16)
    w[1, :, 0, 0] = np.random.default_rng(0).standard_normal(16)
    for bits, top in ((7, 60), (8, 120)):
        q, scale = R.per_channel_weight(w, 0, bits=bits)
        assert np.array_equal(q[0].ravel() * scale[0], np.arange(16)) and np.abs(q[0]).max() == top
        assert scale[1] == np.float32(np.abs(w[1]).max() / (2 ** (bits - 1) - 1))
    grid = np.array([[-0.5, 0.25, 1.0, 0.0]], np.float32)  # multiples of 0.25, one tensor
    q, scale = R.per_channel_weight(grid, 0, bits=8, per_channel=False)
    assert scale.shape == () and np.array_equal(q * scale, grid)


def test_calibration_memory_is_flat_in_the_number_of_samples(folded):
    model = folded("resnet")
    peaks = {}
    for n in (8, 80):
        calib = calib_for(model, n)
        tracemalloc.start()
        tracemalloc.reset_peak()
        Pipeline([("quantize", {"method": "entropy", "calib_samples": n, "check_fusion": False})], verify=False).run(clone_model(model), calib)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del calib
    # Python-side peak (histograms, one batch of activations) must not grow with the sample count
    # beyond the calibration array itself (80 samples of 3×32×32 float32 = 1 MB).
    assert peaks[80] < peaks[8] * 1.5 + 1.5e6, peaks


def test_relu_and_clip_are_absorbed_into_the_output_quantizer(folded):
    model = folded("mobilenet_v2")
    Pipeline([("quantize", {"force_int8": True, "check_fusion": False})], verify=False).run(model, calib_for(model))
    for node in model.graph:
        if node.op_type in ("Relu", "Clip"):
            user = node.outputs[0].uses()[0].node
            assert user.op_type == "QuantizeLinear"
            assert const_array(user.inputs[2]).item() == 0  # zero point 0: no codes wasted below 0


def test_exclude_keeps_layers_in_float(folded):
    model = folded("resnet")
    first = next(n for n in model.graph if n.op_type == "Conv").name
    res = Pipeline([("quantize", {"exclude": (first,)})], verify=False).run(model, calib_for(model))
    conv = next(n for n in model.graph if n.name == first)
    assert const_array(conv.inputs[1]) is not None and const_array(conv.inputs[1]).dtype == np.float32
    skipped = res.steps[0].report.skipped
    assert any("exclude pattern" in s.reason for s in skipped)
    # onnxruntime's NCHWc transformer renames the float conv '<output>_nchwc': reported under its own name, once
    assert res.steps[0].report.stats["fusion"]["float_heavy"] == [first]
    assert [s.layer for s in skipped] == [first]


def test_already_quantized_model_is_refused(folded):
    from onnxcc.compiler.errors import BadInputError

    model = folded("vgg")
    Pipeline([("quantize", {"check_fusion": False})], verify=False).run(model, calib_for(model))
    with pytest.raises(BadInputError, match="already quantized"):
        Pipeline([("quantize", {})], verify=False).run(model, calib_for(model))


# ---------------------------------------------------------------------------- equalization
def test_equalization_is_exact_and_evens_ranges():
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(6, 3, 3, 3)).astype(np.float32) * np.array([0.01, 10, 1, 0.1, 5, 1], np.float32)[:, None, None, None]
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,4,8,8] y) {
        a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w1, b1)
        r = Relu (a)
        d = Conv <kernel_shape=[3,3], pads=[1,1,1,1], group=6> (r, wd, bd)
        r2 = LeakyRelu (d)
        y = Conv <kernel_shape=[1,1]> (r2, w3, b3)
    }"""
    m = model_from_text(text, w1=w1, b1=rng.normal(size=6).astype(np.float32), wd=rng.normal(size=(6, 1, 3, 3)).astype(np.float32),
                        bd=rng.normal(size=6).astype(np.float32), w3=rng.normal(size=(4, 6, 1, 1)).astype(np.float32), b3=np.zeros(4, np.float32))
    ref = clone_model(m)
    res = Pipeline(["equalize"]).run(m)  # exact: verified by the pipeline
    assert res.steps[0].exact and res.steps[0].report.stats["pairs"] == 2
    spread = res.steps[0].report.stats["range_spread"]
    first = next(iter(spread.values()))
    assert first[1] < first[0] / 10
    feeds = random_inputs(input_specs(ref), batch=2, seed=1)
    assert compare_outputs(run_model(ref, feeds), run_model(m, feeds)).within(EXACT_RTOL)


@pytest.mark.parametrize("family", ["resnet", "mobilenet_v3", "efficientnet", "inception"])
def test_equalization_exact_on_families(folded, family):
    model = folded(family)
    res = Pipeline(["equalize"]).run(model)
    assert res.steps[0].report.stats["pairs"] > 0


def test_relu6_pairs_skipped_unless_lossy_replacement(folded):
    model = folded("mobilenet_v2")
    res = Pipeline(["equalize"]).run(model)
    exact_pairs = res.steps[0].report.stats["pairs"]
    assert any("ReLU6" in s.reason for s in res.steps[0].report.skipped)
    res = Pipeline([("equalize", {"relu6_to_relu": True})]).run(folded("mobilenet_v2"))
    assert not res.steps[0].exact and res.steps[0].report.stats["pairs"] > exact_pairs + 5


def _skewed_depthwise_net(seed: int = 0) -> ir.Model:
    """Conv → ReLU → depthwise → ReLU → Conv blocks whose per-channel ranges differ by 100×.

    Function-preserving skew (filter c scaled by k_c, the next layer's input channel c by 1/k_c)
    is what BatchNorm folding leaves in trained depthwise networks, and what equalization undoes.
    """
    from onnxcc.models.builders import NetBuilder

    b = NetBuilder("skewed", 16, seed=seed)
    x = b.input
    for c in (16, 24):
        x = b.relu(b.conv(x, c, 1, bias=True))
        x = b.relu(b.conv(x, c, 3, g=c, bias=True))
    x = b.classifier(b.conv(x, 32, 1, bias=True), 10)
    model = b.finish(x)
    rng = np.random.default_rng(seed)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    for a, nxt in zip(convs, convs[1:]):
        k = np.exp(rng.uniform(-2.3, 2.3, const_array(a.inputs[1]).shape[0])).astype(np.float32)
        a.inputs[1].const_value = ir.tensor(const_array(a.inputs[1]) * k[:, None, None, None])
        a.inputs[2].const_value = ir.tensor(const_array(a.inputs[2]) * k)
        w = const_array(nxt.inputs[1])
        if w.shape[1] == 1:  # depthwise: input channel c is filter c
            nxt.inputs[1].const_value = ir.tensor(w / k[:, None, None, None])
        else:
            nxt.inputs[1].const_value = ir.tensor(w / k[None, :, None, None])
    return model


def test_equalize_and_bias_correction_help_per_tensor_depthwise():
    sq = {}
    for label, specs in {
        "plain": [("quantize", {"force_int8": True, "per_channel": False, "check_fusion": False})],
        "eq+bc": ["equalize", ("quantize", {"force_int8": True, "per_channel": False, "bias_correction": True, "check_fusion": False})],
    }.items():
        model = _skewed_depthwise_net()
        res = Pipeline(specs, verify_samples=32).run(model, calib_for(model, 64))
        sq[label] = res.steps[-1].vs_original.min_sqnr
    assert sq["eq+bc"] > sq["plain"] + 3.0, sq


def test_bias_correction_reports_its_shift(folded):
    model = folded("mobilenet_v3")
    res = Pipeline([("quantize", {"force_int8": True, "bias_correction": True, "check_fusion": False})], verify=False).run(model, calib_for(model))
    layers = res.steps[0].report.stats["layers"]
    assert any(v.get("bias_correction_max", 0) > 0 for v in layers.values())


# ---------------------------------------------------------------------------- CLI
def test_quantize_cli(cli, tmp_path, resnet_path):
    m = build("resnet", "tiny", seed=3)
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    before = digest(resnet_path)
    r = cli("quantize", resnet_path, "-o", out, "--calib", calib, "--method", "percentile", "--report", rep)
    assert r.code == 0, r.err
    assert digest(resnet_path) == before and out.exists()
    report = json.loads(rep.read_text())
    q = report["passes"][-1]
    assert q["pass"] == "quantize" and q["stats"]["fusion"]["float_heavy"] == []
    assert report["after"]["file_bytes"] < 0.35 * report["before"]["file_bytes"]  # one report schema for every command
    del m


def test_quantize_cli_needs_calibration(cli, tmp_path, resnet_path):
    r = cli("quantize", resnet_path, "-o", tmp_path / "q.onnx")
    assert r.code == 2 and "--calib" in r.err
    assert not (tmp_path / "q.onnx").exists()


def test_quantize_cli_wrong_calibration_shape(cli, tmp_path, resnet_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((4, 3, 16, 16), np.float32))
    r = cli("quantize", resnet_path, "-o", tmp_path / "q.onnx", "--calib", calib)
    assert r.code == 2 and "input" in r.err
    assert not (tmp_path / "q.onnx").exists()


def test_quantized_model_saves_and_reloads(folded, tmp_path):
    model = folded("inception")
    Pipeline([("quantize", {"check_fusion": False})], verify=False).run(model, calib_for(model))
    save_model(model, tmp_path / "q.onnx")
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)


# ---------------------------------------------------------------------------- weight-only
# Floors against breakage; measured on the random-weight tiny ResNet: int8 21 dB / 0.27×, int4 0.25×, fp16 0.50×.
@pytest.mark.parametrize("dtype, ratio, min_sqnr", [("int8", 0.30, 15.0), ("int4", 0.30, 3.0), ("fp16", 0.55, 50.0)])
def test_weight_only_shrinks_the_file_and_stays_close(folded, tmp_path, dtype, ratio, min_sqnr):
    model = folded("resnet")
    save_model(model, tmp_path / "fp32.onnx")
    res = Pipeline([("weight-only", {"dtype": dtype, "min_size": 256})], verify_samples=16).run(model)
    save_model(model, tmp_path / "w.onnx")
    onnx.checker.check_model(str(tmp_path / "w.onnx"), full_check=True)
    size = (tmp_path / "w.onnx").stat().st_size / (tmp_path / "fp32.onnx").stat().st_size
    assert size < ratio, size
    assert res.steps[0].vs_original.min_sqnr > min_sqnr, res.steps[0].vs_original.to_json()
    if dtype == "int4":
        assert model.opset_imports[""] >= 21
        dq = [n for n in model.graph if n.op_type == "DequantizeLinear"]
        assert dq and all(n.attributes["block_size"].value == 32 for n in dq)


def test_weight_only_int4_blocks_reconstruct_within_half_a_step():
    from onnxcc.passes.quantization.weights import int4_blocks

    w = np.random.default_rng(0).standard_normal((8, 64, 3, 3)).astype(np.float32)
    q, scale, rec = int4_blocks(w, 1, 32)
    assert q.shape == w.shape and scale.shape == (8, 2, 3, 3)
    step = np.repeat(scale, 32, axis=1)
    assert np.all(np.abs(rec - w) <= step / 2 + 1e-6)
    assert np.all(np.abs(q.astype(np.int8)) <= 7)


def test_quantize_cli_weight_only_without_calibration(cli, tmp_path, resnet_path):
    out = tmp_path / "w.onnx"
    r = cli("quantize", resnet_path, "-o", out, "--weight-only", "int8")
    assert r.code == 0, r.err
    assert out.stat().st_size < 0.3 * resnet_path.stat().st_size
    r = cli("quantize", resnet_path, "-o", tmp_path / "h.onnx", "--fp16")
    assert r.code == 0 and (tmp_path / "h.onnx").stat().st_size < 0.55 * resnet_path.stat().st_size


def test_hard_activation_decomposition_is_exact_in_float(folded):
    from onnxcc.passes.quantization.lower import decompose_hard_activations

    model = folded("mobilenet_v3")
    ref = clone_model(model)
    n = decompose_hard_activations(model.graph)
    assert n > 5 and not any(x.op_type in ("HardSwish", "HardSigmoid") for x in model.graph)
    feeds = random_inputs(input_specs(ref), batch=4, seed=2)
    assert compare_outputs(run_model(ref, feeds), run_model(model, feeds)).within(EXACT_RTOL)


def test_leftover_batchnorm_becomes_an_exact_depthwise_conv(folded):
    from onnxcc.passes.quantization.lower import batchnorm_to_depthwise

    model = folded("densenet")  # pre-activation BatchNorms cannot be folded into a conv
    ref = clone_model(model)
    assert batchnorm_to_depthwise(model.graph) > 3
    assert not any(n.op_type == "BatchNormalization" for n in model.graph)
    feeds = random_inputs(input_specs(ref), batch=4, seed=2)
    assert compare_outputs(run_model(ref, feeds), run_model(model, feeds)).within(EXACT_RTOL)


@pytest.mark.parametrize("b1_ms, b8_ms, kept_float", [(2.0, 2.0, True), (0.5, 0.5, False), (0.5, 1.2, True)])
def test_speed_guard_keeps_float_when_int8_is_slower(folded, monkeypatch, b1_ms, b8_ms, kept_float):
    """The guard's decision, with the timings replaced (timings themselves are benchmarks, not tests):
    INT8 must be faster than fp32 at batch 1 and at batch 8."""
    import onnxcc.compiler.bench as B

    class Entry:
        def __init__(self, ms):
            self.median_ms = ms

    def fake_bench(*a, batch, **k):
        return type("R", (), {"entries": [Entry(1.0), Entry(b1_ms if batch == 1 else b8_ms)]})()

    monkeypatch.setattr(B, "bench_models", fake_bench)
    monkeypatch.setattr(B, "profile_nodes", lambda *a, **k: {})  # no layer is slower on its own
    model = folded("resnet")
    res = Pipeline([("quantize", {"speed_guard": True, "check_fusion": False})], verify=False).run(model, calib_for(model))
    has_int8 = any(n.op_type == "DequantizeLinear" for n in model.graph)
    assert has_int8 is not kept_float
    if kept_float:
        assert "kept in float" in res.steps[0].report.skipped[0].reason
    guard = res.steps[0].report.stats["speed_guard"]
    assert (guard["int8_over_fp32_batch1"], guard["int8_over_fp32_batch8"]) == (b1_ms, b8_ms)


def test_layer_speed_guard_keeps_the_slower_layers_float(folded, monkeypatch):
    """Per-layer guard: a conv whose integer kernel profiles slower than its float kernel goes back to float."""
    import onnxcc.compiler.bench as B

    model = folded("resnet")
    convs = [n.name for n in model.graph if n.op_type == "Conv"]
    slow = set(convs[1:3])

    def fake_profile(m, **k):
        int8 = any(n.op_type == "QuantizeLinear" for n in m.graph)
        return {c: {"op": "x", "us": (30.0 if int8 and c in slow else 10.0 if int8 else 20.0)} for c in convs}

    monkeypatch.setattr(B, "profile_nodes", fake_profile)
    monkeypatch.setattr(B, "bench_models", lambda *a, **k: type("R", (), {"entries": [type("E", (), {"median_ms": 1.0})()] * 3})())
    res = Pipeline([("quantize", {"speed_guard": True})], verify=False).run(model, calib_for(model))
    rep = res.steps[0].report
    assert rep.stats["speed_guard"]["slower_layers"] == sorted(slow)
    assert {s.layer for s in rep.skipped if "integer kernel measured" in s.reason} == slow
    by_name = {n.name: n for n in model.graph}
    float_weights = {c for c in convs if by_name[c].inputs[1].producer() is None}  # no DequantizeLinear before W
    assert float_weights == slow
    assert rep.stats["speed_guard"]["int8_over_fp32_batch1"] == 1.0


def test_report_gives_every_quantized_layer_its_error_contribution(folded):
    model = folded("mobilenet_v2")
    res = Pipeline([("quantize", {"force_int8": True, "force_int8": True})], verify=False).run(model, calib_for(model))
    rep = res.steps[0].report
    layers = rep.stats["layers"]
    assert set(rep.changed) <= set(layers)
    for name in rep.changed:
        assert np.isfinite(layers[name]["error_db"])
    weighted = [k for k, v in layers.items() if v["op"] in ("Conv", "Gemm", "MatMul")]
    assert weighted and all(layers[k]["fused"] for k in weighted) and all("input_scale" in layers[k] for k in weighted)
    # the ranking is by the noise each layer adds relative to its output
    ranked = rep.stats["error_ranking"]
    assert [layers[k]["noise_added_db"] for k in ranked] == sorted((layers[k]["noise_added_db"] for k in ranked), reverse=True)
    # the first conv reads the exact graph input: it loses the most SQNR (about 160 dB against the
    # 200 dB cap) while adding little noise, so it is not among the layers mixed precision keeps
    # float first (ranked by error_db it topped the ranking)
    first = next(n.name for n in model.graph if n.op_type == "Conv")
    assert max(layers, key=lambda k: layers[k]["error_db"]) == first and layers[first]["error_db"] > 100
    assert first not in ranked and layers[first]["noise_added_db"] < layers[ranked[0]]["noise_added_db"] - 10
    from onnxcc.passes.quantization.policies import noise_added_db

    assert noise_added_db(200.0, 40.0) == pytest.approx(-40.0, abs=0.01)
    assert noise_added_db(25.0, 16.0) == pytest.approx(-16.6, abs=0.1)  # worse, though it loses 9 dB, not 160


def test_mixed_precision_keeps_the_worst_layers_float_until_the_budget_holds(folded):
    model = folded("mobilenet_v2")  # random weights: INT8 flips ~30% of its top-1 predictions
    calib = calib_for(model, 64)
    res = Pipeline([("quantize", {"force_int8": True, "max_drop": 10.0, "check_fusion": False})], verify_samples=64).run(model, calib)
    step = res.steps[0]
    mp = step.report.stats["mixed_precision"]
    assert mp["drop_all_int8"] > 10.0 >= mp["drop"]
    assert step.vs_original.metric_drop() <= 10.0  # the pipeline measures the same samples
    assert mp["float_layers"] and all(
        any(s.layer == name and "accuracy budget" in s.reason for s in step.report.skipped) for name in mp["float_layers"]
    )
    assert any(n.op_type == "DequantizeLinear" for n in model.graph)  # not everything went back to float


def test_quantize_cli_budget_drives_mixed_precision(cli, tmp_path, resnet_path):
    calib = tmp_path / "c.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32))
    out, rep = tmp_path / "q.onnx", tmp_path / "q.json"
    r = cli("quantize", resnet_path, "-o", out, "--calib", calib, "--budget", "5", "--report", rep)
    assert r.code == 0, r.err
    q = json.loads(rep.read_text())["passes"][-1]
    assert q["verify_vs_original"]["outputs"][0]["top1"] >= 0.95


def _hard_model(seed: int = 0) -> ir.Model:
    """Conv → HardSwish → Conv → HardSigmoid, the first conv's outputs reaching about −12 (a BN-folded stem)."""
    from tests.conftest import named_model_from_text

    rng = np.random.default_rng(seed)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] x) => (float[N, 8, 8, 8] y) {
            a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
            h = HardSwish (a)
            c = Conv <pads = [1, 1, 1, 1]> (h, W2, B2)
            y = HardSigmoid <alpha = 0.16666667, beta = 0.5> (c)
        }
    """
    return named_model_from_text(text, W1=rng.normal(0, 1.0, (8, 3, 3, 3)).astype(np.float32), B1=np.linspace(-6, 1, 8).astype(np.float32),
                                 W2=rng.normal(0, 0.3, (8, 8, 3, 3)).astype(np.float32), B2=np.zeros(8, np.float32))


def test_hard_activation_inputs_are_quantized_only_where_the_activation_is_not_flat(monkeypatch):
    """HardSwish is 0 below −3 and HardSigmoid flat outside [−3, 3]: their inputs' ranges are cut there.

    The cut is exact (a value clamped to −3 still gives 0), so the same codes cover a narrower
    range: the scales shrink and the error falls.
    """
    from onnxcc.passes.quantization import qdq

    def run(clamp: bool):
        model = _hard_model()
        if not clamp:
            monkeypatch.setattr(qdq, "flat_limits", lambda g: {})
        res = Pipeline([("quantize", {"check_fusion": False})], verify_samples=16).run(model, calib_for(model, 64))
        monkeypatch.undo()
        return res.steps[0].report.stats, res.steps[0].vs_original.min_sqnr, model

    st, sqnr, model = run(True)
    st0, sqnr0, _ = run(False)
    # the end codes reach past the cut: code 0 of a is at most -3, so HardSwish still gives exactly 0
    # there; c's codes span at least [-3, 3]
    q = {n.inputs[0].name: n for n in model.graph if n.op_type == "QuantizeLinear"}
    for t, (need_lo, need_hi) in {"a": (-3.0, None), "c": (-3.0, 3.0)}.items():
        scale, zp = float(const_array(q[t].inputs[1])), int(const_array(q[t].inputs[2]))
        assert -zp * scale <= need_lo and (need_hi is None or (255 - zp) * scale >= need_hi)
        assert (255 * scale) < 0.75 * (st0["ranges"][t][1] - st0["ranges"][t][0])  # and the step is finer
    assert st["ranges_clamped"] == 2 and st0["ranges_clamped"] == 0
    a_lo, a_hi = st0["ranges"]["a"]
    c_lo, c_hi = st0["ranges"]["c"]
    assert a_lo < -6 and c_lo < -3 and c_hi > 3  # the observed ranges reach past the flat parts
    assert sqnr > sqnr0 + 2.0, (sqnr, sqnr0)  # measured 36.1 vs 33.4 dB


def test_float_excitation_keeps_squeeze_excite_branches_in_float(folded):
    from onnxcc.passes.quantization.placement import excitation_branches

    model = folded("mobilenet_v3")
    n_se = sum(1 for n in model.graph if n.op_type == "HardSigmoid")
    branch = excitation_branches(model.graph)
    assert {n.op_type for n in branch} == {"Conv", "Relu", "HardSigmoid"} and sum(n.op_type == "Conv" for n in branch) == 2 * n_se
    assert not any(n.op_type == "GlobalAveragePool" for n in branch)  # the pool and the scaling Mul stay integer
    head = folded("resnet")
    assert excitation_branches(head.graph) == set()  # GlobalAveragePool → Flatten → Gemm is a head, not an excitation
    res = Pipeline([("quantize", {"force_int8": True, "float_excitation": True})], verify_samples=16).run(model, calib_for(model))
    st = res.steps[0].report.stats
    se_convs = {n.name for n in branch if n.op_type == "Conv"}
    assert sorted(st["fusion"]["float_heavy"]) == sorted(se_convs)  # exactly the excitation convs run in float
    assert {s.layer for s in res.steps[0].report.skipped if "squeeze-excite" in s.reason} == se_convs
    assert st["fusion"]["ops"]["com.microsoft:QLinearMul"] >= n_se  # the feature map is still scaled in uint8


def test_quantize_cli_float_excitation(cli, tmp_path):
    src, calib, rep = tmp_path / "mbv3.onnx", tmp_path / "calib.npy", tmp_path / "q.json"
    save_model(build("mobilenet_v3", "tiny", seed=0), src)
    np.save(calib, np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    r = cli("quantize", src, "--force-int8", "-o", tmp_path / "q.onnx", "--calib", calib, "--float-excitation", "--report", rep)
    assert r.code == 0, r.err
    q = json.loads(rep.read_text())["passes"][-1]
    kept = [s for s in q["skipped"] if "squeeze-excite" in s["reason"]]
    n_se = sum(1 for n in build("mobilenet_v3", "tiny", seed=0).graph if n.op_type == "HardSigmoid")
    assert len(kept) == 2 * n_se == len(q["stats"]["fusion"]["float_heavy"])


def test_sigmoid_leakyrelu_softmax_between_quantized_tensors_become_integer_kernels():
    """LeakyRelu, Sigmoid (SiLU's x·sigmoid(x)) and a mid-graph Softmax sit between quantized tensors, so
    each gets DQ → op → Q and onnxruntime runs QLinearLeakyRelu / QLinearSigmoid / QLinearSoftmax; the
    Softmax producing the graph output stays float (graph outputs are float)."""
    from tests.conftest import named_model_from_text

    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 8, 8, 8] x) => (float[N, 10] y) {
            a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
            b = LeakyRelu <alpha = 0.1> (a)
            c = Conv <pads = [1, 1, 1, 1]> (b, W2, B2)
            d = Sigmoid (c)
            e = Mul (c, d)
            f = Conv <pads = [1, 1, 1, 1]> (e, W3, B3)
            s = Softmax <axis = 1> (f)
            t = Mul (f, s)
            p = GlobalAveragePool (t)
            r = Flatten (p)
            z = Gemm <transB = 1> (r, W4, B4)
            y = Softmax <axis = 1> (z)
        }
    """
    w = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
    model = named_model_from_text(text, W1=w(8, 8, 3, 3), B1=w(8), W2=w(8, 8, 3, 3), B2=w(8), W3=w(8, 8, 3, 3), B3=w(8), W4=w(10, 8), B4=w(10))
    calib = CalibrationSet({"x": rng.normal(size=(16, 8, 8, 8)).astype(np.float32)})
    res = Pipeline([("quantize", {})], verify_samples=8).run(model, calib)
    ops = res.steps[0].report.stats["fusion"]["ops"]
    for op in ("QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax"):
        assert ops.get(f"com.microsoft:{op}") == 1, ops
    assert ops["com.microsoft:QLinearConv"] == 3 and ops.get("Softmax") == 1 and ops.get("Sigmoid") is None
    assert res.steps[0].vs_original.min_sqnr > 30  # measured 37 dB


def _conv_rows(rng, n_rows: int, n_in: int, mix: np.ndarray | None = None) -> np.ndarray:
    """Correlated inputs (as neighbouring pixels and channels are): white noise through a mixing matrix."""
    mix = rng.standard_normal((n_in, n_in)) / np.sqrt(n_in) if mix is None else mix
    return rng.standard_normal((n_rows, n_in)) @ mix


def test_gptq_codes_lower_the_output_error_not_the_weight_error():
    from onnxcc.passes.quantization import gptq as G

    rng = np.random.default_rng(0)
    for groups, outs, n in [(1, 16, 72), (8, 1, 9), (4, 6, 300)]:  # dense, depthwise-like, wider than a block
        w = rng.standard_normal((groups, outs, n))
        scale = np.abs(w).max(2) / 127
        mixes = [rng.standard_normal((n, n)) / np.sqrt(n) for _ in range(groups)]
        gram = lambda seed: np.stack([(lambda x: x.T @ x)(_conv_rows(np.random.default_rng(seed + g), 4 * n, n, mixes[g])) for g in range(groups)])  # noqa: E731
        h, h_fresh = gram(10), gram(100)  # the rows GPTQ sees, and fresh rows of the same distribution
        near = np.clip(np.round(w / scale[:, :, None]), -127, 127)
        codes = G.gptq_codes(w, scale, h)
        assert codes.min() >= -127 and codes.max() <= 127 and np.array_equal(codes, np.round(codes))
        for hh, most in ((h, 0.75), (h_fresh, 0.75)):  # measured 0.46-0.68
            ratio = G.output_error(w, codes * scale[:, :, None], hh) / G.output_error(w, near * scale[:, :, None], hh)
            assert ratio < most, (groups, outs, n, ratio)
        assert G.output_error(w, codes * scale[:, :, None], np.eye(n)[None]) > G.output_error(w, near * scale[:, :, None], np.eye(n)[None])  # the weights themselves move further


def test_gptq_leaves_columns_with_zero_input_at_their_nearest_code():
    from onnxcc.passes.quantization import gptq as G

    rng = np.random.default_rng(2)
    w = rng.standard_normal((1, 8, 20))
    scale = np.abs(w).max(2) / 127
    x = _conv_rows(rng, 200, 20)
    x[:, [3, 11]] = 0.0  # channels a ReLU never opens
    codes = G.gptq_codes(w, scale, (x.T @ x)[None])
    near = np.round(w / scale[:, :, None])
    assert np.array_equal(codes[..., [3, 11]], near[..., [3, 11]])
    assert not np.array_equal(codes, near)


def test_gptq_rounding_in_the_pass(folded, monkeypatch):
    """Same format and kernels, codes that differ from nearest rounding, every rounded layer's output error
    on the calibration rows lower; a re-quantization (mixed precision, speed guard) reuses the codes."""
    from onnxcc.passes.quantization import gptq as G

    model = folded("mobilenet_v2")
    calib = calib_for(model, 32)
    near = clone_model(model)
    Pipeline([("quantize", {"force_int8": True, "weight_rounding": "nearest", "check_fusion": False})], verify=False).run(near, calib)
    res = Pipeline([("quantize", {"force_int8": True, "weight_rounding": "gptq"})], verify=False).run(model, calib)
    st = res.steps[0].report.stats
    ratios = [v["gptq_output_error_ratio"] for v in st["layers"].values() if "gptq_output_error_ratio" in v]
    assert len(ratios) >= 10 and max(ratios) <= 1.0 and np.median(ratios) < 0.9
    assert st["fusion"]["float_heavy"] == []
    int8 = lambda m: {k: v.const_value.numpy() for k, v in m.graph.initializers.items() if v.const_value.dtype == ir.DataType.INT8}  # noqa: E731
    a, b = int8(near), int8(model)
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)
    assert all(np.abs(a[k].astype(int) - b[k]).max() <= 127 for k in a)
    # a second quantization of the same float model with the same context: no Gram matrix is accumulated again
    from onnxcc.compiler.passbase import PassContext
    from onnxcc.passes.quantization.qdq import QuantizePass

    calls = []
    orig = G.InputGram.update
    monkeypatch.setattr(G.InputGram, "update", lambda self, x: (calls.append(1), orig(self, x)))
    ctx = PassContext(calibration=calib)
    fresh = folded("mobilenet_v2")
    QuantizePass(QuantizePass.Config(force_int8=True, check_fusion=False, layer_errors=False), ctx)(clone_model(fresh))
    first = len(calls)
    QuantizePass(QuantizePass.Config(force_int8=True, check_fusion=False, layer_errors=False), ctx)(clone_model(fresh))
    assert first > 0 and len(calls) == first


def test_gptq_refuses_layers_with_fewer_calibration_rows_than_inputs(folded):
    model = folded("resnet")  # the classifier sees one row per sample: 4 rows for its 64 inputs
    res = Pipeline([("quantize", {"check_fusion": False, "calib_samples": 4})], verify=False).run(model, calib_for(model, 4))
    why = [s for s in res.steps[0].report.skipped if "GPTQ needs" in s.reason]
    assert any("Gemm" in s.layer or "fc" in s.layer.lower() or "gemm" in s.layer.lower() for s in why), [s.layer for s in why]


@pytest.mark.parametrize("attrs, cin, group", [("pads = [1, 0, 2, 1], group = 2", 8, 2), ("strides = [2, 2], dilations = [1, 2], pads = [1, 1, 1, 1]", 8, 1), ("group = 8, pads = [1, 1, 1, 1]", 8, 8)])
def test_gptq_rows_are_the_convs_own_patches(attrs, cin, group):
    """With every output position sampled, Σ_g trace(W_g H_g W_gᵀ) is the energy of the conv's output
    (bias 0) as onnxruntime computes it: the im2col rows follow pads, strides, dilations and groups,
    and the kernel size comes from the weight (kernel_shape is optional in ONNX)."""
    from onnxcc.passes.quantization import gptq as G
    from tests.conftest import named_model_from_text

    rng = np.random.default_rng(5)
    w = rng.normal(size=(8, cin // group, 3, 3)).astype(np.float32)
    text = f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, {cin}, 12, 12] x) => (float[N, 8, ?, ?] y) {{
            y = Conv <{attrs}> (x, W)
        }}
    """
    model = named_model_from_text(text, W=w)
    node = next(iter(model.graph))
    assert "kernel_shape" not in node.attributes
    x = rng.normal(size=(3, cin, 12, 12)).astype(np.float32)
    y = next(iter(run_model(model, [{"x": x}]).values()))
    gram = G.InputGram(node, rows_per_sample=10_000)
    gram.update(x)
    m = weight_view.grouped(node, w)[0].astype(np.float64)
    assert gram.rows == 3 * y.shape[2] * y.shape[3]
    energy = float(np.sum((m @ gram.h.astype(np.float64)) * m))
    assert energy == pytest.approx(float(np.sum(y.astype(np.float64) ** 2)), rel=1e-4)


def test_quantize_cli_weight_rounding(cli, tmp_path, resnet_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    codes = {}
    for rounding in ("gptq", "nearest"):
        out, rep = tmp_path / f"{rounding}.onnx", tmp_path / f"{rounding}.json"
        r = cli("quantize", resnet_path, "-o", out, "--calib", calib, "--weight-rounding", rounding, "--report", rep)
        assert r.code == 0, r.err
        layers = json.loads(rep.read_text())["passes"][-1]["stats"]["layers"]
        ratios = [v["gptq_output_error_ratio"] for v in layers.values() if "gptq_output_error_ratio" in v]
        assert (len(ratios) > 5 and max(ratios) <= 1.0) if rounding == "gptq" else ratios == []
        codes[rounding] = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer if t.data_type == onnx.TensorProto.INT8}
    assert codes["gptq"].keys() == codes["nearest"].keys()
    assert any(not np.array_equal(codes["gptq"][k], codes["nearest"][k]) for k in codes["gptq"])
    r = cli("quantize", resnet_path, "-o", tmp_path / "x.onnx", "--calib", calib, "--weight-rounding", "fancy")
    assert r.code == 2 and not (tmp_path / "x.onnx").exists()


def test_ranges_means_and_gram_matrices_are_gathered_in_one_run_over_the_data(folded, monkeypatch):
    """The statistics quantize needs are declared up front and fed from one pass over the calibration
    data (they took three before: ranges, bias-correction means, GPTQ's Gram matrices)."""
    from onnxcc.compiler import calibration as C

    runs = []
    orig = C.ActivationCollector.collect

    def counting(self, reducers, **kw):
        runs.append(sorted({type(r).__name__ for rs in reducers.values() for r in rs}))
        return orig(self, reducers, **kw)

    monkeypatch.setattr(C.ActivationCollector, "collect", counting)
    model = folded("resnet")
    opts = {"bias_correction": True, "weight_rounding": "gptq", "layer_errors": False, "check_fusion": False}
    rep = Pipeline([("quantize", opts)], verify=False).run(model, calib_for(model, 16)).steps[0].report
    assert runs == [["ChannelStats", "InputGram", "MinMax"]]
    assert any("bias_correction_max" in v for v in rep.stats["layers"].values())
    assert any("gptq_output_error_ratio" in v for v in rep.stats["layers"].values())


def test_a_model_onnxruntime_refuses_to_optimize_skips_the_fusion_check_with_its_reason(folded, monkeypatch):
    """Verification runs unoptimized; the fusion check needs ORT_ENABLE_ALL. Where onnxruntime
    refuses that level (a Range fed non-scalars after freezing, say), quantize still delivers and
    says the check was skipped, instead of failing the input."""
    from onnxcc.compiler.errors import BadInputError
    from onnxcc.passes.quantization import fusion

    def refuse(model):
        raise BadInputError("onnxruntime cannot load the model: [ONNXRuntimeError] : 1 : FAIL : Range")

    monkeypatch.setattr(fusion, "optimized_graph", refuse)
    model = folded("resnet")
    res = Pipeline([("quantize", {})], verify_samples=8).run(model, calib_for(model))
    rep = res.steps[0].report
    assert rep.modified and any(s.layer == "fusion check" and "Range" in s.reason for s in rep.skipped)
    assert res.steps[0].vs_original.min_sqnr > 5.0


@pytest.mark.parametrize("reduce_range", [True, False])
def test_lossy_error_is_measured_as_deployed_and_7_bit_weights_are_the_default(tiny_models, reduce_range):
    """The pipeline judges a lossy pass on onnxruntime's optimized session (the fused integer
    kernels, whose int16 pair sums saturate on AVX2 without VNNI), not on the unfused QDQ graph."""
    from onnxcc.compiler.verify import verification_feeds

    fp32 = clone_model(tiny_models["resnet"])
    calib = CalibrationSet({"input": np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)})
    model = clone_model(fp32)
    res = Pipeline(["fold", ("quantize", {"reduce_range": reduce_range})]).run(model, calib)
    step = res.steps[-1]
    feeds = verification_feeds(fp32, calib)
    ref = run_model(fp32, feeds)
    deployed = compare_outputs(ref, run_model(model, feeds, optimize=True)).min_sqnr
    assert step.vs_original.min_sqnr == pytest.approx(deployed, abs=1e-6)
    codes = [const_array(v) for v in model.graph.initializers.values() if v.const_value is not None and v.const_value.dtype == ir.DataType.INT8]
    assert codes and max(int(np.abs(c).max()) for c in codes) == (63 if reduce_range else 127)
    assert step.config["reduce_range"] is reduce_range


@pytest.mark.parametrize("family, slower", [("mobilenet_v2", True), ("resnet", False)])
def test_unguarded_quantize_keeps_a_model_float_when_int8_is_predicted_slower(folded, family, slower):
    """Without the speed guard nothing is timed: a model whose dense (ungrouped conv / matrix)
    MACs per activation element are below speed.INT8_MIN_INTENSITY is predicted slower in INT8 and
    stays float, the report's first skipped entry saying why; force_int8 quantizes it anyway."""
    from onnxcc.compiler.analysis import dense_intensity
    from onnxcc.compiler.speed import INT8_MIN_INTENSITY

    model = folded(family)
    before = [n.op_type for n in model.graph]
    intensity = dense_intensity(model)
    res = Pipeline([("quantize", {"check_fusion": False, "layer_errors": False})], verify=False).run(model, calib_for(model))
    rep = res.steps[0].report
    assert rep.stats["dense_macs_per_element"] == pytest.approx(intensity, abs=0.01)
    assert (intensity < INT8_MIN_INTENSITY) is slower
    kept = bool(rep.skipped) and rep.skipped[0].layer == "model" and "predicted slower than fp32" in rep.skipped[0].reason
    integer = any(n.op_type == "DequantizeLinear" for n in model.graph)
    assert kept is slower and integer is not slower and rep.modified is not slower
    if slower:
        assert [n.op_type for n in model.graph] == before
        res = Pipeline([("quantize", {"force_int8": True, "check_fusion": False, "layer_errors": False})], verify=False).run(model, calib_for(model))
        assert res.steps[0].report.modified and any(n.op_type == "DequantizeLinear" for n in model.graph)


def test_a_concat_that_writes_a_graph_output_stays_float_and_keeps_small_scores():
    """A detector head ends ``Concat(boxes, Sigmoid(class logits))`` as its output (YOLOv8): no
    integer kernel can write a float graph output, so quantizing the Concat's inputs only rounds the
    class probabilities to steps of 1/255, and scores of a few thousandths to 0. The Concat stays
    float (said in the report); the convs before it are still integer."""
    from tests.conftest import named_model_from_text

    rng = np.random.default_rng(0)
    model = named_model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 8, 8] x) => (float[N, 6, 8, 8] y) {
        b = Conv <pads = [1, 1, 1, 1]> (x, wb, bb)
        c = Conv <pads = [1, 1, 1, 1]> (x, wc, bc)
        p = Sigmoid (c)
        y = Concat <axis = 1> (b, p)
    }""", wb=rng.normal(0, 1, (4, 4, 3, 3)).astype(np.float32), bb=np.full(4, 300.0, np.float32),
        wc=rng.normal(0, 0.3, (2, 4, 3, 3)).astype(np.float32), bc=np.full(2, -7.0, np.float32))
    ref = clone_model(model)
    res = Pipeline([("quantize", {"force_int8": True})], verify=False).run(model, calib_for(model))
    rep = res.steps[0].report
    assert any("writes a graph output" in s.reason for s in rep.skipped)
    assert rep.stats["fusion"]["float_heavy"] == []  # both convs integer
    assert "p" not in {n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear"}  # the probabilities are not rounded
    feeds = [{"x": rng.standard_normal((8, 4, 8, 8)).astype(np.float32)}]
    r, g = run_model(ref, feeds)["y"][:, 4:], run_model(model, feeds, optimize=True)["y"][:, 4:]
    assert sqnr_db(r, g) > 20.0  # scores around 1e-3: rounded to steps of 1/255 they gave about 0 dB


def _decode_head(rng):
    """A detector tail in the style of YOLOv8: a conv's 16-bin logits → Softmax → the DFL conv
    (weights 0..15: the expected bin) → Add of an anchor offset from a second conv → Mul by the
    stride → the graph output. Beside it, a residual Add feeding a conv (an integer kernel reads it)."""
    from tests.conftest import named_model_from_text

    return named_model_from_text("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 4, 8, 8] x) => (float[N, 1, 8, 8] y, float[N, 4, 8, 8] z) {
        l = Conv <pads = [1, 1, 1, 1]> (x, wl, bl)
        p = Softmax <axis = 1> (l)
        e = Conv (p, wd)
        a = Conv <pads = [1, 1, 1, 1]> (x, wa, ba)
        s = Add (e, a)
        y = Mul (s, stride)
        r = Conv <pads = [1, 1, 1, 1]> (x, wr, br)
        t = Add (r, x)
        z = Conv <pads = [1, 1, 1, 1]> (t, wz, bz)
    }""", wl=rng.normal(0, 0.5, (16, 4, 3, 3)).astype(np.float32), bl=rng.normal(0, 1, 16).astype(np.float32),
        wd=np.arange(16, dtype=np.float32).reshape(1, 16, 1, 1),
        wa=rng.normal(0, 0.3, (1, 4, 3, 3)).astype(np.float32), ba=np.full(1, 4.0, np.float32),
        stride=np.array(8.0, np.float32),
        wr=rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), br=np.zeros(4, np.float32),
        wz=rng.normal(0, 0.3, (4, 4, 3, 3)).astype(np.float32), bz=np.zeros(4, np.float32))


def test_a_decode_tail_that_only_float_ops_read_stays_float(monkeypatch):
    """The anchor Add and the stride Mul feed only the float graph output: their outputs would be
    quantized just to be dequantized, so they stay float, with the reason. The convs, the DFL conv
    included, and the residual Add that a conv reads stay integer. Measured on the head's output
    against the same quantizer without the rule."""
    from onnxcc.passes.quantization import placement as P

    rng = np.random.default_rng(0)
    model = _decode_head(rng)
    ref = clone_model(model)
    feeds = [{"x": rng.standard_normal((16, 4, 8, 8)).astype(np.float32)}]

    def quantized(m):
        res = Pipeline([("quantize", {"force_int8": True})], verify=False).run(m, calib_for(m, 64))
        return res.steps[0].report, run_model(m, feeds, optimize=True)

    rep, out = quantized(clone_model(model))
    why = {s.layer: s.reason for s in rep.skipped}
    assert "feeds only float ops" in why["s"] and "e" not in why
    ops = rep.stats["fusion"]["ops"]
    assert ops["com.microsoft:QLinearConv"] == 4 and ops["com.microsoft:QLinearAdd"] == 1  # l, e, a, r; t (z writes a graph output)
    monkeypatch.setattr(P, "integer_readers", lambda graph, allowed: {n: True for n in graph})
    rep_all, out_all = quantized(clone_model(model))
    assert rep_all.stats["fusion"]["ops"]["com.microsoft:QLinearAdd"] == 2
    ours, before = sqnr_db(run_model(ref, feeds)["y"], out["y"]), sqnr_db(run_model(ref, feeds)["y"], out_all["y"])
    assert ours > before + 0.2, (ours, before)


def test_a_dead_channel_under_a_large_bias_keeps_an_int32_bias():
    # PP-OCRv4's detector: BatchNorm folded over a dead channel leaves weights of 1e-10 under a
    # bias of 0.3; its int32 bias needed 10^11 codes, and the layer kept a float bias
    model = build("resnet", "tiny", seed=0)
    Pipeline(["fold"], verify=False).run(model)
    conv = next(n for n in model.graph if n.op_type == "Conv" and len(n.inputs) > 2 and n.inputs[2] is not None)
    w, b = const_array(conv.inputs[1]).copy(), const_array(conv.inputs[2]).copy()
    w[0] *= 1e-10
    b[0] = 0.3
    conv.inputs[1].const_value = ir.tensor(w)
    conv.inputs[2].const_value = ir.tensor(b)
    ref = clone_model(model)
    calib = calib_for(model)
    res = Pipeline([("quantize", {"force_int8": True})], verify=False).run(model, calib)
    info = res.steps[0].report.stats["layers"][conv.name]
    assert info["bias_fit_channels"] == 1 and "bias" not in info
    bias_dq = conv.inputs[2].producer()
    assert bias_dq.op_type == "DequantizeLinear" and bias_dq.inputs[0].const_value.dtype == ir.DataType.INT32
    codes = bias_dq.inputs[0].const_value.numpy()
    assert np.all(np.abs(codes) <= 2**30)
    w_dq = conv.inputs[1].producer()
    assert np.all(w_dq.inputs[0].const_value.numpy()[0] == 0)  # the dead channel's weights are zero codes
    # the dead channel's bias is stored exactly, and the model still agrees with fp32
    scale = bias_dq.inputs[1]
    mul = scale.producer()
    s_b = const_array(scale) if mul is None else const_array(mul.inputs[0]) * const_array(mul.inputs[1])
    step = np.broadcast_to(s_b, codes.shape)
    assert abs(codes[0] * float(step[0]) - 0.3) <= 1e-6 * 0.3  # float32's precision, as DequantizeLinear computes it
    feeds = [dict(calib_for(ref, 4, seed=1).arrays)]
    assert compare_outputs(run_model(ref, feeds), run_model(model, feeds)).min_sqnr > 5.0


def test_narrow_constants_shrink_the_file_and_onnxruntime_runs_the_same_kernels(folded, monkeypatch, tmp_path):
    # float16 scales and int16 biases behind Casts: onnxruntime folds the Casts at load, so the
    # narrowed model runs the same fused kernels and gives bit-identical outputs to the model with
    # the same (float16-valued) scales stored wide
    from onnxcc.passes.quantization import emission

    model = folded("mobilenet_v3")
    calib = calib_for(model)
    feeds = [dict(calib_for(model, 4, seed=1).arrays)]
    cfg = {"force_int8": True, "narrow_constants": True}
    runs = {}
    for kind in ("wide", "narrow"):
        m = clone_model(model)
        with monkeypatch.context() as mp:
            if kind == "wide":
                mp.setattr(emission, "narrow_constants", lambda graph, names: {})
            res = Pipeline([("quantize", cfg)], verify=False).run(m, calib)
        save_model(m, tmp_path / f"{kind}.onnx")
        runs[kind] = (m, res.steps[0].report.stats, run_model(m, feeds, optimize=True))
    (wide, s_wide, y_wide), (narrow, s_narrow, y_narrow) = runs["wide"], runs["narrow"]
    done = s_narrow["qdq_compacted"]["narrowed"]
    casts = [n for n in narrow.graph if n.op_type == "Cast"]
    assert done["scales"] >= 5 and done["biases"] >= 1 and len(casts) == done["scales"] + done["biases"]
    for c in casts:  # half-width initializers in, the wide type out, read by Q/DQ arithmetic only
        src = c.inputs[0].const_value.dtype
        assert (src, c.outputs[0].dtype) in ((ir.DataType.FLOAT16, ir.DataType.FLOAT), (ir.DataType.INT16, ir.DataType.INT32))
    saved = (tmp_path / "wide.onnx").stat().st_size - (tmp_path / "narrow.onnx").stat().st_size
    assert saved >= 0.6 * done["element_bytes"] > 0
    assert s_narrow["fusion"]["integer_kernels"] == s_wide["fusion"]["integer_kernels"] > 0
    assert s_narrow["fusion"]["float_heavy"] == s_wide["fusion"]["float_heavy"] == []
    for k in y_wide:
        assert np.array_equal(y_wide[k], y_narrow[k])
    # the scales are float16 values rounded up from max|w| / qmax: the largest weight keeps its code
    w = np.random.default_rng(0).standard_normal((16, 8, 3, 3)).astype(np.float32)
    q, s = R.per_channel_weight(w, 0, bits=7, half_scales=True)
    assert np.array_equal(s.astype(np.float16).astype(np.float32), s)
    assert np.all(s >= np.abs(w).reshape(16, -1).max(1) / 63) and np.all(s <= np.abs(w).reshape(16, -1).max(1) / 63 * (1 + 2**-10))
    assert np.abs(q).max() == 63


def test_a_convtranspose_runs_in_float_on_int8_weights():
    # onnxruntime's CPU provider has no integer ConvTranspose: the layer computes in float, its
    # weights are stored as int8 codes behind a DequantizeLinear (PP-OCRv4's DB head: 9.3 kB -> 2.4 kB)
    rng = np.random.default_rng(0)
    text = """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N, 8, 8, 8] x) => (float[N, 1, 32, 32] y) {
            a = Conv <pads = [1, 1, 1, 1]> (x, W1, B1)
            b = Relu (a)
            c = ConvTranspose <strides = [2, 2], kernel_shape = [2, 2]> (b, WT, BT)
            d = Relu (c)
            e = ConvTranspose <strides = [2, 2], kernel_shape = [2, 2]> (d, WS)
            y = Sigmoid (e)
        }
    """
    w = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
    model = named_model_from_text(text, W1=w(32, 8, 3, 3), B1=w(32), WT=w(32, 32, 2, 2), BT=w(32), WS=w(32, 1, 2, 2))
    calib = CalibrationSet({"x": rng.normal(size=(16, 8, 8, 8)).astype(np.float32)})
    res = Pipeline([("quantize", {"force_int8": True})], verify_samples=8).run(model, calib)
    stats = res.steps[0].report.stats
    big, small = (n for n in model.graph if n.op_type == "ConvTranspose")
    dq = big.inputs[1].producer()
    assert dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value.dtype == ir.DataType.INT8
    assert dq.attributes["axis"].value == 1 and dq.inputs[1].const_value.shape == (32,)  # per output channel
    assert const_array(small.inputs[1]) is not None  # 32 weights: not worth a DequantizeLinear
    info = stats["layers"][big.name]
    assert info["weight_only"] == "int8" and info["weight_sqnr_db"] > 40
    assert big.name in res.steps[0].report.changed
    assert stats["fusion"]["ops"].get("ConvTranspose") == 2  # float kernels, as before
    assert res.steps[0].vs_original.min_sqnr > 25
