"""Pipeline, registry, verification metrics, calibration data and analysis."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx_ir as ir
import pytest

from onnxcc.compiler.analysis import analyze
from onnxcc.compiler.calibration import ActivationCollector, CalibrationSet, ChannelStats, MinMax, RowSampler
from onnxcc.compiler.errors import BadInputError, BudgetError, VerificationError
from onnxcc.compiler.ir_utils import clone_model, load_model, save_model
from onnxcc.compiler.pipeline import Budget, Pipeline, load_recipe
from onnxcc.compiler.passbase import PassReport, make_config
from onnxcc.compiler.registry import register, unregister
from onnxcc.compiler.verify import compare_arrays, compare_outputs
from tests.conftest import ScaleConvWeights, model_from_text


class _ScaleWeights(ScaleConvWeights):
    name = "test-scale"


class _ScaleLossy(ScaleConvWeights):
    name = "test-scale-lossy"
    exact = False


@pytest.fixture
def test_passes():
    register(_ScaleWeights)
    register(_ScaleLossy)
    yield
    unregister("test-scale")
    unregister("test-scale-lossy")


def test_exact_pass_that_changes_outputs_is_caught(tiny_models, test_passes):
    model = clone_model(tiny_models["resnet"])
    with pytest.raises(VerificationError, match="pass 'test-scale' is exact but changed"):
        Pipeline(["fold", ("test-scale", {"factor": 1.05})]).run(model)


def test_lossy_pass_records_error_and_budget_gate(tiny_models, test_passes):
    model = clone_model(tiny_models["resnet"])
    res = Pipeline([("test-scale-lossy", {"factor": 1.001})]).run(model)
    step = res.steps[0]
    assert 0 < step.vs_original.max_rel < 0.05
    assert step.vs_original.min_sqnr > 30
    with pytest.raises(BudgetError, match="test-scale-lossy"):
        Pipeline([("test-scale-lossy", {"factor": -1.0})], budget=Budget(max_drop=1.0)).run(clone_model(tiny_models["resnet"]))


def test_a_failed_run_writes_a_report_that_says_why(cli, tmp_path, resnet_path, test_passes):
    """CI reads the report of a failed run: status, exit code, the failing pass, the error and the
    steps verified before it; the model is not written."""
    import json

    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    res = cli("compile", resnet_path, "-o", out, "--pass", "fold", "--pass", "test-scale-lossy:factor=-1",
              "--budget", "0.5", "--report", rep, "--no-latency")
    assert res.code == 1 and not out.exists()
    data = json.loads(rep.read_text())
    assert data["status"] == "failed" and data["exit_code"] == 1 and data["failed_pass"] == "test-scale-lossy"
    assert "budget" in data["error"] and data["error"] in res.err
    assert [p["pass"] for p in data["passes"]] == ["fold"] and data["output"] is None
    res = cli("compile", resnet_path, "-o", out, "--recipe", "lossless", "--report", rep, "--no-latency")
    assert res.code == 0 and json.loads(rep.read_text())["status"] == "ok"


def test_cli_writes_nothing_when_verification_fails(cli, tmp_path, resnet_path, test_passes):
    out = tmp_path / "o.onnx"
    res = cli("compile", resnet_path, "-o", out, "--pass", "test-scale:factor=1.1")
    assert res.code == 1 and "exact but changed" in res.err
    assert not out.exists()
    res = cli("compile", resnet_path, "-o", out, "--pass", "test-scale-lossy:factor=-1", "--budget", "0.5")
    assert res.code == 1 and "budget" in res.err
    assert not out.exists()


def test_make_config_coerces_and_rejects():
    from onnxcc.passes.fold import FoldPass

    cfg = make_config(FoldPass, {"opset": "17", "fold-batchnorm": "false"})
    assert cfg.opset == 17 and cfg.fold_batchnorm is False
    with pytest.raises(BadInputError, match="no option 'nope'"):
        make_config(FoldPass, {"nope": 1})
    with pytest.raises(BadInputError, match="fold_batchnorm"):
        make_config(FoldPass, {"fold_batchnorm": "maybe"})


def test_recipe_yaml_and_json(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("passes:\n  - name: fold\n    options: {max_iterations: 2}\n")
    j = tmp_path / "r.json"
    j.write_text(json.dumps([{"fold": {"opset": 17}}]))
    assert load_recipe(y)[0].options == {"max_iterations": 2}
    assert load_recipe(j)[0].options == {"opset": 17}
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [")
    with pytest.raises(BadInputError, match="cannot parse"):
        load_recipe(bad)


def test_compare_metrics():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(64, 10)).astype(np.float32)
    noisy = ref + rng.normal(scale=0.01, size=ref.shape).astype(np.float32)
    m = compare_arrays("y", ref, noisy)
    assert 35 < m.sqnr_db < 45  # signal var 1, noise var 1e-4 → 40 dB
    assert m.cosine > 0.999 and m.top1 > 0.95
    same = compare_arrays("y", ref, ref.copy())
    assert same.max_abs == 0 and math.isinf(same.sqnr_db) and same.top1 == 1.0
    assert compare_arrays("y", ref, ref[:, :5]).problem.startswith("shape")
    comp = compare_outputs({"y": ref}, {"z": ref})
    assert not comp.ok_structure and {o.problem for o in comp.outputs} == {"output missing from candidate", "output not in reference"}
    labels = ref.argmax(1)
    c = compare_outputs({"y": ref}, {"y": noisy}, labels)
    assert c.accuracy_ref == 1.0 and c.accuracy_cand > 0.95


def test_cli_verify_exit_codes(cli, tmp_path, resnet_path):
    res = cli("verify", resnet_path, resnet_path, "--json")
    assert res.code == 0 and json.loads(res.out)["ok"] is True
    other = tmp_path / "other.onnx"
    from onnxcc.models.builders import build

    save_model(build("resnet", "tiny", seed=99), other)
    res = cli("verify", resnet_path, other)
    assert res.code == 1 and "OUTSIDE tolerance" in res.out
    mismatch = tmp_path / "mm.onnx"
    save_model(build("vgg", "tiny", seed=0), mismatch)  # different input shape
    res = cli("verify", resnet_path, mismatch)
    assert res.code == 2


def test_calibration_sources_agree(tmp_path, tiny_models):
    model = tiny_models["resnet"]
    x = np.random.default_rng(0).normal(size=(10, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "c.npy", x)
    np.savez(tmp_path / "c.npz", input=x)

    class Reader:  # onnxruntime's CalibrationDataReader interface
        def __init__(self):
            self.it = iter([{"input": x[i : i + 2]} for i in range(0, 10, 2)])

        def get_next(self):
            return next(self.it, None)

    sets = [CalibrationSet.load(s, model) for s in (tmp_path / "c.npy", tmp_path / "c.npz", Reader(), {"input": x})]
    for s in sets:
        assert len(s) == 10
        assert np.array_equal(np.concatenate([b["input"] for b in s.batches(4)]), x)


def test_activation_collector_streams(tiny_models):
    model = tiny_models["resnet"]
    conv = next(n for n in model.graph if n.op_type == "Conv")
    name = conv.outputs[0].name
    x = np.random.default_rng(1).normal(size=(40, 3, 32, 32)).astype(np.float32)
    calib = CalibrationSet.load({"input": x}, model)
    mm, cs = MinMax(), ChannelStats()
    rows = RowSampler(lambda a: a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1]), per_batch=50, max_rows=120)
    ActivationCollector(model, calib, batch_size=8).collect({name: [mm, cs, rows]})

    full = _intermediate(model, name, x)
    assert mm.min == pytest.approx(full.min()) and mm.max == pytest.approx(full.max())
    assert np.allclose(cs.mean, full.mean(axis=(0, 2, 3)), atol=1e-5)
    assert rows.result().shape == (120, full.shape[1])  # bounded: 120 rows kept of 40*32*32


class _Keep:
    """Reducer that keeps every batch it is given."""

    def __init__(self):
        self.parts = []

    def update(self, a):
        self.parts.append(a)


@pytest.mark.parametrize("family", ["resnet", "densenet", "inception"])
def test_segment_runner_matches_full_runs_while_weights_change(tiny_models, family):
    """Layer-by-layer collection from cached cut tensors equals a full run of the model as it is
    at each step, while each layer's weights change after its input was collected (a refit)."""
    from onnxcc.compiler.calibration import SegmentRunner
    from onnxcc.compiler.ir_utils import clone_model, const_array
    from onnxcc.compiler.ir_utils import set_input_const

    model = clone_model(tiny_models[family])
    x = np.random.default_rng(2).normal(size=(20, 3, 32, 32)).astype(np.float32)
    calib = CalibrationSet.load({"input": x}, model)
    runner = SegmentRunner(model, calib, batch_size=8)
    convs = [n for n in model.graph if n.op_type == "Conv"]

    for conv in convs:
        got = _Keep()
        runner.collect({conv.inputs[0].name: [got]}, before=conv)
        ref = x if conv.inputs[0].name == "input" else _intermediate(model, conv.inputs[0].name, x)
        assert np.allclose(np.concatenate(got.parts), ref, atol=1e-5)
        set_input_const(model.graph, conv, 1, const_array(conv.inputs[1]) * 0.5)  # later inputs must see this
    last = _Keep()
    out = model.graph.outputs[0].name
    runner.collect({out: [last]})
    from onnxcc.compiler.verify import run_model

    assert np.allclose(np.concatenate(last.parts), run_model(model, [{"input": x}])[out], atol=1e-4)
    assert runner.sessions <= len(convs) + 1  # one small session per segment, never the whole model again
    with pytest.raises(ValueError):
        runner.collect({convs[0].inputs[0].name: [_Keep()]}, before=convs[0])


