"""Channel dependency analysis and surgery on small hand-written graphs, one coupling per test."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcc.compiler.calibration import input_specs, random_inputs
from onnxcc.compiler.ir_utils import clone_model, const_array
from onnxcc.compiler.pipeline import Pipeline
from onnxcc.compiler.verify import EXACT_RTOL, compare_outputs, run_model
from onnxcc.passes.pruning.dependency import ChannelGraph
from onnxcc.passes.pruning.cut import prepare
from tests.conftest import named_model_from_text as model_from_text

HEAD = '<ir_version: 8, opset_import: ["" : {opset}]>\n'
RNG = np.random.default_rng(0)


def w(*shape, zero_out=(), zero_in=()):
    a = RNG.normal(size=shape).astype(np.float32) * 0.5
    a[list(zero_out)] = 0
    if zero_in:
        a[:, list(zero_in)] = 0
    return a


def b(n, zero=()):
    a = RNG.normal(size=n).astype(np.float32) * 0.3
    a[list(zero)] = 0
    return a


def analyse(model, **kw):
    m = clone_model(model)
    prepare(m)
    return ChannelGraph(m, **kw)


def prune(model, **opts):
    """Prune a copy (the pipeline verifies exactness for criterion=zero); assert the checker and agreement."""
    pruned = clone_model(model)
    opts.setdefault("criterion", "zero")
    res = Pipeline([("prune", opts)], verify=opts["criterion"] == "zero").run(pruned)
    onnx.checker.check_model(ir.to_proto(pruned), full_check=True)
    feeds = random_inputs(input_specs(model), batch=2, seed=3)
    comp = compare_outputs(run_model(model, feeds), run_model(pruned, feeds))
    if opts["criterion"] == "zero" and not opts.get("allow_lossy"):
        assert comp.within(EXACT_RTOL), comp.to_json()
    assert comp.ok_structure
    return pruned, res.steps[0].report


def weight(model, node_name):
    node = next(n for n in model.graph if n.name == node_name)
    return const_array(node.inputs[1])


def test_residual_add_is_one_space_and_zero_channels_removed_exactly():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1, b1)
        r = Relu (a)
        c = Conv <kernel_shape=[1,1]> (r, w2, b2)
        s = Add (a, c)
        y = Conv <kernel_shape=[1,1]> (s, w3)
    }"""
    m = model_from_text(text, w1=w(6, 3, 1, 1, zero_out=[2]), b1=b(6, zero=[2]), w2=w(6, 6, 1, 1, zero_out=[2]), b2=b(6, zero=[2]), w3=w(5, 6, 1, 1))
    cg = analyse(m)
    assert len([sp for sp in cg.spaces if not sp.blocked]) == 1  # c1 and the second conv share the residual space
    pruned, rep = prune(m)
    assert rep.stats["groups_removed"] == 1
    assert [const_array(n.inputs[1]).shape[0] for n in pruned.graph if n.op_type == "Conv"][:2] == [5, 5]


def test_residual_channel_zero_in_only_one_branch_is_kept():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1)
        c = Conv <kernel_shape=[1,1]> (x, w2)
        s = Add (a, c)
        y = Conv <kernel_shape=[1,1]> (s, w3)
    }"""
    m = model_from_text(text, w1=w(6, 3, 1, 1, zero_out=[1]), w2=w(6, 3, 1, 1), w3=w(5, 6, 1, 1))
    _, rep = prune(m)
    assert rep.stats["groups_removed"] == 0  # channel 1 of the sum is still written by the second conv


def test_concat_offsets_map_to_consumer_columns():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1)
        c = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w2)
        k = Concat <axis=1> (a, c)
        r = Relu (k)
        y = Conv <kernel_shape=[1,1]> (r, w3)
    }"""
    w3 = w(5, 10, 1, 1)
    m = model_from_text(text, w1=w(4, 3, 1, 1, zero_out=[0]), w2=w(6, 3, 3, 3, zero_out=[3]), w3=w3)
    pruned, rep = prune(m)
    assert rep.stats["groups_removed"] == 2
    kept_cols = [i for i in range(10) if i not in (0, 4 + 3)]
    np.testing.assert_array_equal(weight(pruned, "y"), w3[:, kept_cols])


