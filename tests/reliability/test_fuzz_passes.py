"""Fuzzing every registered pass with random graphs (hypothesis).

Random stacks of conv (1×1 / 3×3 / strided / dilated / depthwise / grouped) +
BatchNorm + Relu/Relu6/HardSwish/SiLU, residual Add, SE Mul, Concat, Split,
max/average pooling, Reshape(Flatten)→Gemm heads go through ``fold`` and then
one registered pass with randomly drawn options, inside the verifying
pipeline: an exact pass must agree with its input (else the pipeline raises
VerificationError), a lossy pass must give a graph that passes the ONNX
checker, runs in onnxruntime and keeps every output's shape. A pass may refuse
a graph only with a clear BadInputError.

CI runs a short seeded campaign (``ONNXCC_FUZZ_EXAMPLES``, default 6 per
pass); a long one is the same test with a large value, e.g.
``ONNXCC_FUZZ_EXAMPLES=300 python -m pytest tests/reliability/test_fuzz_passes.py``.
"""

from __future__ import annotations

import os

import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from onnxcc.compiler.calibration import CalibrationSet, input_specs, random_inputs
from onnxcc.compiler.errors import BadInputError
from onnxcc.compiler.ir_utils import clone_model
from onnxcc.compiler.pipeline import Pipeline
from onnxcc.compiler.registry import registered_passes
from onnxcc.compiler.verify import compare_outputs, run_model
from tests.strategies import cnn_graphs

EXAMPLES = int(os.environ.get("ONNXCC_FUZZ_EXAMPLES", "6"))
LOG = os.environ.get("ONNXCC_FUZZ_LOG")  # one line per example tried: pass, outcome (for long campaigns)


def _log(name: str, outcome: str) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"{name}\t{outcome}\n")


def graphs():
    return cnn_graphs()  # 16×16, 1/3/4 input channels, every block kind


OPTIONS = {
    "fold": st.just({}),
    "prune": st.fixed_dictionaries({"ratio": st.floats(0.1, 0.7), "criterion": st.sampled_from(["l1", "l2", "fpgm", "bn_scale", "zero"]), "round_to": st.sampled_from([1, 2])}),
    "equalize": st.just({}),
    "lower-int8": st.fixed_dictionaries({"hard_activations": st.booleans()}),
    "quantize": st.fixed_dictionaries({"method": st.sampled_from(["minmax", "percentile", "entropy", "mse"]), "per_channel": st.booleans(), "bias_correction": st.booleans(), "check_fusion": st.just(False)}),
    "quantize-dynamic": st.fixed_dictionaries({"min_size": st.just(16)}),
    "weight-only": st.fixed_dictionaries({"dtype": st.sampled_from(["int8", "int4", "fp16", "binary", "ternary"]), "min_size": st.just(64), "block_size": st.just(16)}),
    "factorize": st.fixed_dictionaries({"method": st.sampled_from(["svd", "spatial-svd", "tucker", "depthwise", "cp"]), "rank": st.sampled_from([0.3, 0.6, 2.0]), "refit": st.booleans()}),
    "sparsify": st.fixed_dictionaries({"sparsity": st.floats(0.1, 0.9), "global_threshold": st.booleans(), "min_size": st.just(16), "reconstruct": st.booleans()}),
    "codebook": st.fixed_dictionaries({"bits": st.integers(2, 8), "min_size": st.just(16)}),
    "distill": st.fixed_dictionaries({"epochs": st.just(1), "batch": st.sampled_from([4, 8]), "lr": st.sampled_from([1e-3, 1e-4]),
                                      "feature_loss": st.booleans(), "threads": st.just(1)}),
}


def test_every_registered_pass_is_fuzzed():
    assert set(OPTIONS) == set(registered_passes())


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_fuzz_pass(name):
    @seed(1234)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(model=graphs(), opts=OPTIONS[name])
    def run(model, opts):
        _fuzz_one(name, model, opts)

    run()


@pytest.fixture(scope="module")
def foreign_ops():
    from onnxcc.models.conformance import unary_float_ops

    return tuple(unary_float_ops())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_fuzz_pass_with_conformance_operators(name, foreign_ops):
    """The same promises with operators from ONNX's conformance suite (activations, softmaxes,
    normalizations, LRN, rounding, trigonometry, ... with their tests' attributes) dropped into the
    CNN graphs, where passes meet ops they have no rule for."""
    from hypothesis import assume

    @seed(4321)
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(model=cnn_graphs(foreign=foreign_ops, blocks=("cba1", "cba3", "residual", "concat", "dw")), opts=OPTIONS[name])
    def run(model, opts):
        try:  # an operator whose test attributes do not fit this graph (a 1-D pool, a rank-3 perm)
            run_model(model, random_inputs(input_specs(model), batch=2, seed=7))
        except BadInputError:
            assume(False)
        _fuzz_one(name, model, opts)

    run()


def _fuzz_one(name, model, opts):
    ref = clone_model(model)
    calib = CalibrationSet(random_inputs(input_specs(model), batch=16, seed=3)[0])
    try:
        res = Pipeline(["fold", (name, opts)], verify_samples=4).run(model, calib)  # exact passes are checked here
    except BadInputError as e:  # a refusal must be one clear line, and never onnxruntime choking on our rewrite
        assert "\n" not in str(e) and str(e)
        run_model(ref, random_inputs(input_specs(ref), batch=2, seed=7))  # the input itself runs ...
        assert not str(e).startswith("onnxruntime"), (name, opts, str(e)[:300])  # ... so this is a bug
        _log(name, f"refused: {str(e)[:100]}")
        return
    onnx.checker.check_model(ir.to_proto(res.model), full_check=True)
    feeds = random_inputs(input_specs(ref), batch=2, seed=7)
    cmp = compare_outputs(run_model(ref, feeds), run_model(res.model, feeds))
    assert cmp.ok_structure, cmp.to_json()
    for o in cmp.outputs:
        assert o.shape_ref == o.shape_cand
    if res.steps[1].exact:  # to the model's own float noise, as the pipeline held it
        assert cmp.within(res.steps[1].tolerance or 1e-4), (name, opts, cmp.to_json())
    _log(name, f"ok: {len(res.steps[1].report.changed)} changed")
