"""Fold pass: exact, smaller, and it cleans what each exporter leaves behind."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxcc.compiler.calibration import input_specs, random_inputs
from onnxcc.compiler.ir_utils import clone_model
from onnxcc.compiler.pipeline import Pipeline
from onnxcc.compiler.verify import EXACT_RTOL, compare_outputs, run_model
from onnxcc.passes.fold import BN_SCALE_META
from tests.conftest import model_from_text, named_model_from_text


def fold_and_check(model: ir.Model, batch: int = 2):
    """Fold a copy; assert checker + exactness; return (folded, report)."""
    folded = clone_model(model)
    res = Pipeline(["fold"], verify=False).run(folded)
    onnx.checker.check_model(ir.to_proto(folded), full_check=True)
    feeds = random_inputs(input_specs(model), batch=batch, seed=7)
    comp = compare_outputs(run_model(model, feeds), run_model(folded, feeds))
    assert comp.within(EXACT_RTOL), comp.to_json()
    return folded, res.steps[-1].report  # after the upgrade step, where there is one


def ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


@pytest.mark.parametrize(
    "family", ["vgg", "resnet", "resnet_bottleneck", "resnext", "mobilenet_v2", "mobilenet_v3", "efficientnet", "densenet", "inception"]
)
def test_fold_builders_exact_and_bn_gone(tiny_models, family):
    model = tiny_models[family]
    folded, report = fold_and_check(model)
    before, after = ops(model), ops(folded)
    assert sum(after.values()) < sum(before.values())
    assert after["Conv"] == before["Conv"]
    if family == "densenet":
        # pre-activation BN (BN→ReLU→Conv) has nothing to fold into; each is reported
        assert after["BatchNormalization"] == len(report.skipped) > 0
        assert all("not Conv" in s.reason for s in report.skipped)
    else:
        assert after["BatchNormalization"] == 0
    # layer names survive folding (used by --exclude patterns and reports)
    conv_names = {n.name for n in model.graph if n.op_type == "Conv"}
    assert conv_names == {n.name for n in folded.graph if n.op_type == "Conv"}
    # the dynamic batch stays dynamic
    assert not isinstance(folded.graph.inputs[0].shape[0], int)


def test_bn_scale_recorded_for_pruning(tiny_models):
    folded, _ = fold_and_check(tiny_models["resnet"])
    convs = [n for n in folded.graph if n.op_type == "Conv"]
    assert all(BN_SCALE_META in n.meta for n in convs)
    assert all(n.meta[BN_SCALE_META].shape == (n.inputs[1].const_value.shape[0],) for n in convs)


BN_TEXT = """
<ir_version: 8, opset_import: ["" : {opset}]>
g (float[N,4,8,8] x) => (float[N,{cout}] y) {{
    {body}
}}
"""


def _bn_params(c, rng):
    return dict(
        g=rng.uniform(0.5, 1.5, c).astype(np.float32), b=rng.normal(0, 0.3, c).astype(np.float32),
        m=rng.normal(0, 0.3, c).astype(np.float32), v=rng.uniform(0.5, 2, c).astype(np.float32),
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_fold_conv_bn_with_bias_and_groups(bias, group):
    rng = np.random.default_rng(0)
    cb = ", cb" if bias else ""
    body = f"c = Conv <group={group}, pads=[1,1,1,1]> (x, w{cb})\n bn = BatchNormalization (c, g, b, m, v)\n y = ReduceMean <axes=[2,3], keepdims=0> (bn)"
    model = model_from_text(
        BN_TEXT.format(opset=13, cout=8, body=body),
        w=rng.normal(size=(8, 4 // group, 3, 3)).astype(np.float32),
        **({"cb": rng.normal(size=8).astype(np.float32)} if bias else {}),
        **_bn_params(8, rng),
    )
    folded, _ = fold_and_check(model)
    assert ops(folded)["BatchNormalization"] == 0
    assert len(folded.graph.initializers) == 2  # weight + bias, BN params gone


@pytest.mark.parametrize("group", [1, 2])
def test_fold_convtranspose_bn(group):
    rng = np.random.default_rng(1)
    body = f"c = ConvTranspose <group={group}, strides=[2,2]> (x, w)\n bn = BatchNormalization (c, g, b, m, v)\n y = ReduceMean <axes=[2,3], keepdims=0> (bn)"
    model = model_from_text(
        BN_TEXT.format(opset=13, cout=6, body=body),
        w=rng.normal(size=(4, 6 // group, 3, 3)).astype(np.float32), **_bn_params(6, rng),
    )
    folded, _ = fold_and_check(model)
    assert ops(folded) == Counter({"ConvTranspose": 1, "ReduceMean": 1})


@pytest.mark.parametrize("trans_b", [0, 1])
def test_fold_gemm_bn1d(trans_b):
    rng = np.random.default_rng(2)
    text = f"""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,16] x) => (float[N,5] y) {{
        h = Gemm <transB={trans_b}, alpha=0.5, beta=2.0> (x, w, c)
        y = BatchNormalization (h, g, b, m, v)
    }}"""
    w = rng.normal(size=(5, 16) if trans_b else (16, 5)).astype(np.float32)
    model = model_from_text(text, w=w, c=rng.normal(size=5).astype(np.float32), **_bn_params(5, rng))
    folded, _ = fold_and_check(model)
    assert ops(folded) == Counter({"Gemm": 1})
    assert folded.graph.outputs[0].name == "y"  # graph output name kept


def test_bn_not_folded_when_weight_shared():
    rng = np.random.default_rng(3)
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,4,8,8] x) => (float[N,4,8,8] y, float[N,4,4,4] z) {
        c = Conv <pads=[1,1,1,1]> (x, w)
        y = BatchNormalization (c, g, b, m, v)
        z = Conv <pads=[1,1,1,1], strides=[2,2]> (x, w)
    }"""
    model = model_from_text(text, w=rng.normal(size=(4, 4, 3, 3)).astype(np.float32), **_bn_params(4, rng))
    folded, report = fold_and_check(model)
    assert ops(folded)["BatchNormalization"] == 1
    assert any("shared" in s.reason for s in report.skipped)