def test_depthwise_ties_input_and_output_channels():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1)
        r = Relu (a)
        d = Conv <kernel_shape=[3,3], pads=[1,1,1,1], group=8> (r, wd, bd)
        y = Conv <kernel_shape=[1,1]> (d, w3)
    }"""
    # Channel 5 is dead: the expand conv and the depthwise filter are zero; the depthwise bias remains,
    # so the projection conv sees a constant 0.7 and gets it folded into its bias.
    bd = b(8)
    bd[5] = 0.7
    m = model_from_text(text, w1=w(8, 3, 1, 1, zero_out=[5]), wd=w(8, 1, 3, 3, zero_out=[5]), bd=bd, w3=w(5, 8, 1, 1))
    cg = analyse(m)
    dw = next(n for n in cg.graph if n.op_type == "Conv" and n.attributes.get("group") and n.attributes["group"].value == 8)
    assert cg.value_groups(dw.inputs[0]) == cg.value_groups(dw.outputs[0])
    pruned, rep = prune(m)
    dw = next(n for n in pruned.graph if n.op_type == "Conv" and n.attributes.get("group") and n.attributes["group"].value > 1)
    assert dw.attributes["group"].value == 7 and const_array(dw.inputs[1]).shape == (7, 1, 3, 3)
    assert rep.stats["compensated_layers"]  # the constant went into the projection's bias


def test_grouped_conv_removes_whole_groups():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1)
        gc = Conv <kernel_shape=[3,3], pads=[1,1,1,1], group=4> (a, wg)
        y = Conv <kernel_shape=[1,1]> (gc, w3)
    }"""
    m = model_from_text(text, w1=w(8, 3, 1, 1, zero_out=[2, 3]), wg=w(8, 2, 3, 3), w3=w(5, 8, 1, 1))
    cg = analyse(m, grouped="whole")  # criterion=zero's mode: structured masks zero whole groups
    prunable = [sp for sp in cg.spaces if not sp.blocked]
    assert [sp.channels for sp in prunable] == [4]  # 4 groups of (2 in, 2 out)
    pruned, rep = prune(m)
    gc = [n for n in pruned.graph if n.op_type == "Conv"][1]
    assert gc.attributes["group"].value == 3 and const_array(gc.inputs[1]).shape == (6, 2, 3, 3)


