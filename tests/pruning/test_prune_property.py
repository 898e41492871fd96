"""Property tests: random conv/bn/activation/add/concat/pool/SE/gemm graphs.

* structured zero masks → ``criterion=zero`` removes them and the outputs agree at float rounding;
* any criterion and ratio → a valid graph with unchanged output shapes.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.calibration import input_specs, random_inputs
from compiler.ir_utils import clone_model
from compiler.pipeline import Pipeline
from compiler.verify import EXACT_RTOL, compare_outputs, run_model
from models.builders import NetBuilder
from tests.pruning.helpers import zero_groups

BLOCKS = ["cba1", "cba3", "dw", "residual", "concat", "pool", "se", "grouped"]


@st.composite
def networks(draw) -> ir.Model:
    seed = draw(st.integers(0, 2**16))
    b = NetBuilder("prop", 8, seed=seed)
    x = b.input
    hw = 8
    for kind in draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=6)):
        c = b.ch[x]
        act = draw(st.sampled_from(["relu", "relu6", "hardswish", "silu", None]))
        if kind == "cba1":
            x = b.cba(x, draw(st.integers(2, 8)), 1, act=act)
        elif kind == "cba3":
            x = b.cba(x, draw(st.integers(2, 8)), 3, act=act)
        elif kind == "dw" and c > 1:
            x = b.cba(x, c, 3, g=c, act=act)
        elif kind == "grouped" and c % 2 == 0:
            x = b.cba(x, c, 3, g=2, act=act)
        elif kind == "residual":
            y = b.cba(b.cba(x, draw(st.integers(2, 6)), 1, act="relu"), c, 3, act=None)
            x = b.add(x, y)
        elif kind == "concat":
            x = b.concat([x, b.cba(x, draw(st.integers(2, 6)), 3, act=act)])
        elif kind == "pool" and hw >= 4:
            x = b.maxpool(x) if draw(st.booleans()) else b.avgpool(x)
            hw //= 2
        elif kind == "se" and c >= 2:
            x = b.se(x, max(1, c // 2))
    if draw(st.booleans()):
        x = b.gemm(b.flatten(x, spatial=hw * hw), draw(st.integers(2, 6)))  # Flatten→Gemm over H·W blocks
        x = b.gemm(b.relu(x), 3)
    else:
        x = b.classifier(x, 3)
    model = b.finish(x, calibrate=False)
    if draw(st.booleans()):
        Pipeline(["fold"], verify=False).run(model)
    return model


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
