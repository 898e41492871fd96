"""Distillation on networks trained on real data (scikit-learn digits: 1,197 training images, 500
held out, never trained on), as deployed by onnxruntime. Issue #20's targets: ≤ 1 point below fp32
at 25% of the MACs, ternary within 2 points and binary within 5 after training, codebook 4 bit +
60% sparsity within 1 point after distillation. Marked slow."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from onnxcc.compiler.analysis import analyze  # noqa: E402
from onnxcc.compiler.calibration import CalibrationSet  # noqa: E402
from onnxcc.compiler.ir_utils import clone_model, load_model  # noqa: E402
from onnxcc.compiler.pipeline import Pipeline  # noqa: E402
from onnxcc.compiler.verify import run_model  # noqa: E402
from tests.trained import digits, trained  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("labels") / "y.npy"
    np.save(p, digits()[1])
    return str(p)


def _acc(model) -> float:
    _, _, _, x_te, y_te = digits()
    out = run_model(model, [{"input": x_te}], optimize=True)
    return float((next(iter(out.values())).argmax(1) == y_te).mean())


def _run(name, specs, labels_file, epochs):
    x_tr = digits()[0]
    model = load_model(trained(name)[0])
    Pipeline(["fold"], verify=False).run(model)
    fp32 = clone_model(model)
    distill = {"epochs": epochs, "threads": 2, "labels": labels_file, "patience": 0, "val_fraction": 0.0}
    Pipeline([*specs, ("distill", distill)], verify=False).run(model, CalibrationSet({"input": x_tr}))
    return fp32, model


def test_quarter_of_the_macs_within_a_point_of_fp32(labels_file):
    """Least-squares refit after the cut, then 3 epochs (measured 99.6% -> 99.6% at 0.251x MACs)."""
    fp32, model = _run("resnet", [("prune", {"ratio": 0.5, "reconstruct": True, "calib_samples": 256})], labels_file, 3)
    assert analyze(model, stats=False).macs / analyze(fp32, stats=False).macs <= 0.26
    assert _acc(model) >= _acc(fp32) - 0.01


@pytest.mark.parametrize("kind, points", [("ternary", 2.0), ("binary", 5.0)])
def test_binary_and_ternary_weights_train_back(labels_file, kind, points):
    """Measured on the ResNet: ternary 76.0% -> 99.6%, binary 17.0% -> 99.4% (fp32 99.6%)."""
    fp32, model = _run("resnet", [("weight-only", {"dtype": kind})], labels_file, 5)
    codes = [v.const_value.numpy() for k, v in model.graph.initializers.items() if k.endswith(f"_{kind}")]
    assert codes and all(set(np.unique(c.astype(np.int8)).tolist()) <= {-1, 0, 1} for c in codes)  # still the projection
    assert _acc(model) >= _acc(fp32) - points / 100


def test_codebook_and_sparsity_within_a_point_after_distillation(labels_file):
    fp32, model = _run("mobilenet_v2", [("sparsify", {"sparsity": 0.6}), ("codebook", {"bits": 4})], labels_file, 5)
    gathers = [n for n in model.graph if n.op_type == "Gather"]
    assert gathers  # the codebook graph is kept: indices fixed, levels trained
    assert _acc(model) >= _acc(fp32) - 0.01