GROUPED = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1, b1)
        r = Relu (a)
        gc = Conv <kernel_shape=[1,1], group=4> (r, wg)
        y = Conv <kernel_shape=[1,1]> (gc, w3)
    }"""


def test_grouped_conv_loses_the_same_positions_in_every_group():
    """A ranked cut (Torch-Pruning's way): position k of every group goes together, on the input
    and on the output side, so each group keeps its place and narrows; MACs fall quadratically."""
    m = model_from_text(GROUPED, w1=w(8, 3, 1, 1), b1=b(8), wg=w(8, 2, 1, 1), w3=w(5, 8, 1, 1))
    cg = analyse(m)
    assert sorted(sp.channels for sp in cg.spaces if not sp.blocked) == [2, 2]  # in and out positions
    pruned, _ = prune(m, criterion="l1", ratio=0.5)
    a, gc, y = [n for n in pruned.graph if n.op_type == "Conv"]
    assert gc.attributes["group"].value == 4 and const_array(gc.inputs[1]).shape == (4, 1, 1, 1)
    assert const_array(a.inputs[1]).shape == (4, 3, 1, 1) and const_array(y.inputs[1]).shape == (5, 4, 1, 1)


def test_grouped_conv_within_groups_removes_dead_positions_exactly():
    """Position 1 of every group dead (zero filters, a nonzero bias: a constant after Relu): removed
    with the constant folded into the grouped conv's bias, exactly."""
    m = model_from_text(GROUPED, w1=w(8, 3, 1, 1, zero_out=[1, 3, 5, 7]), b1=np.abs(b(8)) + 0.1, wg=w(8, 2, 1, 1), w3=w(5, 8, 1, 1))
    pruned, rep = prune(m, grouped="within")  # verified exact by the pipeline and by prune()
    gc = [n for n in pruned.graph if n.op_type == "Conv"][1]
    assert rep.stats["groups_removed"] == 1
    assert gc.attributes["group"].value == 4 and const_array(gc.inputs[1]).shape == (8, 1, 1, 1)


def test_grouped_conv_with_only_one_dead_input_keeps_its_group():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1)
        gc = Conv <kernel_shape=[1,1], group=4> (a, wg)
        y = Conv <kernel_shape=[1,1]> (gc, w3)
    }"""
    m = model_from_text(text, w1=w(8, 3, 1, 1, zero_out=[2]), wg=w(8, 2, 1, 1), w3=w(5, 8, 1, 1))
    _, rep = prune(m)
    assert rep.stats["groups_removed"] == 0


@pytest.mark.parametrize("use_flatten", [True, False])
def test_flatten_to_gemm_removes_blocks_of_hw_rows(use_flatten):
    flat = "f = Flatten <axis=1> (r)" if use_flatten else "f = Reshape (r, shp)"
    text = HEAD.format(opset=17) + f"""
    g (float[N,3,4,4] x) => (float[N,3] y) {{
        a = Conv <kernel_shape=[3,3], strides=[2,2], pads=[1,1,1,1]> (x, w1, b1)
        r = Relu (a)
        {flat}
        h = Gemm <transB=1> (f, wf, bf)
        y = Gemm <transB=1> (h, wo)
    }}"""
    wf = w(6, 4 * 2 * 2)
    b1 = b(4)
    b1[1] = 0.4
    inits = dict(w1=w(4, 3, 3, 3, zero_out=[1]), b1=b1, wf=wf, bf=b(6), wo=w(3, 6, zero_out=[]))
    if not use_flatten:
        inits["shp"] = np.array([-1, 16], np.int64)
    m = model_from_text(text, **inits)
    pruned, rep = prune(m)
    assert rep.stats["groups_removed"] == 1
    keep = [i for i in range(16) if not 4 <= i < 8]  # channel 1 = features 4..7
    np.testing.assert_array_equal(weight(pruned, "h"), wf[:, keep])
    # the relu'd bias of the dead channel was a constant: folded into fc's bias
    assert rep.stats["compensated_layers"] == ["h"]


def test_squeeze_excite_gate_couples_spaces():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1)
        p = GlobalAveragePool (a)
        s1 = Conv <kernel_shape=[1,1]> (p, ws1, bs1)
        r = Relu (s1)
        s2 = Conv <kernel_shape=[1,1]> (r, ws2, bs2)
        gt = Sigmoid (s2)
        m = Mul (a, gt)
        y = Conv <kernel_shape=[1,1]> (m, w3)
    }"""
    # Structured masks zero every filter of the group: the gated conv and the gate conv's channel 6.
    m = model_from_text(
        text, w1=w(8, 3, 1, 1, zero_out=[6]), ws1=w(2, 8, 1, 1), bs1=b(2), ws2=w(8, 2, 1, 1, zero_out=[6]), bs2=b(8),
        w3=w(5, 8, 1, 1),
    )
    cg = analyse(m)
    sizes = sorted(sp.channels for sp in cg.spaces if not sp.blocked)
    assert sizes == [2, 8]  # the gate's output joins the gated tensor's space
    pruned, rep = prune(m)
    assert rep.stats["groups_removed"] == 1  # a·σ(b) = 0
    convs = [n for n in pruned.graph if n.op_type == "Conv"]
    assert const_array(convs[2].inputs[1]).shape == (7, 2, 1, 1)  # gate conv lost the output too


def test_split_and_slice_on_channel_axis_update_sizes():
    text = HEAD.format(opset=18) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1)
        p, q = Split <axis=1> (a, sp)
        s = Slice (a, st, en, ax)
        pq = Add (p, q)
        k = Concat <axis=1> (pq, s)
        y = Conv <kernel_shape=[1,1]> (k, w3)
    }"""
    m = model_from_text(
        text, w1=w(8, 3, 1, 1, zero_out=[1, 5, 2, 6]), sp=np.array([4, 4], np.int64), st=np.array([4], np.int64),
        en=np.array([8], np.int64), ax=np.array([1], np.int64), w3=w(5, 8, 1, 1),
    )
    pruned, rep = prune(m)
    # p + q ties a[k] to a[4 + k]: the pairs (1, 5) and (2, 6) are dead
    assert rep.stats["groups_removed"] == 2
    split = next(n for n in pruned.graph if n.op_type == "Split")
    assert const_array(split.inputs[1]).tolist() == [2, 2]
    sl = next(n for n in pruned.graph if n.op_type == "Slice")
    assert (const_array(sl.inputs[1]).tolist(), const_array(sl.inputs[2]).tolist()) == ([2], [4])


def test_prelu_and_per_channel_constants_are_sliced():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1)
        p = PRelu (a, slope)
        m = Mul (p, scale)
        d = Add (m, shift)
        y = Conv <kernel_shape=[1,1]> (d, w3)
    }"""
    m = model_from_text(
        text, w1=w(6, 3, 1, 1, zero_out=[4]), slope=b(6).reshape(6, 1, 1), scale=b(6).reshape(1, 6, 1, 1),
        shift=b(6).reshape(6, 1, 1), w3=w(5, 6, 1, 1),
    )
    pruned, rep = prune(m)
    assert rep.stats["groups_removed"] == 1
    shapes = {n.op_type: const_array(n.inputs[1]).shape for n in pruned.graph if n.op_type in ("PRelu", "Mul", "Add")}
    assert shapes == {"PRelu": (5, 1, 1), "Mul": (1, 5, 1, 1), "Add": (5, 1, 1)}