def test_paddle_style_constant_weights_opset11():
    """paddle2onnx keeps weights in Constant nodes at opset 11: lifted and folded."""
    rng = np.random.default_rng(4)
    w = onnx.numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "wt")
    nodes = [onnx.helper.make_node("Constant", [], ["w"], value=w)]
    for name, arr in _bn_params(8, rng).items():
        nodes.append(onnx.helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(arr, name + "t")))
    nodes += [
        onnx.helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        onnx.helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
        onnx.helper.make_node("Relu", ["bn"], ["y"]),
    ]
    graph = onnx.helper.make_graph(
        nodes, "paddle", [onnx.helper.make_tensor_value_info("x", 1, ["N", 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", 1, ["N", 8, 8, 8])],
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)])
    proto.ir_version = 6
    model = ir.serde.deserialize_model(proto)
    folded, _ = fold_and_check(model)
    assert ops(folded) == Counter({"Conv": 1, "Relu": 1})
    assert set(folded.graph.initializers) == {n.inputs[i].name for n in folded.graph for i in (1, 2) if n.op_type == "Conv"}


def test_tf2onnx_style_transpose_pad_and_shape_chain():
    """NHWC input → Transpose → Pad → Conv, and a Shape→Gather→Concat→Reshape head."""
    rng = np.random.default_rng(5)
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,8,8,3] x) => (float[N,128] y) {
        t = Transpose <perm=[0,3,1,2]> (x)
        p = Pad <mode="constant"> (t, pads)
        c = Conv (p, w, cb)
        r = Relu (c)
        i = Identity (r)
        s = Shape (i)
        n = Gather <axis=0> (s, zero)
        nn = Unsqueeze (n, zero1)
        shp = Concat <axis=0> (nn, minus1)
        y = Reshape (i, shp)
    }"""
    model = model_from_text(
        text,
        pads=np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        w=rng.normal(size=(2, 3, 3, 3)).astype(np.float32), cb=rng.normal(size=2).astype(np.float32),
        zero=np.array(0, np.int64), zero1=np.array([0], np.int64), minus1=np.array([-1], np.int64),
    )
    folded, _ = fold_and_check(model)
    after = ops(folded)
    assert after["Pad"] == 0 and after["Identity"] == 0  # Pad fused into Conv pads
    assert after["Shape"] == 0 and after["Gather"] == 0  # shape chain folded, batch still dynamic
    assert after["Transpose"] == 1
    assert not isinstance(folded.graph.inputs[0].shape[0], int)


def test_dropout_identity_and_duplicate_initializers_removed():
    rng = np.random.default_rng(6)
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,4] x) => (float[N,4] y) {
        a = MatMul (x, w1)
        d = Dropout (a)
        i = Identity (d)
        y = MatMul (i, w2)
    }"""
    w = rng.normal(size=(4, 4)).astype(np.float32)
    model = model_from_text(text, w1=w, w2=w.copy())
    folded, _ = fold_and_check(model)
    assert ops(folded) == Counter({"MatMul": 2})
    assert len(folded.graph.initializers) == 1  # w1 and w2 were identical


def test_opset_upgrade_option():
    text = """
    <ir_version: 7, opset_import: ["" : 11]>
    g (float[N,4] x) => (float[N,4] y) { y = Relu (x) }"""
    model = ir.from_onnx_text(text)
    res = Pipeline([("fold", {"opset": 17})], verify=True).run(model)
    assert model.opset_imports[""] == 17
    assert res.steps[0].vs_previous.max_rel == 0


# ---------------------------------------------------------------- property test
ACTS = ["Relu", "Sigmoid", "HardSwish", "Identity", None]


@st.composite
def conv_stacks(draw):
    """Random stacks of Conv(+bias)(+BN)(+act), with residual Adds, Concats and pooling."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    c = draw(st.sampled_from([2, 4, 6]))
    lines, inits, x, ch = [], {}, "x", c
    for i in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["conv", "conv", "add", "concat", "pool"]))
        if kind == "conv":
            g = draw(st.sampled_from([1, ch])) if ch % 2 == 0 else 1
            cout = ch if g > 1 else draw(st.sampled_from([2, 4, 6]))
            k = draw(st.sampled_from([1, 3]))
            inits[f"w{i}"] = rng.normal(size=(cout, ch // g, k, k)).astype(np.float32)
            args = f"{x}, w{i}"
            if draw(st.booleans()):
                inits[f"cb{i}"] = rng.normal(size=cout).astype(np.float32)
                args += f", cb{i}"
            lines.append(f"c{i} = Conv <group={g}, pads=[{k // 2},{k // 2},{k // 2},{k // 2}]> ({args})")
            x, ch = f"c{i}", cout
            if draw(st.booleans()):
                for n, arr in _bn_params(ch, rng).items():
                    inits[f"{n}{i}"] = arr
                lines.append(f"bn{i} = BatchNormalization ({x}, g{i}, b{i}, m{i}, v{i})")
                x = f"bn{i}"
            act = draw(st.sampled_from(ACTS))
            if act:
                lines.append(f"a{i} = {act} ({x})")
                x = f"a{i}"
        elif kind == "add":
            lines.append(f"s{i} = Add ({x}, {x})")
            x = f"s{i}"
        elif kind == "concat":
            lines.append(f"k{i} = Concat <axis=1> ({x}, {x})")
            x, ch = f"k{i}", ch * 2
        else:
            lines.append(f"p{i} = MaxPool <kernel_shape=[3,3], pads=[1,1,1,1]> ({x})")
            x = f"p{i}"
    lines.append(f"y = ReduceMean <axes=[2,3], keepdims=0> ({x})")
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,{c},6,6] x) => (float[N,{ch}] y) {{ {chr(10).join(lines)} }}"""
    return model_from_text(text, **inits)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_stacks())
def test_property_fold_never_changes_outputs(model):
    folded, _ = fold_and_check(model)
    assert ops(folded)["BatchNormalization"] == 0
    assert ops(folded)["Identity"] == 0


