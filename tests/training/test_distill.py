"""The distill pass and command: fine-tuning on the graph against a teacher, QAT on QDQ models,
the keep-the-input guard, refusals, determinism, prune-distill cycles."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from onnxcc.compiler.calibration import CalibrationSet  # noqa: E402
from onnxcc.compiler.errors import BadInputError  # noqa: E402
from onnxcc.compiler.ir_utils import clone_model, load_model, save_model  # noqa: E402
from onnxcc.compiler.pipeline import Pipeline  # noqa: E402
from onnxcc.compiler.verify import run_model  # noqa: E402
from tests.conftest import digest  # noqa: E402

pytestmark = pytest.mark.torch
torch.set_num_threads(2)
MODELS = __import__("pathlib").Path(__file__).resolve().parents[2] / "models"
FAST = {"epochs": 2, "threads": 2, "batch": 16}


def _sample():
    model = load_model(MODELS / "sample_resnet.onnx")
    x = np.load(MODELS / "sample_eval.npy")
    y = np.load(MODELS / "sample_labels.npy")
    return model, x, y


def _accuracy(model, x, y) -> float:
    out = run_model(model, [{model.graph.inputs[0].name: x}])
    return float((next(iter(out.values())).argmax(1) == y).mean())


def test_distill_recovers_a_pruned_sample_model_on_held_out_images():
    model, x, y = _sample()
    x_tr, x_te, y_te = x[:300], x[300:], y[300:]
    calib = CalibrationSet({"image": x_tr})
    pruned = clone_model(model)
    Pipeline(["fold", ("prune", {"ratio": 0.4})], verify=False).run(pruned, calib)
    pruned_acc = _accuracy(pruned, x_te, y_te)
    # one pipeline: the teacher is the model it was given, the student what prune made of it
    res = Pipeline(["fold", ("prune", {"ratio": 0.4}), ("distill", dict(FAST, epochs=4))], verify=False).run(model, calib)
    st = res.steps[-1].report.stats
    assert not st["kept_input"]
    assert st["best"]["val_agreement"] > st["baseline"]["val_agreement"]
    acc = _accuracy(model, x_te, y_te)  # 100 held-out images never trained on
    assert acc >= pruned_acc + 0.2, (pruned_acc, acc)
    assert len(st["history"]) >= 1 and all(h["train_loss"] > 0 for h in st["history"])
    assert st["images_per_s"] > 0 and st["seconds_per_epoch"] > 0 and st["peak_rss_mb"] > 0


def test_a_student_that_is_the_teacher_is_kept_unchanged():
    """Nothing to learn: no epoch beats the input on the held-out split, so the input is kept."""
    model, x, _ = _sample()
    before = [v.const_value.numpy().copy() for v in model.graph.initializers.values()]
    res = Pipeline([("distill", {**FAST, "epochs": 1, "lr": 0.5, "optimizer": "sgd"})], verify=False).run(model, CalibrationSet({"image": x[:100]}))
    rep = res.steps[-1].report
    assert rep.stats["kept_input"] and not rep.modified
    assert any("kept unchanged" in s.reason for s in rep.skipped)
    assert all(np.array_equal(a, v.const_value.numpy()) for a, v in zip(before, model.graph.initializers.values()))


def test_qat_keeps_the_fused_integer_graph_and_never_falls_below_ptq():
    model, x, y = _sample()
    calib = CalibrationSet({"image": x[:200]})
    Pipeline(["fold"], verify=False).run(model)
    teacher = clone_model(model)
    res = Pipeline([("quantize", {})], verify=False).run(model, calib)
    fusion = res.steps[-1].report.stats["fusion"]
    ptq = clone_model(model)
    nodes = [(n.op_type, n.name) for n in model.graph]
    dtypes = {k: v.const_value.dtype for k, v in model.graph.initializers.items()}
    shapes = {k: tuple(v.const_value.shape) for k, v in model.graph.initializers.items()}
    from onnxcc.passes.training.distill import DistillPass
    from onnxcc.compiler.passbase import PassContext

    p = DistillPass(DistillPass.Config(epochs=1, threads=2, batch=16, lr=1e-4, learn_scales=True, val_fraction=0.0, patience=0),
                    PassContext(calibration=calib, original=teacher))
    rep = p(model)
    assert [(n.op_type, n.name) for n in model.graph] == nodes
    assert {k: v.const_value.dtype for k, v in model.graph.initializers.items()} == dtypes  # int8 weights stay int8
    # learned scales keep their shapes (a 0-d per-tensor scale once came back as shape (1,))
    assert {k: tuple(v.const_value.shape) for k, v in model.graph.initializers.items()} == shapes
    from onnxcc.passes.quantization.fusion import fusion_report

    after = fusion_report(model)
    assert after["float_heavy"] == fusion["float_heavy"] and after["integer_kernels"] == fusion["integer_kernels"]
    acc_ptq, acc_qat = _accuracy(ptq, x[200:], y[200:]), _accuracy(model, x[200:], y[200:])
    assert acc_qat >= acc_ptq - 0.01, (acc_ptq, acc_qat)  # within one image of 200: held-out noise
    assert rep.stats["summary"]["quantized"] >= 10 and rep.stats["summary"]["scales"] > 0
    assert not rep.stats["kept_input"]  # the trained values were written back (what the shape check is about)


def test_distill_is_deterministic():
    model, x, _ = _sample()
    Pipeline(["fold", ("prune", {"ratio": 0.3})], verify=False).run(model, CalibrationSet({"image": x[:64]}))
    outs = []
    for _ in range(2):
        m = clone_model(model)
        Pipeline([("distill", {**FAST, "epochs": 1})], verify=False).run(m, CalibrationSet({"image": x[:128]}))
        outs.append(np.concatenate([v.const_value.numpy().ravel() for v in m.graph.initializers.values() if v.const_value.dtype.is_floating_point()]))
    assert np.array_equal(outs[0], outs[1])


def test_time_limit_stops_training_and_says_so():
    model, x, _ = _sample()
    Pipeline(["fold", ("prune", {"ratio": 0.3})], verify=False).run(model, CalibrationSet({"image": x[:64]}))
    res = Pipeline([("distill", {**FAST, "epochs": 50, "time_limit": 0.5, "val_fraction": 0.0})], verify=False).run(model, CalibrationSet({"image": x[:256]}))
    st = res.steps[-1].report.stats
    assert "wall-clock limit" in st["reason"] and len(st["history"]) < 50


def test_bad_options_and_labels_are_refused():
    model, x, _ = _sample()
    with pytest.raises(BadInputError, match="augment"):
        Pipeline([("distill", {"augment": ["rotate"]})], verify=False).run(model, CalibrationSet({"image": x[:16]}))
    with pytest.raises(BadInputError, match="needs calibration"):
        Pipeline([("distill", {})], verify=False).run(model)


@pytest.fixture
def files(tmp_path):
    model, x, y = _sample()
    Pipeline(["fold"], verify=False).run(model)
    paths = {k: tmp_path / f"{k}.npy" for k in ("xtr", "ytr", "xte", "yte")}
    for k, a in zip(paths, (x[:300], y[:300], x[300:], y[300:])):
        np.save(paths[k], a)
    save_model(model, tmp_path / "teacher.onnx")
    return tmp_path, paths


def test_cli_distills_with_labels_report_and_held_out_eval(cli, files):
    tmp, p = files
    assert cli("prune", tmp / "teacher.onnx", "-o", tmp / "pruned.onnx", "--ratio", "0.4").code == 0
    src_digest = digest(tmp / "pruned.onnx")
    r = cli("distill", tmp / "pruned.onnx", "-o", tmp / "out.onnx", "--teacher", tmp / "teacher.onnx", "--data", p["xtr"],
            "--labels", p["ytr"], "--eval-data", p["xte"], "--eval-labels", p["yte"], "--epochs", "2", "--threads", "2",
            "--report", tmp / "r.json")
    assert r.code == 0, r.err
    assert digest(tmp / "pruned.onnx") == src_digest  # the student file is never overwritten
    rep = json.loads((tmp / "r.json").read_text())
    step = rep["passes"][-1]
    assert step["pass"] == "distill" and step["stats"]["history"]
    assert rep["metric"]["accuracy_after"] >= rep["metric"]["accuracy_before"]  # held out: --eval-data
    out, pruned = load_model(tmp / "out.onnx"), load_model(tmp / "pruned.onnx")
    assert [(n.op_type, n.name) for n in out.graph] == [(n.op_type, n.name) for n in pruned.graph]


def test_cli_refuses_a_student_whose_outputs_do_not_match_the_teacher(cli, files, tmp_path):
    tmp, p = files
    import onnx_ir as ir

    other = load_model(tmp / "teacher.onnx")
    out = other.graph.outputs[0]
    node = ir.node("Flatten", [out], attributes={"axis": 0})  # a [1, N*10] output instead of [N, 10]
    other.graph.append(node)
    node.outputs[0].name = "flat"
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape([1, "M"])
    other.graph.outputs[0] = node.outputs[0]
    save_model(other, tmp / "other.onnx")
    r = cli("distill", tmp / "other.onnx", "-o", tmp / "out.onnx", "--teacher", tmp / "teacher.onnx", "--data", p["xtr"], "--threads", "2")
    assert r.code == 2, r.err
    lines = [ln for ln in r.err.strip().splitlines() if ln.startswith("onnxcc: error")]
    assert len(lines) == 1 and "output" in lines[0]
    assert not (tmp / "out.onnx").exists()


def test_prune_distill_cycles_reach_the_target(cli, files):
    tmp, p = files
    r = cli("prune", tmp / "teacher.onnx", "-o", tmp / "cyc.onnx", "--ratio", "0.5", "--steps", "2", "--distill", p["xtr"],
            "--distill-labels", p["ytr"], "--report", tmp / "r.json")
    assert r.code == 0, r.err
    rep = json.loads((tmp / "r.json").read_text())
    assert [s["pass"] for s in rep["passes"]] == ["fold", "prune", "distill", "prune", "distill"]
    from onnxcc.compiler.analysis import analyze

    ref = analyze(load_model(tmp / "teacher.onnx"), stats=False).params
    assert cli("prune", tmp / "teacher.onnx", "-o", tmp / "once.onnx", "--ratio", "0.5").code == 0
    once = analyze(load_model(tmp / "once.onnx"), stats=False).params
    got = analyze(load_model(tmp / "cyc.onnx"), stats=False).params
    assert abs(got - once) / ref < 0.05  # two cuts of 1 - sqrt(0.5) reach the one-cut width


def test_feature_loss_matches_the_layers_the_cut_changed():
    model, x, _ = _sample()
    res = Pipeline(["fold", ("prune", {"ratio": 0.3}), ("distill", {**FAST, "epochs": 1, "feature_loss": True, "val_fraction": 0.0})], verify=False).run(
        model, CalibrationSet({"image": x[:128]}))
    st = res.steps[-1].report.stats
    # a uniform cut of this ResNet narrows every space (residuals included): no tensor keeps the
    # teacher's shape, so none is matched, and the run must still train on the outputs
    assert st["features"] == [] and not st["kept_input"]
    assert all(h["train_loss"] > 0 for h in st["history"])


def test_an_improvement_inside_the_split_noise_keeps_the_student():
    """The keep-the-input guard compares per-chunk held-out scores, paired: a student already at the
    teacher's level (a QAT start) is replaced only by an epoch that is better beyond the noise."""
    from onnxcc.passes.training.trainer import improves_beyond_noise

    rng = np.random.default_rng(0)
    base = np.stack([rng.uniform(0.5, 1.5, 16) * 1e-3, np.ones(16)], axis=1)  # loss, accuracy per chunk
    noisy = base.copy()
    noisy[:, 0] = base[:, 0] + rng.normal(-2e-5, 5e-4, 16)  # mean gain far below its standard error
    assert not improves_beyond_noise(base, noisy)
    steady = base.copy()
    steady[:, 0] *= 0.8  # the same 20% lower loss on every chunk
    assert improves_beyond_noise(base, steady)
    worse_metric = steady.copy()
    worse_metric[3, 1] = 0.5  # lower loss but a lower accuracy: not an improvement
    assert not improves_beyond_noise(base, worse_metric)
    pruned = np.stack([np.full(16, 2.0), rng.uniform(0.2, 0.6, 16)], axis=1)
    tuned = np.stack([np.full(16, 2.5), rng.uniform(0.8, 1.0, 16)], axis=1)
    assert improves_beyond_noise(pruned, tuned)  # accuracy up on every chunk wins, whatever the loss
    no_metric = np.stack([base[:, 0], np.full(16, np.nan)], axis=1)
    assert improves_beyond_noise(no_metric, np.stack([steady[:, 0], np.full(16, np.nan)], axis=1))