def test_nonzero_constant_through_padding_is_kept_unless_lossy_allowed():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1, b1)
        r = Relu (a)
        y = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (r, w3)
    }"""
    b1 = b(6)
    b1[2] = 0.5
    m = model_from_text(text, w1=w(6, 3, 1, 1, zero_out=[2]), b1=b1, w3=w(5, 6, 3, 3))
    _, rep = prune(m)
    assert rep.stats["groups_removed"] == 0
    assert any("zero padding" in s.reason for s in rep.skipped)
    lossy, rep2 = prune(m, allow_lossy=True)
    assert rep2.stats["groups_removed"] == 1 and rep2.stats["lossy"]


def test_unused_channels_are_removed_without_compensation():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (x, w1, b1)
        r = Relu (a)
        y = Conv <kernel_shape=[3,3], pads=[1,1,1,1]> (r, w3)
    }"""
    m = model_from_text(text, w1=w(6, 3, 3, 3), b1=b(6), w3=w(5, 6, 3, 3, zero_in=[0, 3]))
    pruned, rep = prune(m)
    assert rep.stats["groups_removed"] == 2 and not rep.stats["compensated_layers"]


def test_layernorm_over_channels_is_lossy_only():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,8,8,5] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1)
        t = Transpose <perm=[0,2,3,1]> (a)
        n = LayerNormalization <axis=-1> (t, ls, lb)
        h = MatMul (n, m1)
        g1 = Relu (h)
        y = MatMul (g1, m2)
    }"""
    m = model_from_text(
        text, w1=w(6, 3, 1, 1, zero_out=[1]), ls=b(6) + 1, lb=b(6), m1=w(6, 12, zero_out=[]), m2=w(12, 5)
    )
    _, rep = prune(m)
    assert rep.stats["groups_removed"] == 0
    assert any("LayerNormalization" in s.reason for s in rep.skipped)
    pruned, rep2 = prune(m, criterion="l1", ratio=0.5)
    shapes = sorted(const_array(n.inputs[1]).shape for n in pruned.graph if n.op_type == "MatMul")
    assert shapes == [(3, 6), (6, 5)]  # both the LN space (6→3) and the hidden space (12→6) were cut


def test_matmul_consumer_compensation_inserts_bias_add():
    text = HEAD.format(opset=17) + """
    g (float[N,4,6] x) => (float[N,4,3] y) {
        h = MatMul (x, m1)
        hb = Add (h, bias)
        r = Relu (hb)
        y = MatMul (r, m2)
    }"""
    bias = b(8)
    bias[3] = 0.9
    m = model_from_text(text, m1=w(6, 8, zero_out=[]).copy(), bias=bias, m2=w(8, 3))
    w1 = const_array(m.graph.initializers["m1"]).copy()
    w1[:, 3] = 0
    m.graph.initializers["m1"].const_value = ir.tensor(w1)
    pruned, rep = prune(m)
    assert rep.stats["groups_removed"] == 1
    assert Counter(n.op_type for n in pruned.graph)["Add"] == 2  # relu(0.9)·W[3] became an explicit bias


@pytest.mark.parametrize(
    "body, inits, reason",
    [
        ("a = Conv <kernel_shape=[1,1]> (x, w1)\n y = Identity (a)", {}, "graph output"),
        ("a = Conv <kernel_shape=[1,1]> (x, w1)\n y = custom.Foo (a)", {}, "custom-domain"),
        ("a = Conv <kernel_shape=[1,1]> (x, w1)\n s = Softmax <axis=1> (a)\n y = Conv <kernel_shape=[1,1]> (s, w3)", {}, "Softmax over the channel axis"),
        ("a = Conv <kernel_shape=[1,1]> (x, w1)\n r = Reshape (a, shp)\n t = Reshape (r, shp2)\n y = Conv <kernel_shape=[1,1]> (t, w3)",
         {"shp": np.array([-1, 2, 3, 8, 8], np.int64), "shp2": np.array([-1, 6, 8, 8], np.int64)}, "not followed by a channel shuffle"),
        ("a = Conv <kernel_shape=[1,1]> (x, w1)\n b = Conv <kernel_shape=[1,1]> (x, w1)\n s = Add (a, b)\n y = Conv <kernel_shape=[1,1]> (s, w3)", {}, None),
    ],
    ids=["graph-output", "custom-op", "softmax", "reshape-split", "shared-weight"],
)
def test_blockers_are_reported(body, inits, reason):
    outs = "float[N,6,8,8] y" if "Identity" in body or "custom" in body else "float[N,5,8,8] y"
    text = '<ir_version: 8, opset_import: ["" : 17, "custom" : 1]>' + f"""
    g (float[N,3,8,8] x) => ({outs}) {{
        {body}
    }}"""
    m = model_from_text(text, w1=w(6, 3, 1, 1), w3=w(5, 6, 1, 1), **inits)
    cg = analyse(m)
    blocked = [sp.blocked for sp in cg.spaces if sp.blocked]
    if reason is None:  # shared weight: the conv outputs are not channel sources at all
        assert not [sp for sp in cg.spaces if not sp.blocked]
    else:
        assert any(reason in r for r in blocked), blocked


def test_weight_fed_as_graph_input_blocks():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x, float[6,3,1,1] w1) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1)
        y = Conv <kernel_shape=[1,1]> (a, w3)
    }"""
    m = model_from_text(text, w3=w(5, 6, 1, 1))
    cg = analyse(m)
    assert not [sp for sp in cg.spaces if not sp.blocked]