def test_static_dims_of_a_dynamic_shape_are_folded():
    """Legacy-exporter channel shuffle: ``n, c, h, w = x.shape`` with a dynamic batch."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4,3,3] x) => (float[N,4,3,3] y) {
        s = Shape (x)
        n = Gather <axis=0> (s, i0)
        c = Gather <axis=0> (s, i1)
        h = Gather <axis=0> (s, i2)
        w = Gather <axis=0> (s, i3)
        half = Div (c, two)
        un = Unsqueeze (n, a0)
        uc = Unsqueeze (c, a0)
        uhalf = Unsqueeze (half, a0)
        uh = Unsqueeze (h, a0)
        uw = Unsqueeze (w, a0)
        shp5 = Concat <axis=0> (un, two1, uhalf, uh, uw)
        r = Reshape (x, shp5)
        t = Transpose <perm=[0,2,1,3,4]> (r)
        shp4 = Concat <axis=0> (un, uc, uh, uw)
        y = Reshape (t, shp4)
    }"""
    i = {f"i{k}": np.array(k, np.int64) for k in range(4)}
    model = model_from_text(text, two=np.array(2, np.int64), two1=np.array([2], np.int64), a0=np.array([0], np.int64), **i)
    folded, _ = fold_and_check(model, batch=3)
    after = ops(folded)
    assert after["Gather"] == 0 and after["Shape"] == 0 and after["Div"] == 0
    assert after == Counter({"Reshape": 2, "Transpose": 1})
    assert not isinstance(folded.graph.inputs[0].shape[0], int)


@pytest.mark.parametrize("keep", [1, 0])
@pytest.mark.parametrize("opset, axes", [(17, "axes=[2,3], "), (18, ""), (17, "axes=[-1,-2], ")])
def test_reduce_mean_over_spatial_axes_becomes_global_average_pool(opset, axes, keep):
    """torch's adaptive_avg_pool2d(x, 1) / x.mean([2, 3]) → GlobalAveragePool (faster, and has an integer kernel)."""
    args = "(x, ax)" if opset >= 18 else "(x)"
    out = "float[N,4,1,1] y" if keep else "float[N,4] y"
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[N,4,5,5] x) => ({out}) {{
        y = ReduceMean <{axes}keepdims={keep}> {args}
    }}"""
    model = model_from_text(text, **({"ax": np.array([2, 3], np.int64)} if opset >= 18 else {}))
    folded, _ = fold_and_check(model)
    if keep:
        assert ops(folded)["GlobalAveragePool"] == 1 and ops(folded)["ReduceMean"] == 0
    else:  # fold keeps the single ReduceMean (GAP + Flatten is one node more); quantize rewrites it
        from onnxcc.passes.fold import reduce_mean_to_global_pool

        assert ops(folded)["ReduceMean"] == 1
        assert reduce_mean_to_global_pool(folded, squeezed=True) == 1 and ops(folded)["GlobalAveragePool"] == 1
    assert folded.graph.outputs[0].name == "y"


# The torch 1.9 CRNN captcha model (ddddocr) declares its [T, 1, classes] output as
# [1, seqlen]; onnxscript's MaterializeReshapeShape trusted that claim and baked a
# rank-2 shape into the last Reshape, so the folded model computed another shape.
WRONG_OUTPUT_DECL = """
<ir_version: 7, opset_import: ["" : 12]>
g (float[1,2,W] x) => (float[1,seqlen] y) {
    t = Transpose <perm = [2, 0, 1]> (x)
    s = Shape (t)
    i0 = Constant <value = int64 {0}> ()
    i1 = Constant <value = int64 {1}> ()
    d0 = Gather <axis = 0> (s, i0)
    d1 = Gather <axis = 0> (s, i1)
    u0 = Unsqueeze <axes = [0]> (d0)
    u1 = Unsqueeze <axes = [0]> (d1)
    minus1 = Constant <value = int64[1] {-1}> ()
    shape = Concat <axis = 0> (u0, u1, minus1)
    y = Reshape (t, shape)
}
"""


def test_fold_does_not_trust_a_wrong_declared_output_shape():
    model = model_from_text(WRONG_OUTPUT_DECL)
    folded = clone_model(model)
    res = Pipeline(["fold"], verify=False).run(folded)
    for width in (5, 9):
        x = np.random.default_rng(0).normal(size=(1, 2, width)).astype(np.float32)
        want = run_model(model, [{"x": x}])["y"]
        got = run_model(folded, [{"x": x}])["y"]
        assert got.shape == want.shape == (width, 1, 2)
        np.testing.assert_array_equal(got, want)
    # the dynamic width stays dynamic, and no Reshape target was baked in
    assert not isinstance(folded.graph.inputs[0].shape[2], int)
    assert res.steps[0].report.modified


def zoo_style_ir3(seed: int = 0):
    """A model in the classic ONNX model-zoo form: IR 3, opset 8, every initializer also a graph input."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = {
        "conv1_w": rng.normal(0, 0.3, (8, 3, 3, 3)), "conv1_b": rng.normal(0, 0.1, 8),
        "bn_g": rng.uniform(0.5, 1.5, 8), "bn_b": rng.normal(0, 0.1, 8), "bn_m": rng.normal(0, 0.1, 8),
        "bn_v": rng.uniform(0.5, 1.5, 8), "conv2_w": rng.normal(0, 0.3, (16, 8, 3, 3)),
        "fc_w": rng.normal(0, 0.3, (10, 16)), "fc_b": rng.normal(0, 0.1, 10),
    }
    inits = {k: v.astype(np.float32) for k, v in inits.items()}
    nodes = [
        helper.make_node("Conv", ["data", "conv1_w", "conv1_b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "bn_g", "bn_b", "bn_m", "bn_v"], ["b1"], name="bn1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2_w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 16, 16])]
    inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in inits.items()]
    graph = helper.make_graph(nodes, "zoo", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)], producer_name="zoo-style")
    proto.ir_version = 3
    return proto


