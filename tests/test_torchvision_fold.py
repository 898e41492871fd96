"""Fold on torchvision's own architectures, as both torch exporters write them (issue #17 §5).

onnxsim and onnxslim reach the node counts below only with the input shape fixed; fold must reach
them with the batch left dynamic, and change no output (onnxruntime, exact check). The counts are
the smaller of onnxsim's and onnxslim's on the same exports (benchmarks/fold_vs_onnxsim.py
--torchvision). Random weights: torchvision is not asked for any download."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from onnxcc.compiler.ir_utils import load_model  # noqa: E402
from onnxcc.compiler.pipeline import Pipeline  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]

# (model, exporter, onnxsim/onnxslim's smallest count with a fixed shape)
CASES = [
    ("shufflenet_v2", "legacy", 186),   # channel shuffle: shape chains on a batch renamed by Reshape(-1)
    ("shufflenet_v2", "dynamo", 362),
    ("mobilenet_v3_large", "legacy", 140),
    ("lraspp_mobilenet_v3", "legacy", 146),  # Resize to Shape(x)[0:2] ++ [H, W]
    ("deeplabv3_mobilenet_v3", "legacy", 154),
    ("ssdlite320", "legacy", 229),  # the 1x1 level's head Transposes move no data
    ("ssdlite320", "dynamo", 469),
    ("convnext_tiny", "legacy", 259),  # zero Linear biases
    ("convnext_tiny", "dynamo", 186),  # as_strided after the pool: Gather of the flattened tensor in order
]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.mark.parametrize("name, exporter, peer", CASES, ids=[f"{n}-{e}" for n, e, _ in CASES])
def test_fold_is_as_small_as_onnxsim_with_the_batch_dynamic(tmp_path, name, exporter, peer):
    from tests import torchvision_zoo as TZ

    model = load_model(TZ.export(name, tmp_path / "m.onnx", dynamo=exporter == "dynamo"))
    res = Pipeline(["fold"], verify=True).run(model)  # raises if any output moved beyond float noise
    nodes = sum(1 for _ in model.graph.all_nodes())
    assert nodes <= peer, (nodes, res.steps[-1].report.stats.get("removed_by_op"))
    assert not isinstance(model.graph.inputs[0].shape[0], int)
    assert all(not isinstance(o.shape[0], int) for o in model.graph.outputs)  # the batch stays dynamic


@pytest.mark.parametrize("name", ["shufflenet_v2", "ssdlite320"])
def test_int8_of_a_dynamo_export_is_at_most_027_of_the_folded_fp32(tmp_path, name):
    """The dynamo exporter annotates every node with its stack trace, fx node and module path (about
    1.4 kB a node); they made its INT8 files 0.282 (ShuffleNetV2) and 0.286 (SSDlite) of the folded
    fp32 file. Fold drops them: measured 0.264 and 0.269, like the legacy exports (0.263, 0.268)."""
    import numpy as np

    from onnxcc.compiler.calibration import CalibrationSet, input_specs
    from onnxcc.compiler.ir_utils import save_model
    from tests import torchvision_zoo as TZ

    model = load_model(TZ.export(name, tmp_path / "m.onnx", dynamo=True))
    Pipeline(["fold"], verify=False).run(model)
    save_model(model, tmp_path / "f.onnx")
    spec = input_specs(model)[0]
    calib = CalibrationSet({spec.name: np.random.default_rng(0).standard_normal((8,) + tuple(spec.concrete(1))[1:]).astype(np.float32)})
    res = Pipeline([("quantize", {"force_int8": True, "weight_rounding": "nearest"})], verify=False).run(model, calib)
    save_model(model, tmp_path / "q.onnx")
    assert (tmp_path / "q.onnx").stat().st_size <= 0.27 * (tmp_path / "f.onnx").stat().st_size
    assert (tmp_path / "q.onnx").stat().st_size <= 0.25 * (tmp_path / "m.onnx").stat().st_size
    assert res.steps[0].report.stats["fusion"]["float_heavy"] == []
    assert not any(k.startswith("pkg.torch.") for n in model.graph for k in n.metadata_props)