def test_segment_runner_reruns_constant_chains_that_change(tiny_models):
    """In a QDQ model a conv's bias is DequantizeLinear(int32) placed before the conv: changing the
    int32 constant after the cut must reach the later layers (constant-only nodes are rerun, not cached)."""
    from onnxcc.compiler.calibration import SegmentRunner
    from onnxcc.compiler.ir_utils import clone_model, const_array

    model = clone_model(tiny_models["resnet"])
    x = np.random.default_rng(3).normal(size=(12, 3, 32, 32)).astype(np.float32)
    calib = CalibrationSet.load({"input": x}, model)
    Pipeline(["fold", ("quantize", {"check_fusion": False, "layer_errors": False})], verify=False).run(model, calib)
    runner = SegmentRunner(model, calib, batch_size=4)
    convs = [n for n in model.graph if n.op_type == "Conv" and n.inputs[2] is not None and n.inputs[2].producer() is not None]
    assert len(convs) > 3

    for conv in convs:
        got = _Keep()
        runner.collect({conv.inputs[0].name: [got]}, before=conv)
        assert np.allclose(np.concatenate(got.parts), _intermediate(model, conv.inputs[0].name, x), atol=1e-5)
        b = conv.inputs[2].producer().inputs[0]  # the int32 bias behind the DequantizeLinear
        b.const_value = ir.tensor(const_array(b) + 1000, name=b.name)