def test_ir3_model_zoo_files_are_upgraded_as_a_verified_step(cli, tmp_path):
    """IR 3 models list every initializer as a graph input: fold changed nothing ("Conv weight ... is
    not a constant initializer") or broke IR < 4's rule, and quantize blamed the input for its own
    output ("Missing: q26")."""
    src = tmp_path / "zoo.onnx"
    onnx.save(zoo_style_ir3(), src)
    np.save(tmp_path / "cal.npy", np.random.default_rng(0).standard_normal((16, 3, 16, 16)).astype(np.float32))
    r = cli("fold", src, "-o", tmp_path / "f.onnx", "--report", tmp_path / "f.json")
    assert r.code == 0, r.err
    import json

    report = json.loads((tmp_path / "f.json").read_text())
    assert [p["pass"] for p in report["passes"]] == ["upgrade", "fold"]
    assert report["passes"][0]["verify_vs_previous"]["outputs"][0]["rel"] <= EXACT_RTOL
    folded = onnx.load(tmp_path / "f.onnx")
    assert folded.ir_version >= 7 and not {i.name for i in folded.graph.input} & {t.name for t in folded.graph.initializer}
    assert "BatchNormalization" not in {n.op_type for n in folded.graph.node}
    r = cli("quantize", src, "-o", tmp_path / "q.onnx", "--calib", tmp_path / "cal.npy")
    assert r.code == 0, r.err
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    import onnxruntime as ort

    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"data": x})[0]
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.05


PADDLE_STYLE = """
<ir_version: 7, opset_import: ["" : 12]>
g (float[N,3,8,8] x) => (float[N,4] y, float[N,3,4,4] s) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w)
    cb = Add (c, bias)
    sc = Mul (cb, scale)
    r = Relu (sc)
    p = GlobalAveragePool (r)
    f = Flatten (p)
    m = MatMul (f, fw)
    y = Add (m, fb)
    s1 = Slice (x, st0, en, ax2, two)
    s = Slice (s1, st0, en, ax3, two)
}
"""


def test_paddle_style_bias_adds_affine_muls_matmul_adds_and_slice_chains_fold():
    """paddle2onnx writes a conv's bias as a separate Add and a Linear as MatMul + Add; some exports
    write BatchNorm as a Mul/Add pair; YOLOX slices rows then columns. Each folds into one node."""
    rng = np.random.default_rng(0)
    model = named_model_from_text(
        PADDLE_STYLE,
        w=rng.normal(size=(8, 3, 3, 3)).astype(np.float32), bias=rng.normal(size=(1, 8, 1, 1)).astype(np.float32),
        scale=rng.uniform(0.5, 2, (8, 1, 1)).astype(np.float32), fw=rng.normal(size=(8, 4)).astype(np.float32),
        fb=rng.normal(size=4).astype(np.float32), st0=np.array([0], np.int64), en=np.array([2**62], np.int64),
        ax2=np.array([2], np.int64), ax3=np.array([3], np.int64), two=np.array([2], np.int64),
    )
    folded, _ = fold_and_check(model)
    after = ops(folded)
    assert after["Add"] == after["Mul"] == after["MatMul"] == 0
    assert after["Gemm"] == 1 and after["Slice"] == 1
    conv = next(n for n in folded.graph if n.op_type == "Conv")
    assert len(conv.inputs) == 3 and BN_SCALE_META in conv.meta  # the Mul's scale is recorded like a BN's
    assert {v.name for v in folded.graph.outputs} == {"y", "s"}


def _nhwc_block(opset: int = 13, pads_as_attr: bool = False) -> ir.Model:
    """tf2onnx's layout around convs: BN as NHWC Mul/Add, hard-swish, a Pad, SE pooling, a concat."""
    rng = np.random.default_rng(3)
    pad = ('Pad <mode="constant", pads=[0,1,1,0,0,1,1,0]> (h)' if pads_as_attr else 'Pad <mode="constant"> (h, pads)')
    clip = "Clip <min=0.0, max=6.0> (a3)" if opset < 11 else "Clip (a3, zero, six)"
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[N,8,8,3] x) => (float[N,4,4,8] y, float[N,4] z) {{
        t0 = Transpose <perm=[0,3,1,2]> (x)
        c0 = Conv (t0, w0)
        t1 = Transpose <perm=[0,2,3,1]> (c0)
        m = Mul (t1, s0)
        a = Add (m, b0)
        a3 = Add (a, three)
        r6 = {clip}
        hs = Mul (r6, sixth)
        h = Mul (a, hs)
        p = {pad}
        t2 = Transpose <perm=[0,3,1,2]> (p)
        c1 = Conv <group=4> (t2, w1)
        t3 = Transpose <perm=[0,2,3,1]> (c1)
        se = ReduceMean <axes=[1,2], keepdims=1> (t3)
        g2 = Mul (t3, se)
        y = Concat <axis=3> (g2, t3)
        z = ReduceMean <axes=[1,2], keepdims=0> (g2)
    }}"""
    inits = dict(w0=rng.normal(size=(4, 3, 3, 3)).astype(np.float32), s0=rng.uniform(0.5, 1.5, 4).astype(np.float32),
                 b0=rng.normal(size=4).astype(np.float32), three=np.float32(3),
                 sixth=np.float32(1 / 6), w1=rng.normal(size=(4, 1, 5, 5)).astype(np.float32))
    if opset >= 11:
        inits.update(zero=np.float32(0), six=np.float32(6))
    if not pads_as_attr:
        inits["pads"] = np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64)
    return named_model_from_text(text, **inits)


@pytest.mark.parametrize("opset, pads_as_attr", [(13, False), (10, True)])
def test_nhwc_transposes_sink_through_affine_activation_pad_reduce_and_concat(opset, pads_as_attr):
    """Each conv's NHWC↔NCHW pair cancels (BN Mul/Add then folds into the conv, the Pad into its
    pads); what stays is the input's Transpose and one per NHWC graph output."""
    model = _nhwc_block(opset, pads_as_attr)
    folded, report = fold_and_check(model)
    after = ops(folded)
    assert ops(model)["Transpose"] == 4 and after["Transpose"] == 2, after
    assert report.stats["transposes_cancelled"] >= 2
    # BN Mul/Add folded; the hard-swish's Add/Clip/Mul by 1/6 is x · HardSigmoid(x) (HardSwish needs opset 14)
    assert after["Pad"] == 0 and after["Mul"] == 2 and after["Add"] == 0 and after["HardSigmoid"] == 1, after
    conv0 = next(n for n in folded.graph if n.op_type == "Conv")
    assert len(conv0.inputs) == 3  # the BN shift became its bias
    assert [o.name for o in folded.graph.outputs] == ["y", "z"]
    assert not isinstance(folded.graph.outputs[0].shape[0], int)  # the batch stays dynamic


