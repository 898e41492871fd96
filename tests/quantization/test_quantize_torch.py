"""INT8 on real exported graphs: every torch zoo network, legacy and dynamo exporters.

Marked ``slow`` and ``torch`` (CI runs them; skipped only without torch).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from onnxcc.compiler.calibration import CalibrationSet  # noqa: E402
from onnxcc.compiler.ir_utils import load_model  # noqa: E402
from onnxcc.compiler.pipeline import Pipeline  # noqa: E402
from tests import torch_zoo as Z  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]

# Float ops onnxruntime has no integer kernel for, left between Q/DQ pairs (reported, not fused):
# LayerNorm/Gelu (ConvNeXt). HardSwish/HardSigmoid are decomposed, pre-activation BatchNorm becomes a
# depthwise 1×1 conv.
FLOAT_ISLANDS = {"convnext"}


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", list(Z.ZOO))
def test_quantize_exported_networks(tmp_path, name, dynamo):
    module, hw = Z.make(name)
    model = load_model(Z.export(module, hw, tmp_path / f"{name}.onnx", dynamo=dynamo, optimize=False))
    calib = CalibrationSet({"input": np.random.default_rng(0).standard_normal((32, 3, hw, hw)).astype(np.float32)})
    res = Pipeline(["fold", ("quantize", {"force_int8": True})], verify_samples=16).run(model, calib)  # placement, whatever the speed
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    step = res.steps[1]
    fusion = step.report.stats["fusion"]
    assert fusion["float_heavy"] == []  # every Conv / Gemm / MatMul runs as an integer kernel
    if name not in FLOAT_ISLANDS:
        assert fusion["dequantize_linear"] == 0 and fusion["quantize_linear"] == 1  # only the input
    assert step.vs_original.min_sqnr > 30.0, step.vs_original.to_json()  # measured 34-48 dB
    # random weights give near-tied logits: one flip in the 16 samples is 0.06 of agreement
    # (7-bit weights by default: ResNet-50 legacy measured 42.8 dB with 3 flips)
    assert step.vs_original.top1 >= 0.75


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["vgg", "convnext"])
def test_dynamic_quantization_of_exported_heads(tmp_path, name, dynamo):
    """Linear layers (Gemm from the legacy exporter, MatMul+Add from dynamo) become DynamicQuantizeMatMul."""
    module, hw = Z.make(name)
    model = load_model(Z.export(module, hw, tmp_path / f"{name}.onnx", dynamo=dynamo, optimize=False))
    res = Pipeline(["fold", ("quantize-dynamic", {"min_size": 256})], verify_samples=16).run(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    step = res.steps[1]
    assert step.report.changed and step.report.stats["fusion"]["fused"] == len(step.report.changed)
    assert step.vs_original.min_sqnr > 20.0, step.vs_original.to_json()
