"""INT8 on networks trained on real data (scikit-learn digits): accuracy, SQNR, every layer integer.

Marked ``slow`` and ``torch``. Measured (500 held-out images, 64 calibration images, equalization and
bias correction): ResNet-style 99.6% → 99.6% at 44.7 dB, MobileNetV2-style 99.4% → 99.2% at 38.4 dB,
MobileNetV3-style (Hardswish, squeeze-excite, 5×5 depthwise) 99.0% → 99.0% at 33.3 dB.
Issue #5's target is a top-1 drop of at most 0.5 points.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from compiler.calibration import CalibrationSet  # noqa: E402
from compiler.ir_utils import clone_model, load_model  # noqa: E402
from compiler.pipeline import Pipeline  # noqa: E402
from compiler.verify import compare_outputs, run_model  # noqa: E402
from tests.trained import digits, trained  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.mark.parametrize("name, min_sqnr", [("resnet", 40.0), ("mobilenet_v2", 34.0), ("mobilenet_v3", 30.0)])
def test_int8_keeps_trained_accuracy_within_half_a_point(name, min_sqnr):
    x_tr, _, _, x_te, y_te = digits()
    model = load_model(trained(name)[0])
    Pipeline(["fold"], verify=False).run(model)
    fp32 = clone_model(model)
    res = Pipeline(["equalize", ("quantize", {"bias_correction": True})], verify=False).run(model, CalibrationSet({"input": x_tr[:64]}))
    fusion = res.steps[-1].report.stats["fusion"]
    assert fusion["float_heavy"] == [] and fusion["dequantize_linear"] == 0  # integer from input to logits
    ref, out = run_model(fp32, [{"input": x_te}]), run_model(model, [{"input": x_te}])
    acc32 = float((next(iter(ref.values())).argmax(1) == y_te).mean())
    acc8 = float((next(iter(out.values())).argmax(1) == y_te).mean())
    assert acc32 > 0.97
    assert acc32 - acc8 <= 0.005, (acc32, acc8)
    assert compare_outputs(ref, out).min_sqnr > min_sqnr
    assert np.isfinite(next(iter(out.values()))).all()
