"""Pruning real exported graphs: every torch zoo network, legacy and dynamo exporters.

Marked ``slow`` and ``torch`` (CI runs them; skipped only without torch).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from onnxcc.compiler.analysis import analyze  # noqa: E402
from onnxcc.compiler.ir_utils import clone_model, load_model  # noqa: E402
from onnxcc.compiler.pipeline import Pipeline  # noqa: E402
from tests import torch_zoo as Z  # noqa: E402
from tests.pruning.test_prune import check_same_outputs  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]
EXPORTERS = pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])


def _export(tmp_path, name, dynamo, masks=None):
    module, hw = Z.make(name)
    zeroed = Z.apply_structured_masks(module, 0.3, mask_bn=masks == "conv+bn") if masks else 0
    path = Z.export(module, hw, tmp_path / f"{name}.onnx", dynamo=dynamo, optimize=False)
    model = load_model(path)
    Pipeline(["fold"], verify=False).run(model)
    return model, zeroed


@EXPORTERS
@pytest.mark.parametrize("name", list(Z.ZOO))
def test_prune_half_on_exported_networks(tmp_path, name, dynamo):
    model, _ = _export(tmp_path, name, dynamo)
    ref = clone_model(model)
    res = Pipeline([("prune", {"ratio": 0.5})], verify_samples=4).run(model)
    check_same_outputs(ref, model, exact=False)
    ratio = analyze(model, stats=False).macs / analyze(ref, stats=False).macs
    assert ratio < 0.4, ratio
    stats = res.steps[0].report.stats
    assert stats["prunable_spaces"] >= 3
    assert all(sp.get("blocker") for sp in stats["spaces"] if sp["status"] == "blocked")


@EXPORTERS
@pytest.mark.parametrize("name", list(Z.ZOO))
def test_torch_masks_removed_losslessly(tmp_path, name, dynamo):
    """Filters zeroed in torch (with their BatchNorm channels) are removed exactly by criterion=zero."""
    model, zeroed = _export(tmp_path, name, dynamo, masks="conv+bn")
    assert zeroed > 0
    ref = clone_model(model)
    res = Pipeline([("prune", {"criterion": "zero"})], verify_samples=4).run(model)  # exactness enforced
    check_same_outputs(ref, model, exact=True)
    assert res.steps[0].report.stats["groups_removed"] > 0
    assert analyze(model, stats=False).macs < 0.95 * analyze(ref, stats=False).macs


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2", "efficientnet", "convnext"])
def test_torch_conv_only_masks_constant_channels_are_exact(tmp_path, name):
    """Masks on conv filters only: BatchNorm turns the dead channels into nonzero constants, folded into the next bias."""
    model, _ = _export(tmp_path, name, False, masks="conv")
    ref = clone_model(model)
    res = Pipeline([("prune", {"criterion": "zero"})], verify_samples=4).run(model)
    check_same_outputs(ref, model, exact=True)
    assert res.steps[0].report.stats["groups_removed"] > 0