def _intermediate(model, name, x):
    import onnx

    from onnxcc.compiler.verify import make_session

    proto = ir.to_proto(model)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, 1, None))
    return make_session(proto).run([name], {"input": x})[0]


def test_analysis_macs_and_params():
    model = model_from_text(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,8,8] x) => (float[N,5] y) {
            c = Conv <pads=[1,1,1,1], strides=[2,2], group=1> (x, w, b)
            f = Flatten (c)
            y = Gemm <transB=1> (f, fw, fb)
        }""",
        w=np.ones((4, 3, 3, 3), np.float32), b=np.zeros(4, np.float32),
        fw=np.ones((5, 64), np.float32), fb=np.zeros(5, np.float32),
    )
    s = analyze(model)
    conv, gemm = s.layers
    assert conv.macs == 4 * 4 * 4 * 3 * 3 * 3 and conv.params == 4 * 27 + 4
    assert gemm.macs == 5 * 64 and gemm.params == 5 * 64 + 5
    assert s.params == 4 * 27 + 4 + 5 * 64 + 5 and s.macs == conv.macs + gemm.macs
    assert conv.output_shape == (1, 4, 4, 4)


def test_cli_inspect_and_fold_report(cli, tmp_path, resnet_path):
    res = cli("inspect", resnet_path, "--json")
    data = json.loads(res.out)
    assert res.code == 0 and data["op_counts"]["BatchNormalization"] == 20
    out, rep = tmp_path / "f.onnx", tmp_path / "r.json"
    res = cli("fold", resnet_path, "-o", out, "--report", rep)
    assert res.code == 0 and "parameters" in res.out
    report = json.loads(rep.read_text())
    assert report["before"]["macs"] == report["after"]["macs"]
    assert report["after"]["op_counts"].get("BatchNormalization", 0) == 0
    assert report["passes"][0]["verify_vs_previous"]["outputs"][0]["rel"] < 1e-4


def test_external_data_roundtrip(tmp_path, tiny_models):
    p = tmp_path / "m.onnx"
    save_model(tiny_models["vgg"], p, external_data=True)
    assert (tmp_path / "m.onnx.data").exists()
    m2 = load_model(p)
    out = tmp_path / "m2.onnx"
    Pipeline(["fold"]).run(m2)
    save_model(m2, out, external_data=True)
    m3 = load_model(out)
    assert sum(1 for n in m3.graph if n.op_type == "BatchNormalization") == 0


def test_bench_measures_every_model(tmp_path, tiny_models):
    from onnxcc.compiler.bench import bench_models

    folded = clone_model(tiny_models["resnet"])
    Pipeline(["fold"], verify=False).run(folded)
    res = bench_models([("a", tiny_models["resnet"]), ("b", folded)], rounds=2, block=3, warmup=1, measure_memory=True)
    a, b = res.entries
    assert a.ratio == 1.0 and a.runs == b.runs == 6
    assert b.file_size < a.file_size  # BatchNorm parameters are gone
    assert a.peak_mem_mb is not None and a.peak_mem_mb > 0


def test_collector_on_a_model_with_external_data(tmp_path):
    from onnxcc.compiler.calibration import ActivationCollector, CalibrationSet, MinMax
    from onnxcc.compiler.ir_utils import load_model, needs_file, save_model
    from onnxcc.models.builders import build

    model = build("resnet", "tiny", seed=2)
    save_model(model, tmp_path / "m.onnx", external_data=True)
    ext = load_model(tmp_path / "m.onnx")
    assert needs_file(ext)
    calib = CalibrationSet({"input": np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)})
    name = next(n for n in model.graph if n.op_type == "Relu").outputs[0].name
    got = {}
    for label, m in (("memory", model), ("external", ext)):
        r = MinMax()
        ActivationCollector(m, calib).collect({name: [r]})
        got[label] = (r.min, r.max)
    assert got["memory"] == got["external"]


def test_top5_metric_from_the_cli(cli, tmp_path, resnet_path):
    """--metric top5 with labels: the accuracy reported is top-5 (≥ top-1 on the same data)."""
    from onnxcc.compiler.ir_utils import load_model
    from onnxcc.compiler.verify import run_model

    data = np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    logits = next(iter(run_model(load_model(resnet_path), [{"input": data}]).values()))
    labels = np.argsort(-logits, axis=1)[:, 3]  # the 4th-ranked class: top-5 hits all, top-1 none
    np.save(tmp_path / "y.npy", labels)
    acc = {}
    for metric in ("top1", "top5"):
        r = cli("verify", resnet_path, resnet_path, "--data", tmp_path / "x.npy", "--labels", tmp_path / "y.npy",
                "--samples", "16", "--metric", metric, "--json")
        assert r.code == 0, r.err
        acc[metric] = json.loads(r.out)["accuracy_ref"]
    assert acc == {"top1": 0.0, "top5": 1.0}


def test_outputs_whose_shape_depends_on_the_data_are_joined_not_crashed_on():
    """Verification splits samples into feeds; a TopK/Tile/Resize-by-sizes output may differ in
    shape between feeds: joined flattened (the same way for both models), never a crash."""
    from onnxcc.compiler.sessions import join_batches

    a, b = np.arange(6.0).reshape(2, 3), np.arange(8.0).reshape(2, 4)
    assert join_batches([a, b]).shape == (14,)
    assert join_batches([a, a]).shape == (4, 3)
    assert join_batches([np.float32(1), np.float32(2)]).shape == (2,)


class _DuplicateName(ScaleConvWeights):
    """Test-only pass that gives a second node the first conv's name (a naming bug)."""

    name = "test-duplicate-name"
    exact = False

    def call(self, model):
        nodes = list(model.graph)
        nodes[1].name = nodes[0].name
        return PassReport(model, True)