def test_a_transpose_that_cannot_cancel_stays_put():
    """Sinking that would not end with fewer Transposes (a Transpose before a Reshape, one fanned
    out to two ends) leaves the graph as it was."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,4,6,6] x) => (float[N,144] y, float[N,6,6,4] z) {
        t = Transpose <perm=[0,2,3,1]> (x)
        a = Relu (t)
        y = Reshape (a, shp)
        z = Sigmoid (t)
    }"""
    model = named_model_from_text(text, shp=np.array([-1, 144], np.int64))
    folded, report = fold_and_check(model)
    assert ops(folded)["Transpose"] == 1 and report.stats["transposes_cancelled"] == 0


def test_tf2onnx_keras_export_loses_its_layout_transposes_and_quantizes_to_integer_convs(tmp_path):
    """models/tf2onnx_mnv3_tiny.onnx is tf2onnx's own output for a Keras MobileNetV3-style network
    (hard-swish, squeeze-excite, ZeroPadding2D + strided depthwise, residual add): 30 Transposes
    around 15 convs. After fold one is left (the NHWC input's), every BatchNorm Mul/Add and Pad is
    folded into a conv, and INT8 runs every conv as QLinearConv with no float island between them."""
    from onnxcc.compiler.calibration import CalibrationSet
    from onnxcc.compiler.ir_utils import load_model
    from onnxcc.models.make_tf2onnx import SAMPLE
    from onnxcc.passes.quantization.fusion import fusion_report

    model = load_model(SAMPLE)
    before = ops(model)
    assert before["Transpose"] == 30 and before["Conv"] == 15
    folded, _ = fold_and_check(model)
    after = ops(folded)
    assert after["Transpose"] == 1 and after["Pad"] == 0 and after["Conv"] == 15, after
    assert sum(after.values()) <= 0.55 * sum(before.values())
    for conv in (n for n in folded.graph if n.op_type == "Conv"):  # no per-channel Mul/Add left behind a conv
        assert all(u.node.op_type not in ("Mul", "Add") or const_array_or_none(u.node) is None for u in conv.outputs[0].uses())
    calib = CalibrationSet({"input": np.random.default_rng(0).uniform(0, 255, (16, 32, 32, 3)).astype(np.float32)})
    res = Pipeline([("quantize", {"force_int8": True, "force_int8": True})], verify_samples=8).run(folded, calib)
    fus = fusion_report(folded)
    assert fus["ops"].get("com.microsoft:QLinearConv", 0) == 15, fus["ops"]
    assert not fus["float_heavy"]
    assert fus["quantize_linear"] <= 4, fus  # the input, the SE pools, the head
    assert res.steps[-1].vs_original.min_sqnr > 25


def const_array_or_none(node: ir.Node):
    from onnxcc.compiler.ir_utils import const_array

    return next((c for c in (const_array(v) for v in node.inputs) if c is not None and c.size > 1), None)


def _hard_activations(opset: int, scale_op: str) -> ir.Model:
    """paddle2onnx's hard-swish (x · clip(x + 3, 0, 6) / 6), tf2onnx's (x · (clip(x + 3, 0, 6) · 1/6))
    and a squeeze-excite gate (clip(x + 3, 0, 6) / 6) written out in Add/Clip/Mul/Div."""
    rng = np.random.default_rng(5)
    clip = "Clip <min=0.0, max=6.0> ({})" if opset < 11 else "Clip ({}, zero, six)"
    gate = "Div (g1, six)" if scale_op == "Div" else "Mul (g1, sixth)"
    text = f"""
    <ir_version: 8, opset_import: ["" : {opset}]>
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
        c = Conv <pads=[1,1,1,1]> (x, w)
        a = Add (c, three)
        r = {clip.format("a")}
        p = Mul (c, r)
        h = Div (p, six)
        a2 = Add (three, h)
        r2 = {clip.format("a2")}
        s2 = Mul (r2, sixth)
        h2 = Mul (s2, h)
        pool = GlobalAveragePool (h2)
        g0 = Add (pool, three)
        g1 = {clip.format("g0")}
        gate = {gate}
        y = Mul (h2, gate)
    }}"""
    inits = dict(w=rng.normal(size=(4, 4, 3, 3)).astype(np.float32), three=np.float32(3), six=np.float32(6), sixth=np.float32(1 / 6))
    if opset >= 11:
        inits["zero"] = np.float32(0)
    return named_model_from_text(text, **inits)


