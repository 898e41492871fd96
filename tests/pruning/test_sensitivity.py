"""Sensitivity analysis, automatic per-space ratios for a MACs/parameter target, progressive pruning."""

from __future__ import annotations

import json

import numpy as np
import pytest

from onnxcc.compiler.analysis import analyze
from onnxcc.compiler.calibration import CalibrationSet
from onnxcc.compiler.ir_utils import clone_model
from onnxcc.compiler.pipeline import Pipeline
from onnxcc.passes.pruning import sensitivity as S


def _calib(model, n=32):
    hw = model.graph.inputs[0].shape[2]
    return CalibrationSet({"input": np.random.default_rng(0).standard_normal((n, 3, hw, hw)).astype(np.float32)})


def test_sensitivity_curves_cover_every_prunable_space(folded):
    model = folded("resnet")
    ref = clone_model(model)
    sens = S.analyse(model, _calib(model), ratios=(0.25, 0.5), samples=16)
    assert len(sens.curves) == 12  # every prunable space of the tiny ResNet (the head is blocked)
    for c in sens.curves:
        assert c.macs_saved[1] > c.macs_saved[0] > 0
        assert all(np.isfinite(c.loss))
    # the model itself is untouched
    assert analyze(model, stats=False).macs == analyze(ref, stats=False).macs
    assert "loss@0.25" in sens.table()


def test_allocate_reaches_the_summed_target_greedily():
    curves = [
        S.SpaceCurve(0, "a", ["a"], 8, [0.25, 0.5], [1.0, 10.0], [100, 200], [1, 2]),
        S.SpaceCurve(1, "b", ["b"], 8, [0.25, 0.5], [0.1, 0.2], [100, 200], [1, 2]),
    ]
    sens = S.Sensitivity(1000, 10, "x", curves, 0.0)
    assert S.allocate(sens, 0.8) == {"b": 0.5}  # cheapest loss per MAC first
    assert S.allocate(sens, 0.7) == {"b": 0.5, "a": 0.25}


@pytest.mark.parametrize("resource, target", [("macs", 0.5), ("params", 0.6)])
def test_target_is_met_with_automatic_ratios(folded, resource, target):
    model = folded("resnet_bottleneck")
    base = analyze(model, stats=False)
    opts = {f"target_{resource}": target, "reconstruct": True, "calib_samples": 16, "sensitivity_ratios": (0.25, 0.5, 0.75)}
    res = Pipeline([("prune", opts)], verify_samples=8).run(model, _calib(model))
    after = analyze(model, stats=False)
    got = getattr(after, resource) / getattr(base, resource)
    assert got <= target * 1.005, got
    assert got > target * 0.8  # not wildly over-pruned
    ratios = res.steps[0].report.stats["steps"][0]["ratios"]
    prunable = res.steps[0].report.stats["prunable_spaces"]
    assert len(ratios) < prunable or len(set(ratios.values())) > 1  # not uniform: the allocation follows the curves


def test_progressive_steps_reach_the_same_ratio(folded):
    model = folded("vgg")
    one = clone_model(model)
    Pipeline([("prune", {"ratio": 0.5})], verify=False).run(one)
    res = Pipeline([("prune", {"ratio": 0.5, "steps": 3})], verify=False).run(model)
    assert len(res.steps[0].report.stats["steps"]) == 3
    assert abs(analyze(model, stats=False).macs / analyze(one, stats=False).macs - 1) < 0.15


def test_sensitivity_cli_json_and_plot(cli, tmp_path, resnet_path):
    calib = tmp_path / "c.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    r = cli("sensitivity", resnet_path, "--calib", calib, "--ratios", "0.3,0.6", "--samples", "8", "--json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert data["spaces"] and all(len(s["loss"]) == 2 for s in data["spaces"])
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    r = cli("sensitivity", resnet_path, "--calib", calib, "--ratios", "0.5", "--samples", "8", "--plot", png)
    assert r.code == 0 and png.stat().st_size > 1000


def test_prune_cli_target_macs_and_budget(cli, tmp_path, resnet_path):
    calib = tmp_path / "c.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "p.onnx"
    # random weights: any cut flips predictions, so a 0-point budget must fail and write nothing
    r = cli("prune", resnet_path, "-o", out, "--target-macs", "0.6", "--calib", calib, "--samples", "16", "--budget", "0")
    assert r.code == 1 and "budget" in r.err and not out.exists()
    r = cli("prune", resnet_path, "-o", out, "--target-macs", "0.6", "--calib", calib, "--samples", "16", "--budget", "0", "--force")
    assert r.code == 0 and out.exists()


def test_target_latency_steps_until_the_measured_latency_is_met(folded, monkeypatch):
    """The allocation loop for --target-latency, with latency replaced by a deterministic stand-in (MACs)."""
    import onnxcc.passes.pruning.auto as P

    monkeypatch.setattr(P, "measured_latency_ms", lambda m: analyze(m, stats=False).macs / 1e6 + 0.05)
    model = folded("resnet_bottleneck")
    base = P.measured_latency_ms(model)
    opts = {"target_latency": 0.6, "calib_samples": 8, "sensitivity_ratios": (0.25, 0.5, 0.75)}
    res = Pipeline([("prune", opts)], verify=False).run(model, _calib(model))
    assert P.measured_latency_ms(model) <= 0.6 * base * 1.02
    assert res.steps[0].report.stats["latency_ratio"] <= 0.6 * 1.02


def test_only_one_target_at_a_time():
    from onnxcc.compiler.errors import BadInputError

    with pytest.raises(BadInputError, match="one of"):
        Pipeline([("prune", {"target_macs": 0.5, "target_latency": 0.5})])