class _BreakGraph(ScaleConvWeights):
    """Test-only pass whose output onnxruntime cannot load (a conv weight of the wrong rank)."""

    name = "test-break-graph"
    exact = False

    def call(self, model):
        conv = next(n for n in model.graph if n.op_type == "Conv")
        w = conv.inputs[1]
        w.const_value = ir.tensor(w.const_value.numpy()[..., 0], name=w.name)
        w.shape = ir.Shape(w.const_value.shape)
        return PassReport(model, True)


@pytest.mark.parametrize("bad, message", [(_DuplicateName, "left two nodes named"), (_BreakGraph, "a model onnxruntime rejects")])
def test_a_pass_whose_output_is_invalid_fails_as_that_pass_not_as_bad_input(tiny_models, bad, message):
    """PP-OCRv4's recognizer under `compress`: a copied node name made onnxruntime refuse the
    result, reported as exit 2 'cannot load the model' as if the input were at fault."""
    register(bad)
    try:
        with pytest.raises(VerificationError, match=message) as err:
            Pipeline(["fold", bad.name]).run(clone_model(tiny_models["resnet"]))
        assert err.value.exit_code == 1
    finally:
        unregister(bad.name)


def test_calibration_data_that_is_one_whole_feed(cli, tmp_path):
    """An image plus a per-channel vector input share no sample axis (1 image, 4 values): the file
    is taken as one feed, as the model takes it, and static INT8 calibrates and verifies on it."""
    import onnx

    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         onnx.helper.make_node("Unsqueeze", ["bias", "axes"], ["b4"]),
         onnx.helper.make_node("Add", ["c", "b4"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", 1, [1, 3, 8, 8]), onnx.helper.make_tensor_value_info("bias", 1, [4])],
        [onnx.helper.make_tensor_value_info("y", 1, [1, 4, 8, 8])],
        [w, onnx.numpy_helper.from_array(np.array([1, 2], np.int64), "axes")],
    )
    src, out, calib = tmp_path / "m.onnx", tmp_path / "q.onnx", tmp_path / "c.npz"
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]), src)
    np.savez(calib, x=rng.standard_normal((1, 3, 8, 8)).astype(np.float32), bias=rng.standard_normal(4).astype(np.float32))
    from onnxcc.compiler.calibration import CalibrationSet
    from onnxcc.compiler.ir_utils import load_model

    cs = CalibrationSet.load(calib, load_model(src))
    assert cs.whole_feed and len(cs) == 1 and [b["bias"].shape for b in cs.batches(8)] == [(4,)]
    r = cli("quantize", src, "-o", out, "--calib", calib, "--report", tmp_path / "r.json")
    assert r.code == 0, r
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_progress_without_a_terminal_is_plain_lines_and_quiet_silences_it(cli, tmp_path, resnet_path, monkeypatch, capsys):
    from onnxcc.compiler import progress

    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    progress.enable(True)
    try:
        update = progress.bar("calibration")
        for i in range(1, 4):
            update(i, 3)
        err = capsys.readouterr().err
        assert "\r" not in err and err.count("\n") == 3 and "calibration" in err and "3/3" in err
    finally:
        progress.enable(False)
    calib = tmp_path / "c.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    r = cli("quantize", resnet_path, "-o", tmp_path / "q.onnx", "--calib", calib)
    assert r.code == 0 and "it/s" in r.err and "\r" not in r.err  # not quiet: progress lines (GPTQ, calibration)
    r = cli("quantize", resnet_path, "-o", tmp_path / "q2.onnx", "--calib", calib, "-q")
    assert r.code == 0 and r.err == ""