@pytest.mark.parametrize("opset, scale_op", [(11, "Div"), (13, "Mul"), (14, "Div"), (10, "Mul")])
def test_decomposed_hard_activations_fold_into_their_ops(opset, scale_op):
    """Each 4-node hard-swish becomes HardSwish (opset ≥ 14) or x · HardSigmoid(x), the gate a
    HardSigmoid; exact, and INT8 then runs them with no float island (the Div after the product
    had no integer kernel)."""
    from onnxcc.compiler.calibration import CalibrationSet
    from onnxcc.passes.quantization.fusion import fusion_report

    model = _hard_activations(opset, scale_op)
    folded, _ = fold_and_check(model)
    after = ops(folded)
    assert after["Clip"] == after["Div"] == after["Add"] == 0, after
    if opset >= 14:
        assert after["HardSwish"] == 2 and after["HardSigmoid"] == 1 and after["Mul"] == 1, after
    else:
        assert after["HardSigmoid"] == 3 and after["Mul"] == 3, after
    assert sum(after.values()) == (6 if opset >= 14 else 8)  # from 15
    hs = [n for n in folded.graph if n.op_type == "HardSigmoid"]
    assert all(abs(n.attributes["alpha"].value - 1 / 6) < 1e-7 and abs(n.attributes["beta"].value - 0.5) < 1e-7 for n in hs)
    assert folded.graph.outputs[0].name == "y"
    produced = {o.name for n in folded.graph for o in n.outputs}
    assert {"h", "h2", "gate"} <= produced  # each fused activation's output keeps the exporter's tensor name
    calib = CalibrationSet({"x": np.random.default_rng(0).normal(0, 2, (16, 4, 6, 6)).astype(np.float32)})
    q = clone_model(folded)
    # a conv reads the result, as the next block would: ops whose output only float ops read stay float
    from onnxcc.compiler.ir_utils import add_initializer

    y = q.graph.outputs[0]
    w2 = add_initializer(q.graph, "w2", np.random.default_rng(1).normal(size=(4, 4, 1, 1)).astype(np.float32))
    head = ir.node("Conv", [y, w2], name="head")
    act = ir.node("Sigmoid", [head.outputs[0]], name="act")
    q.graph.append(head)
    q.graph.append(act)
    y.name, act.outputs[0].name = "y_block", "y"
    q.graph.outputs[0] = act.outputs[0]
    Pipeline([("quantize", {"force_int8": True, "force_int8": True})], verify_samples=8).run(q, calib)
    fus = fusion_report(q)
    assert not fus["float_heavy"], fus
    # every product runs as QLinearMul, the gate's last, and no Div is left
    assert fus["ops"].get("Div", 0) == 0 and fus["ops"].get("Mul", 0) == 0, fus
    assert fus["ops"].get("com.microsoft:QLinearMul", 0) == 3, fus


def test_a_clip_that_is_not_a_hard_activation_stays():
    """clip(x + 3, 0, 6) / 4 is no HardSigmoid (s·h ≠ 1): left as written."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,4] x) => (float[N,4] y) {
        a = Add (x, three)
        r = Clip (a, zero, six)
        y = Div (r, four)
    }"""
    model = named_model_from_text(text, three=np.float32(3), zero=np.float32(0), six=np.float32(6), four=np.float32(4))
    folded, _ = fold_and_check(model)
    assert ops(folded) == Counter({"Add": 1, "Clip": 1, "Div": 1})


def test_reshape_chains_merge_where_the_second_shape_allows_it():
    """The torch 1.9 CRNN (ddddocr) reshapes its LSTM output twice, [T,1,2,512] → [T,1,1024] →
    [T,1024], with the first shape computed from a dynamic dim. One Reshape does both where the
    second shape's 0s copy a dim the first copied from x too; elsewhere both stay."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[T,1,2,8] x) => (float[T,16] y, float[T,2,8] z) {
        d = Shape (x)
        t = Gather <axis=0> (d, zero)
        t1 = Unsqueeze (t, zero)
        s1 = Concat <axis=0> (t1, one, minus)
        r1 = Reshape (x, s1)
        y = Reshape (r1, copy_first)
        r2 = Reshape (x, flat)
        z = Reshape (r2, copy_second)
    }"""
    model = named_model_from_text(text, zero=np.array(0, np.int64), one=np.array([1], np.int64), minus=np.array([-1], np.int64),
                                  copy_first=np.array([0, 16], np.int64), flat=np.array([-1, 16], np.int64),
                                  copy_second=np.array([-1, 2, 8], np.int64))
    folded, _ = fold_and_check(model)
    reshapes = [n for n in folded.graph if n.op_type == "Reshape"]
    assert len(reshapes) == 2, ops(folded)  # y: one Reshape straight from x; z's pair became one too (no 0s)
    assert all(n.inputs[0].name == "x" for n in reshapes)
    assert ops(folded)["Shape"] == 0  # the first shape's chain went with it
    assert not isinstance(folded.graph.outputs[0].shape[0], int)  # T stays dynamic

    from onnxcc.passes.fold import merge_reshape_chains

    keep = named_model_from_text("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[T,4] x) => (float[N,2,4] y) {
        r1 = Reshape (x, to8)
        y = Reshape (r1, copy0)
    }""", to8=np.array([-1, 8], np.int64), copy0=np.array([0, 2, -1], np.int64))
    assert merge_reshape_chains(keep) == 0  # the 0 copies r1's first dim (T/2), not x's (T)


def test_channel_shuffle_resize_to_input_size_unit_transposes_and_zero_biases_fold_with_the_batch_dynamic():
    """The patterns torchvision's exports leave for a dynamic batch (each also a slow test on the
    real export, tests/test_torchvision_fold.py): a channel shuffle whose shapes are computed from
    a tensor after a Reshape(-1) (its batch renamed by shape inference) with C // 2 left as a Div;
    a Resize to Shape(x)[0:2] ++ [H, W]; a Transpose that only moves size-1 dims; an Add of a zero
    bias and a Mul by ones. All fold to constants or go, and the batch stays dynamic."""
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,8,4,4] x) => (float[N,8,8,8] y, float[N,2,8] z) {
        r0 = Reshape (x, to5)
        t0 = Transpose <perm=[0,2,1,3,4]> (r0)
        s = Reshape (t0, back)
        d = Shape (s)
        n = Gather <axis=0> (d, i0)
        c = Gather <axis=0> (d, i1)
        half = Div (c, two)
        h = Gather <axis=0> (d, i2)
        w = Gather <axis=0> (d, i3)
        nu = Unsqueeze (n, ax0)
        hu = Unsqueeze (half, ax0)
        hh = Unsqueeze (h, ax0)
        wu = Unsqueeze (w, ax0)
        sh = Concat <axis=0> (nu, two1, hu, hh, wu)
        r1 = Reshape (s, sh)
        t1 = Transpose <perm=[0,2,1,3,4]> (r1)
        r2 = Reshape (t1, back)
        b = Add (r2, zeros)
        m = Mul (b, ones)
        ds = Shape (m)
        nc = Slice (ds, i0_1, i2_1)
        size = Concat <axis=0> (nc, hw)
        y = Resize <mode="linear"> (m, , , size)
        p = GlobalAveragePool (m)
        q = Reshape (p, flat)
        q3 = Reshape (q, split)
        z = Transpose <perm=[0,2,1]> (q3)
    }"""
    model = named_model_from_text(
        text, to5=np.array([0, 2, 4, 4, 4], np.int64), back=np.array([-1, 8, 4, 4], np.int64), i0=np.array(0, np.int64),
        i1=np.array(1, np.int64), i2=np.array(2, np.int64), i3=np.array(3, np.int64), two=np.array(2, np.int64),
        ax0=np.array([0], np.int64), two1=np.array([2], np.int64), zeros=np.zeros((8, 1, 1), np.float32),
        ones=np.ones((1, 8, 1, 1), np.float32), i0_1=np.array([0], np.int64), i2_1=np.array([2], np.int64),
        hw=np.array([8, 8], np.int64), flat=np.array([0, -1], np.int64), split=np.array([0, 8, 1], np.int64))
    folded, _ = fold_and_check(model)
    after = ops(folded)
    assert after["Shape"] == after["Gather"] == after["Div"] == after["Concat"] == after["Slice"] == 0, after
    assert after["Add"] == after["Mul"] == 0, after  # x + 0 and x · 1 are gone
    assert after["Transpose"] == 2, after  # the shuffles' (they move data); z's moved a size-1 dim only
    resize = next(n for n in folded.graph if n.op_type == "Resize")
    assert resize.inputs[2] is not None and list(resize.inputs[2].const_value.numpy()) == [1, 1, 2, 2]
    assert all(not isinstance(v.shape[0], int) for v in [*folded.graph.inputs, *folded.graph.outputs])


