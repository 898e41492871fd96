"""The prune pass on the builder families: lossless zero mode, coverage at ratio 0.5, criteria, strategies, CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcc.compiler.analysis import analyze
from onnxcc.compiler.calibration import CalibrationSet, input_specs, random_inputs
from onnxcc.compiler.ir_utils import clone_model, const_array, load_model, save_model
from onnxcc.compiler.pipeline import Pipeline
from onnxcc.compiler.verify import EXACT_RTOL, compare_outputs, run_model
from onnxcc.models.builders import FAMILIES, build
from onnxcc.passes.pruning.dependency import ChannelGraph
from tests.conftest import digest
from tests.pruning.helpers import zero_groups


def check_same_outputs(ref: ir.Model, cand: ir.Model, exact: bool):
    onnx.checker.check_model(ir.to_proto(cand), full_check=True)
    feeds = random_inputs(input_specs(ref), batch=3, seed=11)
    comp = compare_outputs(run_model(ref, feeds), run_model(cand, feeds))
    assert comp.ok_structure, comp.to_json()
    if exact:
        assert comp.within(EXACT_RTOL), comp.to_json()
    return comp


@pytest.mark.parametrize("zero_bias", [True, False], ids=["zero-activation", "constant-activation"])
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_criterion_is_exact_on_every_family(folded, family, zero_bias):
    model = folded(family)
    n_zeroed = zero_groups(model, 0.3, seed=2, zero_bias=zero_bias)
    ref = clone_model(model)
    res = Pipeline([("prune", {"criterion": "zero"})]).run(model)  # the pipeline itself enforces exactness
    step = res.steps[0]
    assert step.exact
    check_same_outputs(ref, model, exact=True)
    removed = step.report.stats["groups_removed"]
    kept = [s for s in step.report.skipped if "dead channel kept" in s.reason]
    if zero_bias:
        assert removed == n_zeroed and not kept  # zero activations: every masked channel goes
    else:
        # nonzero constants go into the next bias, except where a padded conv reads them (kept, with the reason)
        assert 0 < removed <= n_zeroed and (removed == n_zeroed or kept)
    assert analyze(model, stats=False).macs < analyze(ref, stats=False).macs


@pytest.mark.parametrize("zero_bias", [True, False], ids=["zero-activation", "constant-activation"])
def test_zero_criterion_within_groups_is_exact_on_resnext(folded, zero_bias):
    """Masks that zero the same positions in every group of ResNeXt's grouped convs (what a
    within-group pruner leaves) are removed exactly with grouped=within, groups kept."""
    model = folded("resnext")
    n_zeroed = zero_groups(model, 0.3, seed=2, zero_bias=zero_bias, grouped="within")
    ref = clone_model(model)
    res = Pipeline([("prune", {"criterion": "zero", "grouped": "within"})]).run(model)  # exactness enforced
    check_same_outputs(ref, model, exact=True)
    removed = res.steps[0].report.stats["groups_removed"]
    assert (removed == n_zeroed) if zero_bias else (0 < removed <= n_zeroed)
    groups = lambda m: sorted(n.attributes["group"].value for n in m.graph if n.op_type == "Conv" and n.attributes.get("group"))
    assert groups(model) == groups(ref)
    assert analyze(model, stats=False).macs < analyze(ref, stats=False).macs


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_half_runs_and_cuts_macs_on_every_family(folded, family):
    model = folded(family)
    ref = clone_model(model)
    res = Pipeline([("prune", {"ratio": 0.5})]).run(model)
    check_same_outputs(ref, model, exact=False)
    before, after = analyze(ref, stats=False), analyze(model, stats=False)
    assert after.macs < 0.45 * before.macs
    assert after.params < 0.6 * before.params
    spaces = res.steps[0].report.stats["spaces"]
    for sp in spaces:
        if sp["status"] == "blocked":
            assert sp["blocker"]  # every blocked space says why
        else:
            assert sp["kept"] == sp["channels"] - sp["channels"] // 2


@pytest.mark.parametrize("criterion", ["l1", "l2", "bn_scale", "fpgm", "activation"])
def test_every_criterion_produces_a_valid_smaller_model(folded, criterion):
    model = folded("resnet")
    ref = clone_model(model)
    calib = CalibrationSet({"input": np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32)})
    Pipeline([("prune", {"ratio": 0.3, "criterion": criterion})]).run(model, calib)
    check_same_outputs(ref, model, exact=False)
    assert analyze(model, stats=False).macs < 0.7 * analyze(ref, stats=False).macs


def test_activation_criterion_without_calibration_is_bad_input(folded):
    from onnxcc.compiler.errors import BadInputError

    with pytest.raises(BadInputError, match="calibration"):
        Pipeline([("prune", {"criterion": "activation"})]).run(folded("vgg"))


def test_bn_scale_removes_the_channels_with_the_smallest_recorded_scale():
    m = build("vgg", "tiny", seed=3)
    bn = next(n for n in m.graph if n.op_type == "BatchNormalization")
    gamma = const_array(bn.inputs[1]).copy()
    gamma[[0, 2]] = 1e-4  # the two channels network slimming would remove
    bn.inputs[1].const_value = ir.tensor(gamma)
    Pipeline(["fold"], verify=False).run(m)
    conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
    first = next(n for n in m.graph if n.op_type == "Conv")
    w_before = const_array(first.inputs[1]).copy()
    Pipeline([("prune", {"ratio": 0.25, "criterion": "bn_scale"})], verify=False).run(m)
    w_after = const_array(first.inputs[1])
    assert w_after.shape[0] == w_before.shape[0] - w_before.shape[0] // 4
    kept_rows = [i for i in range(w_before.shape[0]) if any(np.array_equal(w_before[i], r) for r in w_after)]
    assert 0 not in kept_rows and 2 not in kept_rows
    del conv


@pytest.mark.parametrize("opts", [{"target_macs": 0.75, "sensitivity_ratios": (0.25, 0.5)}, {"ratio": 0.25, "steps": 2}])
def test_bn_scale_survives_the_clones_of_automatic_and_stepped_pruning(opts):
    """The BN scale fold records is node metadata; every path that clones the model (targets, steps,
    sensitivity) must keep it, else bn_scale quietly ranks by L2. Channels 0 and 2 get a tiny BN scale
    but filters so large that they are still the largest after folding: L2 keeps them, bn_scale cuts."""
    m = build("vgg", "tiny", seed=3)
    firsts = {}
    for bn in [n for n in m.graph if n.op_type == "BatchNormalization"]:
        conv = bn.inputs[0].producer()
        gamma = const_array(bn.inputs[1]).copy()
        gamma[[0, 2]] = 1e-4
        bn.inputs[1].const_value = ir.tensor(gamma)
        w = const_array(conv.inputs[1]).copy()
        w[[0, 2]] *= 1e6
        conv.inputs[1].const_value = ir.tensor(w)
        firsts[conv.name] = None
    Pipeline(["fold"], verify=False).run(m)
    convs = {n.name: n for n in m.graph if n.name in firsts}
    before = {k: const_array(n.inputs[1]).copy() for k, n in convs.items()}
    calib = CalibrationSet(random_inputs(input_specs(m), n=1, batch=16, seed=0)[0])
    Pipeline([("prune", {"criterion": "bn_scale", "calib_samples": 16, **opts})], verify=False).run(m, calib)
    cut = 0
    after = {n.name: n for n in m.graph}  # a target's cut replaces the graph: look the layers up again
    for k in convs:
        w_b, w_a = before[k], const_array(after[k].inputs[1])
        if w_a.shape[0] <= w_b.shape[0] - 2:
            cut += 1
            small = np.abs(np.delete(w_b, [0, 2], axis=0)).max()  # the filters L2 would cut
            assert np.abs(w_a).max() < 10 * small, k  # filters 0 and 2 (about 1e6x larger) are gone
    assert cut >= 1


def test_round_to_keeps_multiples(folded):
    model = folded("resnet_bottleneck")
    res = Pipeline([("prune", {"ratio": 0.4, "round_to": 4})], verify=False).run(model)
    for sp in res.steps[0].report.stats["spaces"]:
        if sp["status"] == "pruned":
            assert sp["kept"] % 4 == 0 or sp["kept"] == sp["channels"]


def test_global_ranking_respects_ratio_and_cap(folded):
    model = folded("mobilenet_v2")
    res = Pipeline([("prune", {"ratio": 0.5, "global_ranking": True, "max_space_ratio": 0.75})], verify=False).run(model)
    spaces = [sp for sp in res.steps[0].report.stats["spaces"] if sp["status"] != "blocked"]
    total = sum(sp["channels"] for sp in spaces)
    gone = sum(sp["channels"] - sp["kept"] for sp in spaces)
    assert gone == int(0.5 * total)
    assert all(sp["kept"] >= sp["channels"] - int(0.75 * sp["channels"]) for sp in spaces)
    assert len({round(1 - sp["kept"] / sp["channels"], 2) for sp in spaces}) > 2  # not uniform


def test_exclude_and_layer_ratio_by_node_pattern(folded):
    model = folded("resnet")
    cg = ChannelGraph(clone_model(model))
    stem_space = next(sp for sp in cg.spaces if not sp.blocked)
    target = stem_space.names()[0]
    res = Pipeline([("prune", {"ratio": 0.5, "exclude": (target,), "layer_ratio": ("conv_1*=0.25",)})], verify=False).run(model)
    spaces = res.steps[0].report.stats["spaces"]
    by_first = {sp["members"][0]: sp for sp in spaces}
    assert by_first[target]["kept"] == by_first[target]["channels"]
    assert any("excluded" in s.reason for s in res.steps[0].report.skipped)


def test_mean_compensation_with_calibration_beats_none(folded):
    rng = np.random.default_rng(0)
    calib = CalibrationSet({"input": rng.standard_normal((32, 3, 32, 32)).astype(np.float32)})
    sq = {}
    for comp in (True, False):
        model = folded("resnet_bottleneck")
        ref = clone_model(model)
        Pipeline([("prune", {"ratio": 0.3, "compensate": comp})], verify=False).run(model, calib)
        feeds = [{"input": calib.arrays["input"][:16]}]
        sq[comp] = compare_outputs(run_model(ref, feeds), run_model(model, feeds)).min_sqnr
    assert sq[True] > sq[False] + 1.0, sq


def test_prune_cli_report_and_inspect_channels(cli, tmp_path, resnet_path):
    out, rep = tmp_path / "p.onnx", tmp_path / "p.json"
    before = digest(resnet_path)
    r = cli("prune", resnet_path, "-o", out, "--ratio", "0.5", "--report", rep)
    assert r.code == 0, r.err
    assert "MACs" in r.out and digest(resnet_path) == before
    report = json.loads(rep.read_text())
    step = report["passes"][1]
    assert step["pass"] == "prune" and step["stats"]["spaces"]
    blocked = [sp for sp in step["stats"]["spaces"] if sp["status"] == "blocked"]
    assert blocked and all(sp["blocker"] for sp in blocked)
    assert report["after"]["macs"] < 0.45 * report["before"]["macs"]
    m = load_model(out)
    assert m.graph.outputs[0].name == "logits"
    r = cli("inspect", "--channels", resnet_path)
    assert r.code == 0 and "graph output" in r.out and "prunable" in r.out
    r = cli("inspect", "--channels", "--json", resnet_path)
    assert json.loads(r.out)[0]["channels"] > 0


def test_prune_cli_zero_is_lossless(cli, tmp_path):
    m = build("mobilenet_v3", "tiny", seed=4)
    Pipeline(["fold"], verify=False).run(m)
    zero_groups(m, 0.4, seed=5, zero_bias=True)
    src = tmp_path / "masked.onnx"
    save_model(m, src)
    out = tmp_path / "p.onnx"
    r = cli("prune", src, "-o", out, "--criterion", "zero")
    assert r.code == 0, r.err
    assert "prune: exact" in r.out
    r = cli("verify", src, out)
    assert r.code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratio", "1.5"], "ratio must be in"),
        (["--layer-ratio", "nomatch*=0.3"], "matches no prunable layer"),
        (["--layer-ratio", "conv"], "PATTERN=R"),
        (["--criterion", "activation"], "calibration"),
    ],
)
def test_prune_cli_bad_options_exit_2(cli, tmp_path, resnet_path, args, message):
    out = tmp_path / "p.onnx"
    r = cli("prune", resnet_path, "-o", out, *args)
    assert r.code == 2 and message in r.err, r
    assert not out.exists()
