"""Property tests: random conv/bn/activation/add/concat/pool/SE/gemm graphs.

* structured zero masks → ``criterion=zero`` removes them and the outputs agree at float rounding;
* any criterion and ratio → a valid graph with unchanged output shapes.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxcc.compiler.calibration import input_specs, random_inputs
from onnxcc.compiler.ir_utils import clone_model
from onnxcc.compiler.pipeline import Pipeline
from onnxcc.compiler.verify import EXACT_RTOL, compare_outputs, run_model
from tests.pruning.helpers import zero_groups
from tests.strategies import cnn_graphs

def networks():
    """Small random CNNs (8×8, up to 6 blocks, up to 8 channels), folded or not."""
    return cnn_graphs(name="prop", hw=8, in_channels=None, blocks=("cba1", "cba3", "dw", "residual", "concat", "pool", "se", "grouped"),
                      max_blocks=6, max_ch=8, max_residual=6, max_hidden=6, classes=3, maybe_fold=True)


def _compare(ref, cand):
    onnx.checker.check_model(ir.to_proto(cand), full_check=True)
    feeds = random_inputs(input_specs(ref), batch=2, seed=5)
    return compare_outputs(run_model(ref, feeds), run_model(cand, feeds))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(), st.floats(0.1, 0.6), st.booleans(), st.integers(0, 1000))
def test_zero_masks_are_removed_exactly(model, fraction, zero_bias, seed):
    zero_groups(model, fraction, seed=seed, zero_bias=zero_bias)
    ref = clone_model(model)
    res = Pipeline([("prune", {"criterion": "zero"})], verify=False).run(model)
    comp = _compare(ref, model)
    assert comp.within(EXACT_RTOL), comp.to_json()
    if zero_bias and not any(n.op_type == "BatchNormalization" for n in ref.graph):  # activations exactly 0
        assert not [s for s in res.steps[0].report.skipped if "dead channel kept" in s.reason]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(networks(), st.sampled_from(["l1", "l2", "bn_scale", "fpgm"]), st.floats(0.0, 0.9), st.booleans(), st.integers(1, 4))
def test_any_criterion_gives_a_valid_graph_with_the_same_output_shapes(model, criterion, ratio, global_ranking, round_to):
    ref = clone_model(model)
    Pipeline(
        [("prune", {"criterion": criterion, "ratio": ratio, "global_ranking": global_ranking, "round_to": round_to})],
        verify=False,
    ).run(model)
    comp = _compare(ref, model)
    assert comp.ok_structure, comp.to_json()
