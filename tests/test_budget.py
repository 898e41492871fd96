"""One accuracy budget through every command: it drives each lossy pass that can trade accuracy
(mixed precision, prune ratios, factorization ranks, sparsity, codebook bits), fails only when no
setting fits, names the pass with the best figure reached, and is measured on one set of samples
(stated in the report) by the metric the user chose (top-k, or ``--metric module:function``).

On the bundled *trained* sample (models/make_sample.py): its held-out digits and labels make the
accuracy figures real, with no torch needed.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from onnxcc.compiler.api import compile_model
from onnxcc.compiler.errors import BadInputError, BudgetError
from onnxcc.compiler.ir_utils import load_model
from onnxcc.compiler.passbase import OnnxccPass, PassReport
from onnxcc.compiler.registry import register, unregister
from onnxcc.compiler.sessions import run_model
from onnxcc.compiler.verify import load_metric

SAMPLE, CALIB, EVAL, LABELS = ("models/sample_resnet.onnx", "models/sample_calib.npy", "models/sample_eval.npy",
                               "models/sample_labels.npy")


def accuracy(path, n: int = 400) -> float:
    x, y = np.load(EVAL)[:n], np.load(LABELS)[:n]
    out = run_model(load_model(path), [{"image": x[i:i + 100]} for i in range(0, n, 100)])["logits"]
    return float(np.mean(out.argmax(1) == y))


def run(cli, tmp_path, *args, budget="1"):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    r = cli("compile", SAMPLE, "-o", out, "--calib", CALIB, "--data", EVAL, "--labels", LABELS, "--budget", budget,
            "--report", rep, "--no-latency", *args)
    return r, out, (json.loads(rep.read_text()) if rep.exists() else None)


def test_the_sample_is_trained_and_its_data_is_held_out():
    assert accuracy(SAMPLE) >= 0.95
    assert np.load(CALIB).shape == (100, 1, 32, 32) and np.load(EVAL).shape == (400, 1, 32, 32)


def test_int8_recipe_under_a_budget_holds_it_on_held_out_labels_and_keeps_int8(cli, tmp_path):
    r, out, rep = run(cli, tmp_path, "--recipe", "int8-x86")
    assert r.code == 0, r.err
    assert rep["verification"] == {"samples": 400, "source": "data", "metric": "top1"}
    assert rep["metric"]["accuracy_before"] == pytest.approx(accuracy(SAMPLE))
    assert rep["metric"]["drop_points"] <= 1.0
    assert accuracy(out) >= accuracy(SAMPLE) - 0.01  # recomputed here, on the written model
    q = rep["passes"][-1]
    if q["modified"]:  # unless the speed guard measured INT8 slower here: then it says so
        assert q["stats"]["quantized_layers"] > 10


def test_prune_ratio_is_weakened_until_the_budget_fits(cli, tmp_path):
    r, out, rep = run(cli, tmp_path, "--prune", "0.95")
    assert r.code == 0, r.err
    prune = next(p for p in rep["passes"] if p["pass"] == "prune")
    search = prune["stats"]["budget_search"]
    assert search["tries"][0] == {"strength": 1.0, "drop": search["tries"][0]["drop"], "fits": False}
    assert 0 < search["strength"] < 1 and prune["config"]["ratio"] == pytest.approx(0.95 * search["strength"])
    assert any(s["layer"] == "budget" and "weakened" in s["reason"] for s in prune["skipped"])
    assert rep["metric"]["drop_points"] <= 1.0 and accuracy(out) >= accuracy(SAMPLE) - 0.01
    assert rep["after"]["macs"] < rep["before"]["macs"]


@pytest.mark.parametrize("flags, option", [
    (("--sparsify", "0.97"), "sparsity"),
    (("--codebook", "2"), "bits"),
    (("--factorize", "svd:0.05"), "rank"),
])
def test_every_lossy_knob_is_driven_by_the_budget(cli, tmp_path, flags, option):
    r, out, rep = run(cli, tmp_path, *flags)
    assert r.code == 0, r.err
    step = next(p for p in rep["passes"] if not p["exact"])
    assert rep["metric"]["drop_points"] <= 1.0
    if "budget_search" in step["stats"]:  # the setting as asked broke the budget: weakened
        asked = step["stats"]["budget_search"]["asked"][option]
        got = step["config"][option]
        assert (got > asked) if option in ("bits", "rank") else (got < asked)


def test_two_lossy_passes_share_the_budget(cli, tmp_path):
    r, out, rep = run(cli, tmp_path, "--prune", "0.95", "--quantize", "minmax", budget="2")
    assert r.code == 0, r.err
    prune = next(p for p in rep["passes"] if p["pass"] == "prune")
    assert prune["stats"]["budget_search"]["budget_points"] == pytest.approx(1.0)  # half, cumulative
    assert prune["verify_vs_original"]["metric_drop"] <= 1.0 and rep["metric"]["drop_points"] <= 2.0
    q = next(p for p in rep["passes"] if p["pass"] == "quantize")
    assert q["config"]["max_drop"] is not None and q["config"]["eval_samples"] == 400


def test_python_api_and_cli_verify_on_the_same_samples(tmp_path):
    res = compile_model(SAMPLE, "int8-x86", calibration=CALIB, budget=1.0, measure_latency=False)
    assert res.report["verification"]["samples"] == 64 and res.report["verification"]["source"] == "calibration"
    res = compile_model(SAMPLE, [("fold", {})], calibration=CALIB, measure_latency=False)
    assert res.report["verification"]["samples"] == 8


@dataclasses.dataclass(frozen=True)
class _Cfg:
    factor: float = -1.0


class _AlwaysBreaks(OnnxccPass):
    """Lossy test pass whose every setting breaks the model (negated weights, however mild)."""

    name = "test-always-breaks"
    exact = False
    Config = _Cfg

    @classmethod
    def milder(cls, config, strength):
        return dataclasses.replace(config, factor=-strength)

    def call(self, model):
        import onnx_ir as ir

        conv = next(n for n in model.graph if n.op_type == "Conv")
        w = conv.inputs[1]
        w.const_value = ir.tensor(w.const_value.numpy() * self.config.factor, name=w.name)
        return PassReport(model, True, changed=[conv.name])


@pytest.fixture
def breaks():
    register(_AlwaysBreaks)
    yield
    unregister("test-always-breaks")


def test_no_setting_fits_fails_naming_the_pass_and_the_best_figure(cli, tmp_path, breaks):
    r, out, rep = run(cli, tmp_path, "--pass", "test-always-breaks")
    assert r.code == 1 and not out.exists()
    assert "pass 'test-always-breaks': no setting fits the budget" in r.err and "at 1/16 of the change" in r.err
    assert rep["status"] == "failed" and rep["failed_pass"] == "test-always-breaks"
    with pytest.raises(BudgetError, match="no setting fits"):
        compile_model(SAMPLE, ["fold", "test-always-breaks"], calibration=CALIB, budget=1.0, measure_latency=False)


def test_every_float_layer_says_why(cli, tmp_path):
    rep = tmp_path / "q.json"
    r = cli("quantize", SAMPLE, "-o", tmp_path / "q.onnx", "--calib", CALIB, "--exclude", "*fc*", "--report", rep)
    assert r.code == 0, r.err
    skipped = json.loads(rep.read_text())["passes"][-1]["skipped"]
    fc = [s for s in skipped if "fc" in s["layer"].lower() or "gemm" in s["layer"].lower()]
    assert fc and all("exclude pattern '*fc*' you gave" in s["reason"] for s in fc), skipped
    assert not any("excluded by pattern" in s["reason"] for s in skipped)


def test_budget_float_layers_are_reported_as_the_budget_s(folded_budget_report):
    skipped = folded_budget_report["passes"][-1]["skipped"]
    mp = folded_budget_report["passes"][-1]["stats"]["mixed_precision"]
    reasons = {s["layer"]: s["reason"] for s in skipped}
    assert all("accuracy budget" in reasons[name] for name in mp["float_layers"])
    assert not any("pattern" in r for r in reasons.values())


@pytest.fixture
def folded_budget_report(cli, tmp_path):
    rep = tmp_path / "b.json"
    # budget 0 on the calibration samples, first top-1 agreement: some layers must go back to float
    r = cli("quantize", SAMPLE, "-o", tmp_path / "b.onnx", "--calib", CALIB, "--budget", "0", "--weight-rounding", "nearest",
            "--report", rep)
    assert r.code == 0, r.err
    return json.loads(rep.read_text())


# --------------------------------------------------------------------------- user metrics
def test_a_metric_from_a_file_is_what_the_budget_measures(cli, tmp_path):
    f = tmp_path / "my_metric.py"
    f.write_text("import numpy as np\n\ndef top2(outputs, labels):\n"
                 "    top = np.argsort(-outputs['logits'], 1)[:, :2]\n"
                 "    return float(np.mean((top == np.asarray(labels)[:, None]).any(1)))\n")
    r, out, rep = run(cli, tmp_path, "--quantize", "minmax", "--metric", f"{f}:top2")
    assert r.code == 0, r.err
    x, y = np.load(EVAL), np.load(LABELS)
    top = np.argsort(-run_model(load_model(SAMPLE), [{"image": x}])["logits"], 1)[:, :2]
    assert rep["metric"]["accuracy_before"] == pytest.approx(float(np.mean((top == y[:, None]).any(1))))
    assert rep["metric"]["name"] == f"{f}:top2" and rep["verification"]["metric"] == f"{f}:top2"


@pytest.mark.parametrize("body, err", [
    ("def m(outputs, labels):\n    return float('nan')\n", "must return a finite number"),
    ("def m(outputs, labels):\n    raise KeyError('boxes')\n", "metric .*:m failed: KeyError"),
    ("x = 1\n", "has no function m"),
    ("import not_a_module_anywhere\n", "cannot import"),
])
def test_a_broken_metric_is_bad_input_in_one_line(cli, tmp_path, body, err):
    import re

    f = tmp_path / "bad_metric.py"
    f.write_text(body)
    r, out, _ = run(cli, tmp_path, "--quantize", "minmax", "--metric", f"{f}:m")
    assert r.code == 2 and re.search(err, r.err) and len(r.err.strip().splitlines()) == 1, r.err
    assert not out.exists()


def test_metric_spec_forms():
    assert load_metric("top5").top_k == 5
    assert load_metric("tests.user_metrics:captcha_char_accuracy").fn.__name__ == "captcha_char_accuracy"
    with pytest.raises(BadInputError, match="expected top1, top5 or module:function"):
        load_metric("accuracy")


@pytest.mark.parametrize("cmd", [
    ["fold"], ["prune", "--ratio", "0.3"], ["quantize", "--calib", CALIB, "--weight-rounding", "nearest"],
    ["quantize", "--fp16"], ["factorize", "--method", "svd"], ["sparsify", "--sparsity", "0.5"], ["codebook"],
    ["compile", "--recipe", "lossless"],
])
def test_every_command_reports_the_same_before_after_keys(cli, tmp_path, cmd):
    rep = tmp_path / "r.json"
    r = cli(cmd[0], SAMPLE, "-o", tmp_path / "o.onnx", *cmd[1:], "--report", rep)
    assert r.code == 0, r.err
    data = json.loads(rep.read_text())
    keys = {"params", "macs", "nodes", "op_counts", "file_bytes", "latency_ms"}
    assert set(data["before"]) == set(data["after"]) == keys
    assert (data["before"]["latency_ms"] is None) == (cmd[0] != "compile")
    assert data["verification"]["samples"] >= 8 and data["metric"]["samples"] == data["verification"]["samples"]
