"""The ``lower-int8`` pass: exact rewrites that INT8 kernels need, verified on their own; flat-range detection."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from onnxcc.compiler.calibration import input_specs, random_inputs
from onnxcc.compiler.errors import VerificationError
from onnxcc.compiler.ir_utils import clone_model
from onnxcc.compiler.pipeline import Pipeline
from onnxcc.compiler.verify import EXACT_RTOL, compare_outputs, run_model
from onnxcc.passes.quantization import lower
from tests.conftest import named_model_from_text
from tests.quantization.test_quantize import calib_for

OPSET11 = """
<ir_version: 7, opset_import: ["" : 11]>
g (float[N, 3, 8, 8] x) => (float[N, 4] y) {
    a = Conv <pads = [1, 1, 1, 1]> (x, W, B)
    b = BatchNormalization (a, S, T, M, V)
    g = HardSigmoid <alpha = 0.16666667, beta = 0.5> (b)
    h = Mul (b, g)
    m = ReduceMean <axes = [2, 3], keepdims = 0> (h)
    y = HardSigmoid (m)
}
"""


def _opset11(seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    return named_model_from_text(
        OPSET11, W=rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), B=np.zeros(4, np.float32),
        S=rng.uniform(0.5, 2, 4).astype(np.float32), T=rng.normal(0, 1, 4).astype(np.float32),
        M=rng.normal(0, 0.1, 4).astype(np.float32), V=rng.uniform(0.5, 2, 4).astype(np.float32),
    )


def test_lowering_is_exact_and_leaves_only_fusable_ops():
    model = _opset11()
    ref = clone_model(model)
    res = Pipeline(["lower-int8"], verify_samples=8).run(model)
    step = res.steps[0]
    assert step.exact and step.vs_previous.within(EXACT_RTOL)
    assert step.report.stats == {"opset_upgraded": 1, "hard_activations": 2, "batchnorms": 1, "reduce_means": 1}
    ops = {n.op_type for n in model.graph}
    assert model.opset_imports[""] == 13
    assert not ops & {"HardSwish", "HardSigmoid", "BatchNormalization", "ReduceMean"} and "GlobalAveragePool" in ops
    feeds = random_inputs(input_specs(ref), batch=3, seed=5)
    assert compare_outputs(run_model(ref, feeds), run_model(model, feeds)).within(EXACT_RTOL)


def test_quantize_runs_the_lowering_as_its_own_verified_exact_step(monkeypatch):
    """quantize lowers first, and that lowering is checked at the exact tolerance: a broken lowering
    is an exact pass's failure, not quantization noise hidden in the lossy budget."""
    model = _opset11()
    res = Pipeline([("quantize", {"force_int8": True, "check_fusion": False})], verify_samples=8).run(model, calib_for(model, 16))
    assert res.steps[0].report.stats["lowered"]["opset_upgraded"] == 1
    orig = lower.batchnorm_to_depthwise

    def broken(graph):  # the depthwise conv gets a wrong bias: off by 0.1, far above float rounding
        n = orig(graph)
        for node in graph:
            if node.op_type == "Conv" and node.attributes.get("group") is not None and node.attributes["group"].value > 1:
                b = node.inputs[2].const_value.numpy() + 0.1
                node.inputs[2].const_value = ir.tensor(b.astype(np.float32))
        return n

    monkeypatch.setattr(lower, "batchnorm_to_depthwise", broken)
    model = _opset11()
    with pytest.raises(VerificationError, match="'lower-int8' is exact but changed"):
        Pipeline([("quantize", {"force_int8": True, "check_fusion": False})], verify_samples=8).run(model, calib_for(model, 16))


RELU6_SWISH = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4, 6, 6] x) => (float[N, 4, 6, 6] y, float[N, 4, 6, 6] z) {
    a = Conv (x, W)
    s = Add (a, three)
    r = Clip (s, zero, six)
    d = Div (r, six)
    y = Mul (a, d)
    c = Conv (x, W2)
    s2 = Add (c, three)
    z = Clip (s2, zero, six)
}
"""


def test_flat_limits_find_exporters_own_hard_swish_and_relu6_patterns():
    """tf2onnx and the torch exporters write HardSwish as x · relu6(x + 3) / 6: the input's range
    can be cut below −3 there as for the decomposed op; a bare relu6(x + 3) is flat outside [−3, 3]."""
    rng = np.random.default_rng(0)
    c = {"three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)}
    model = named_model_from_text(RELU6_SWISH, W=rng.normal(0, 1, (4, 4, 1, 1)).astype(np.float32),
                                  W2=rng.normal(0, 1, (4, 4, 1, 1)).astype(np.float32), **c)
    limits = {v.name: lim for v, lim in lower.flat_limits(model.graph).items()}
    assert limits == {"a": (-3.0, np.inf), "c": (-3.0, 3.0)}


def test_flat_limits_skip_inputs_read_elsewhere():
    rng = np.random.default_rng(0)
    text = RELU6_SWISH.replace("float[N, 4, 6, 6] z) {", "float[N, 4, 6, 6] z, float[N, 4, 6, 6] c2) {").replace(
        "    z = Clip (s2, zero, six)\n", "    z = Clip (s2, zero, six)\n    c2 = Relu (c)\n")
    c = {"three": np.array(3.0, np.float32), "zero": np.array(0.0, np.float32), "six": np.array(6.0, np.float32)}
    model = named_model_from_text(text, W=rng.normal(0, 1, (4, 4, 1, 1)).astype(np.float32),
                                  W2=rng.normal(0, 1, (4, 4, 1, 1)).astype(np.float32), **c)
    assert {v.name for v in lower.flat_limits(model.graph)} == {"a"}  # c also feeds a Relu: its range must stay whole
