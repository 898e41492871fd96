"""Models the passes cannot meaningfully handle are refused with a one-line reason, and nothing is written."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcc.compiler.ir_utils import const_array, save_model
from onnxcc.models.builders import build
from tests.conftest import digest


@pytest.fixture
def nan_model(tmp_path):
    m = build("resnet", "tiny", seed=1)
    conv = [n for n in m.graph if n.op_type == "Conv"][3]
    w = const_array(conv.inputs[1]).copy()
    w[0, 0, 0, 0] = np.nan
    conv.inputs[1].const_value = ir.tensor(w)
    p = tmp_path / "nan.onnx"
    save_model(m, p)
    return p, conv.name


@pytest.mark.parametrize(
    "args",
    [["fold"], ["prune", "--ratio", "0.5"], ["prune", "--criterion", "zero"], ["quantize", "--weight-only", "int8"], ["quantize", "--calib", "{calib}"]],
    ids=["fold", "prune", "prune-zero", "weight-only", "quantize"],
)
def test_nan_weights_are_refused_naming_the_layer(cli, tmp_path, nan_model, args):
    path, layer = nan_model
    calib = tmp_path / "c.npy"
    np.save(calib, np.zeros((4, 3, 32, 32), np.float32))
    before = digest(path)
    out = tmp_path / "out.onnx"
    r = cli(args[0], path, "-o", out, *[a.replace("{calib}", str(calib)) for a in args[1:]])
    assert r.code == 2
    assert f"layer {layer} contains NaN/Inf" in r.err and len(r.err.strip().splitlines()) == 1
    assert digest(path) == before and not out.exists()
    assert not list(tmp_path.glob(".onnxcc-*"))


def test_prune_on_an_already_quantized_model_changes_nothing_and_says_why(cli, tmp_path, resnet_path):
    calib = tmp_path / "c.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    q = tmp_path / "q.onnx"
    assert cli("quantize", resnet_path, "-o", q, "--calib", calib).code == 0
    out = tmp_path / "p.onnx"
    r = cli("prune", q, "-o", out, "--ratio", "0.5")
    assert r.code == 0, r.err
    assert "weight is not a constant" in r.out or "skipped" in r.out
    from onnxcc.compiler.analysis import analyze
    from onnxcc.compiler.ir_utils import load_model

    assert analyze(load_model(out), stats=False).macs == analyze(load_model(q), stats=False).macs


def test_quantize_refuses_an_already_quantized_model(cli, tmp_path, resnet_path):
    calib = tmp_path / "c.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32))
    q = tmp_path / "q.onnx"
    assert cli("quantize", resnet_path, "-o", q, "--calib", calib).code == 0
    r = cli("quantize", q, "-o", tmp_path / "qq.onnx", "--calib", calib)
    assert r.code == 2 and "already quantized" in r.err and not (tmp_path / "qq.onnx").exists()