def test_channels_used_inside_a_subgraph_are_blocked():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x, bool c) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1)
        r = Relu (a)
        z = If (c) <then_branch = t () => (float[N,6,8,8] o) { o = Relu (r) }, else_branch = e () => (float[N,6,8,8] o) { o = Sigmoid (r) }>
        y = Conv <kernel_shape=[1,1]> (z, w3)
    }"""
    m = model_from_text(text, w1=w(6, 3, 1, 1), w3=w(5, 6, 1, 1))
    cg = analyse(m)
    reasons = [sp.blocked for sp in cg.spaces if sp.values and sp.values[0].name == "a"]
    assert reasons and "subgraph" in reasons[0]


def test_channel_shuffle_is_handled_exactly():
    text = HEAD.format(opset=17) + """
    g (float[N,3,8,8] x) => (float[N,5,8,8] y) {
        a = Conv <kernel_shape=[1,1]> (x, w1, b1)
        r = Reshape (a, shp)
        t = Transpose <perm=[0,2,1,3,4]> (r)
        s = Reshape (t, shp2)
        y = Conv <kernel_shape=[1,1]> (s, w3)
    }"""
    # channel j=1 of both groups (a[1] and a[4]) is dead: removing it keeps the shuffle a shuffle
    m = model_from_text(
        text, w1=w(6, 3, 1, 1, zero_out=[1, 4]), b1=b(6, zero=[1, 4]), w3=w(5, 6, 1, 1),
        shp=np.array([-1, 2, 3, 8, 8], np.int64), shp2=np.array([-1, 6, 8, 8], np.int64),
    )
    pruned, rep = prune(m)
    assert rep.stats["groups_removed"] == 1
    shapes = [const_array(n.inputs[1]).tolist() for n in pruned.graph if n.op_type == "Reshape"]
    assert shapes == [[-1, 2, 2, 8, 8], [-1, 4, 8, 8]]


def test_tf2onnx_style_nhwc_graph_with_pads():
    """tf2onnx: NHWC input, Transpose to NCHW, explicit Pad before a VALID conv, Transpose back at the end."""
    text = HEAD.format(opset=13) + """
    g (float[N,8,8,3] x) => (float[N,8,8,5] y) {
        t = Transpose <perm=[0,3,1,2]> (x)
        a = Conv <kernel_shape=[1,1]> (t, w1, b1)
        r = Relu (a)
        p = Pad (r, pads)
        c = Conv <kernel_shape=[3,3]> (p, w2, b2)
        r2 = Relu (c)
        c3 = Conv <kernel_shape=[1,1]> (r2, w3)
        y = Transpose <perm=[0,2,3,1]> (c3)
    }"""
    m = model_from_text(
        text, w1=w(6, 3, 1, 1, zero_out=[0]), b1=b(6, zero=[0]), w2=w(7, 6, 3, 3, zero_out=[2, 3]), b2=b(7, zero=[2, 3]),
        w3=w(5, 7, 1, 1), pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
    )
    pruned, rep = prune(m)
    assert rep.stats["groups_removed"] == 3