def test_a_zero_constant_that_broadcasts_its_operand_stays():
    """x + zeros of a larger shape is a broadcast, not an identity."""
    model = named_model_from_text("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N,1,4] x) => (float[N,3,4] y) {
        y = Add (x, zeros)
    }""", zeros=np.zeros((3, 4), np.float32))
    folded, _ = fold_and_check(model)
    assert ops(folded)["Add"] == 1


#: zeros(batch, 6) from x's dynamic batch, as torch exports an RNN's initial state
ZERO_STATE = """
    s = Shape (x)
    i0 = Constant <value = int64 {0}> ()
    b = Gather <axis = 0> (s, i0)
    ax = Constant <value_ints = [0]> ()
    bu = Unsqueeze (b, ax)
    hid = Constant <value_ints = [6]> ()
    zs = Concat <axis = 0> (bu, hid)
    z = ConstantOfShape <value = float[1] {0}> (zs)
"""

UNROLLED_LSTM_STEP = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[batch, 8] x) => (float[batch, 6] h, float[batch, 6] c) {
    {zeros}
    gx = Gemm <transB = 1> (x, wih, bias)
    gh = Gemm <transB = 1> (z, whh)
    gates = Add (gx, gh)
    i, f, o, u = Split <axis = 1, num_outputs = 4> (gates)
    si = Sigmoid (i)
    sf = Sigmoid (f)
    so = Sigmoid (o)
    tu = Tanh (u)
    fc = Mul (sf, z)
    iu = Mul (si, tu)
    c = Add (fc, iu)
    tc = Tanh (c)
    h = Mul (so, tc)
}"""


def _unrolled_lstm(text: str = UNROLLED_LSTM_STEP) -> ir.Model:
    rng = np.random.default_rng(8)
    return model_from_text(text.replace("{zeros}", ZERO_STATE), wih=rng.normal(size=(24, 8)).astype(np.float32), whh=rng.normal(size=(24, 6)).astype(np.float32),
                           bias=rng.normal(size=24).astype(np.float32))


@pytest.mark.parametrize("batch", [1, 3])
def test_zero_initial_state_of_an_unrolled_lstm_goes_with_a_dynamic_batch(batch):
    """torch's exporter unrolls an LSTM from h0 = c0 = zeros(batch, hidden) built from the input's
    dynamic batch (Shape → Gather → Unsqueeze → Concat → ConstantOfShape): not a constant, so
    constant folding kept ``h0 @ W_hh`` and ``f · c0`` (the captcha CRNN: 689 nodes against
    onnxsim's 676 at a fixed batch). Adding a tensor that is zero at run time goes; the batch stays
    dynamic and the step is exact at any batch."""
    model = _unrolled_lstm()
    folded, _ = fold_and_check(model, batch=batch)
    assert ops(folded) == Counter({"Gemm": 1, "Split": 1, "Sigmoid": 2, "Tanh": 2, "Mul": 2})
    assert not isinstance(folded.graph.inputs[0].shape[0], int)


def test_a_zero_tensor_that_broadcasts_the_other_operand_stays():
    """``x[1, 6] + zeros[batch, 6]`` has the zeros' batch: dropping the Add would change the
    output's shape, so it stays."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, 8] x, float[1, 6] y) => (float[batch, 6] out) {
        {zeros}
        out = Add (y, z)
    }"""
    folded, _ = fold_and_check(ir.from_onnx_text(text.replace("{zeros}", ZERO_STATE)), batch=3)
    assert ops(folded)["Add"] == 1


