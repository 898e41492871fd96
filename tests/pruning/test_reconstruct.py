"""Least-squares reconstruction after pruning: exact on a redundant layer, and accuracy recovery on trained nets."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcc.compiler.calibration import CalibrationSet
from onnxcc.compiler.ir_utils import clone_model, const_array
from onnxcc.compiler.pipeline import Pipeline
from onnxcc.compiler.verify import compare_outputs, run_model
from tests.conftest import named_model_from_text as model_from_text


def _redundant_model():
    """conv a → conv b, where a's channel 3 is 0.1 × its channel 1: removing it loses nothing b cannot re-learn."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    w1[3] = 0.1 * w1[1]
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,4,8,8] y) {
        a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w1)
        y = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (a, w2, b2)
    }"""
    return model_from_text(text, w1=w1, w2=rng.normal(size=(4, 6, 3, 3)).astype(np.float32), b2=np.zeros(4, np.float32))


def test_reconstruction_recovers_a_linearly_redundant_channel():
    model = _redundant_model()
    rng = np.random.default_rng(1)
    calib = CalibrationSet({"x": rng.standard_normal((32, 3, 8, 8)).astype(np.float32)})
    test = [{"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)}]
    ref = run_model(model, test)
    sq = {}
    for rec in (False, True):
        m = clone_model(model)
        res = Pipeline([("prune", {"ratio": 0.2, "reconstruct": rec, "compensate": False})], verify=False).run(m, calib)
        assert const_array(next(n for n in m.graph if n.name == "a").inputs[1]).shape[0] == 5
        sq[rec] = compare_outputs(ref, run_model(m, test)).min_sqnr
        if rec:
            assert res.steps[0].report.stats["reconstructed"]["y"]["residual_after"] < res.steps[0].report.stats["reconstructed"]["y"]["residual_before"]
    assert sq[True] > 45 and sq[False] < 30, sq  # ridge 1e-3 keeps it from being exact (measured 55 dB vs 25 dB)


def test_reconstruction_needs_calibration(folded):
    from onnxcc.compiler.errors import BadInputError

    with pytest.raises(BadInputError, match="calibration"):
        Pipeline([("prune", {"reconstruct": True})]).run(folded("resnet"))


def test_reconstruction_on_every_family_reduces_error(folded):
    """On random-weight builders the metric is agreement: reconstruction must not make a layer's fit worse."""
    for family in ("vgg", "resnet_bottleneck", "mobilenet_v3", "densenet", "inception"):
        model = folded(family)
        hw = model.graph.inputs[0].shape[2]
        calib = CalibrationSet({"input": np.random.default_rng(0).standard_normal((32, 3, hw, hw)).astype(np.float32)})
        res = Pipeline([("prune", {"ratio": 0.3, "reconstruct": True})], verify=False).run(model, calib)
        rec = res.steps[0].report.stats["reconstructed"]
        assert rec, family
        assert all(v["residual_after"] <= v["residual_before"] for v in rec.values())


def test_prune_cli_reconstruct(cli, tmp_path, resnet_path):
    calib = tmp_path / "c.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "p.onnx"
    r = cli("prune", resnet_path, "-o", out, "--ratio", "0.3", "--reconstruct", "--calib", calib)
    assert r.code == 0, r.err
    r = cli("prune", resnet_path, "-o", tmp_path / "q.onnx", "--reconstruct")
    assert r.code == 2 and "calibration" in r.err and not (tmp_path / "q.onnx").exists()


def test_reconstruction_criterion_removes_the_channel_others_can_replace():
    """Channel 3 = 2 × channel 1: either can be rebuilt from the other. `reconstruction` removes one of the pair
    (losslessly after the refit); l1 removes the smallest filter, which nothing can replace."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    w1[3] = 2.0 * w1[1]
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,4,8,8] y) {
        a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w1)
        r = Relu (a)
        y = Conv <kernel_shape=[1,1]> (r, w2, b2)
    }"""
    model = model_from_text(text, w1=w1, w2=rng.normal(size=(4, 6, 1, 1)).astype(np.float32), b2=np.zeros(4, np.float32))
    calib = CalibrationSet({"x": rng.standard_normal((32, 3, 8, 8)).astype(np.float32)})
    test = [{"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)}]
    ref = run_model(model, test)
    kept_rows, sq = {}, {}
    for crit in ("l1", "reconstruction"):
        m = clone_model(model)
        Pipeline([("prune", {"ratio": 1 / 6, "criterion": crit, "reconstruct": True})], verify=False).run(m, calib)
        w = const_array(next(n for n in m.graph if n.name == "a").inputs[1])
        kept_rows[crit] = [i for i in range(6) if any(np.allclose(w1[i], row, atol=1e-6) for row in w)]
        sq[crit] = compare_outputs(ref, run_model(m, test)).min_sqnr
    assert {1, 3} <= set(kept_rows["l1"]) and len({1, 3} & set(kept_rows["reconstruction"])) == 1
    assert sq["reconstruction"] > 40 > sq["l1"], sq


def test_reconstruction_criterion_on_a_family(folded):
    model = folded("resnet_bottleneck")
    calib = CalibrationSet({"input": np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)})
    res = Pipeline([("prune", {"ratio": 0.3, "criterion": "reconstruction", "reconstruct": True, "calib_samples": 16})], verify_samples=8).run(model, calib)
    assert res.steps[0].report.stats["groups_removed"] > 0
