"""Accuracy recovery on networks trained on real data (scikit-learn digits), under the torch extra.

Marked ``slow`` and ``torch``. Measured (held-out 500 images): ResNet-style 99.6%, pruned at ratio 0.3
(≈50% MACs): L1 alone 37%, with reconstruction 99.6%; MobileNetV2-style 99.4% → 11% / 98.4%.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from compiler.analysis import analyze  # noqa: E402
from compiler.calibration import CalibrationSet  # noqa: E402
from compiler.ir_utils import clone_model, load_model  # noqa: E402
from compiler.pipeline import Pipeline  # noqa: E402
from compiler.verify import run_model  # noqa: E402
from tests.trained import digits, trained  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]


def _accuracy(model, x, y) -> float:
    out = run_model(model, [{"input": x}])
    logits = out[next(iter(out))] if isinstance(out, dict) else out[0]
    return float((logits.argmax(1) == y).mean())


@pytest.mark.parametrize("name, max_drop", [("resnet", 1.0), ("mobilenet_v2", 2.0)])
def test_reconstruction_recovers_accuracy_at_half_the_macs(name, max_drop):
    x_tr, _, _, x_te, y_te = digits()
    path, torch_acc = trained(name)
    model = load_model(path)
    Pipeline(["fold"], verify=False).run(model)
    base = _accuracy(model, x_te, y_te)
    assert base > 0.97 and abs(base - torch_acc) < 0.005
    calib = CalibrationSet({"input": x_tr[:512]})
    acc = {}
    for rec in (False, True):
        m = clone_model(model)
        Pipeline([("prune", {"ratio": 0.3, "reconstruct": rec, "calib_samples": 512})], verify=False).run(m, calib)
        assert analyze(m, stats=False).macs < 0.55 * analyze(model, stats=False).macs
        acc[rec] = _accuracy(m, x_te, y_te)
    assert acc[True] > acc[False] + 0.3, acc
    assert (base - acc[True]) * 100 <= max_drop, (base, acc)