def test_zeros_times_an_input_that_may_hold_inf_stay():
    """``zeros @ w`` is zero only for a finite ``w`` (inf · 0 is NaN): with ``w`` a graph input the
    Add stays."""
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[batch, 8] x, float[6, 6] w) => (float[batch, 6] out) {
        {zeros}
        p = MatMul (z, w)
        v = Slice (x, st, en, axs)
        out = Add (v, p)
    }"""
    model = model_from_text(text.replace("{zeros}", ZERO_STATE), st=np.array([0], np.int64), en=np.array([6], np.int64),
                            axs=np.array([1], np.int64))
    folded, _ = fold_and_check(model, batch=2)
    assert ops(folded)["Add"] == 1 and ops(folded)["MatMul"] == 1


@pytest.mark.parametrize("batch", [1, 3])
def test_tf2onnx_squeeze_excite_squeeze_and_reshape_back_go(batch):
    """tf2onnx writes a Keras squeeze-excite as GlobalAveragePool → Squeeze → Reshape([-1, C, 1, 1])
    → Conv, and Reshape([-1, C', 1, 1]) again after the activation: with a dynamic batch each
    Reshape gives back the tensor's own shape (Keras EfficientNet-B0: 290 nodes against onnxsim's
    242). The Squeeze is bypassed, the no-op Reshapes go; a Reshape that changes the shape stays."""
    rng = np.random.default_rng(9)
    text = """
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[N, 8, 4, 4] x) => (float[N, 8, 4, 4] y, float[N, 128] flat) {
        p = GlobalAveragePool (x)
        sq = Squeeze (p, axes)
        r = Reshape (sq, s8)
        c = Conv (r, w1, b1)
        sg = Sigmoid (c)
        m = Mul (c, sg)
        r2 = Reshape (m, s2)
        e = Conv (r2, w2, b2)
        g = Sigmoid (e)
        y = Mul (x, g)
        flat = Reshape (y, sflat)
    }"""
    model = model_from_text(text, axes=np.array([2, 3], np.int64), s8=np.array([-1, 8, 1, 1], np.int64),
                            s2=np.array([-1, 2, 1, 1], np.int64), sflat=np.array([-1, 128], np.int64),
                            w1=rng.normal(size=(2, 8, 1, 1)).astype(np.float32), b1=rng.normal(size=2).astype(np.float32),
                            w2=rng.normal(size=(8, 2, 1, 1)).astype(np.float32), b2=rng.normal(size=8).astype(np.float32))
    folded, _ = fold_and_check(model, batch=batch)
    assert ops(folded)["Squeeze"] == 0 and ops(folded)["Reshape"] == 1  # only the flattening one
    assert not isinstance(folded.graph.inputs[0].shape[0], int)


#: torch's as_strided after a pool, as the dynamo exporter writes it (ConvNeXt-Tiny's flatten):
#: Gather(Reshape(x, [-1]), Unsqueeze(Range(0, batch) * 12) + arange(12) shaped like one sample)
AS_STRIDED = """
<ir_version: 8, opset_import: ["" : 18]>
g (float[batch, 3, 2, 2] x{second}) => (float[batch, 3, 2, 2] y) {{
    r = Relu (x)
    s = Shape <start = 0, end = 1> ({limit_of})
    n = Squeeze (s)
    ids = Range (zero, n, one)
    m = Mul (ids, per)
    u = Unsqueeze (m, axes)
    idx = Add (u, grid)
    flat = Reshape (r, minus_one)
    c = Gather <axis = 0> (flat, idx)
    y = Sigmoid (c)
}}"""


@pytest.mark.parametrize("grid, limit_of, kept", [("arange", "x", False), ("permuted", "x", True), ("arange", "other", True)],
                         ids=["identity", "permuted-indices", "another-tensors-batch"])
def test_dynamo_as_strided_copy_goes_with_the_batch_dynamic(grid, limit_of, kept):
    """``Gather`` of the flattened tensor at indices that list its elements in order is a copy: it
    goes with its Range/Mul/Unsqueeze/Add/Shape chain (ConvNeXt-Tiny dynamo: 189 → 181 nodes,
    onnxsim 186 at a fixed batch), the batch stays dynamic. Indices in another order, or a range
    over a dim not known to be x's batch, are kept."""
    values = np.arange(12, dtype=np.int64).reshape(1, 3, 2, 2)
    if grid == "permuted":
        values = values[:, ::-1].copy()
    text = AS_STRIDED.format(second=", float[other_batch, 1] other" if limit_of == "other" else "", limit_of=limit_of)
    model = model_from_text(text, zero=np.array(0, np.int64), one=np.array(1, np.int64), per=np.array(12, np.int64),
                            axes=np.array([1, 2, 3], np.int64), grid=values, minus_one=np.array([-1], np.int64))
    if limit_of == "other":
        folded = clone_model(model)
        Pipeline(["fold"], verify=False).run(folded)
    else:
        folded, _ = fold_and_check(model, batch=3)
    assert (ops(folded)["Gather"] == 1) is kept and (ops(folded)["Range"] == 1) is kept
    assert not isinstance(folded.graph.inputs[0].shape[0], int) and not isinstance(folded.graph.outputs[0].shape[0], int)


@pytest.mark.parametrize("keep", [False, True])
def test_exporter_debug_metadata_is_dropped_unless_kept(keep):
    # torch's dynamo exporter annotates every node (stack trace, fx node, module path: about 1.4 kB
    # a node, 9% of a ShuffleNetV2's INT8 file); the model's own metadata stays
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 4] x) => (float[N, 4] y) {
            a = Relu (x)
            y = Sigmoid (a)
        }
    """
    model = model_from_text(text)
    model.metadata_props["author"] = "someone"
    for node in model.graph:
        node.metadata_props["pkg.torch.onnx.stack_trace"] = "File model.py, line 10" * 20
        node.metadata_props["namespace"] = ": torch.nn.Module/relu"
        node.metadata_props["user.note"] = "kept"
    model.graph.outputs[0].metadata_props["pkg.torch.onnx.original_node_name"] = "sigmoid"
    res = Pipeline([("fold", {"exporter_metadata": keep})], verify_samples=2).run(model)
    props = [dict(n.metadata_props) for n in model.graph]
    assert all(p["user.note"] == "kept" for p in props) and model.metadata_props["author"] == "someone"
    assert all(("namespace" in p and "pkg.torch.onnx.stack_trace" in p) == keep for p in props)
    assert ("pkg.torch.onnx.original_node_name" in model.graph.outputs[0].metadata_props) == keep
    dropped = res.steps[0].report.stats.get("exporter_metadata_dropped")
    assert (dropped is None) if keep else dropped > 2 * 20 * len("File model.py, line 10")
