"""Dynamic INT8 (MatMul/Gemm): the subgraph onnxruntime fuses into DynamicQuantizeMatMul, agreement with fp32."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.calibration import input_specs, random_inputs
from onnxcc.compiler.ir_utils import clone_model
from onnxcc.compiler.pipeline import Pipeline
from onnxcc.compiler.verify import compare_outputs, run_model
from onnxcc.passes.quantization.fusion import fusion_report
from tests.conftest import named_model_from_text

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, T, 64] x) => (float[N, T, 10] y) {
    h = MatMul(x, W1)
    hb = Add(h, b1)
    r = Relu(hb)
    g = MatMul(r, W2)
    y = Add(g, b2)
}
"""


def _mlp() -> ir.Model:
    rng = np.random.default_rng(0)
    return named_model_from_text(
        MLP,
        W1=rng.normal(0, 0.2, (64, 128)).astype(np.float32),
        b1=rng.normal(0, 0.1, 128).astype(np.float32),
        W2=rng.normal(0, 0.1, (128, 10)).astype(np.float32),
        b2=np.zeros(10, np.float32),
    )


def _run(model: ir.Model, batch: int = 8, **options):
    ref = clone_model(model)
    res = Pipeline([("quantize-dynamic", options)], verify=False).run(model)
    feeds = random_inputs(input_specs(ref), batch=batch, seed=3, overrides={"x": (batch, 5, 64)} if ref.graph.inputs[0].name == "x" else None)
    return res.steps[0].report, compare_outputs(run_model(ref, feeds), run_model(model, feeds))


def test_matmul_chain_fuses_into_dynamic_quantize_matmul_and_agrees():
    model = _mlp()
    rep, cmp = _run(model)
    assert sorted(rep.changed) == ["g", "h"]
    assert rep.stats["fusion"]["fused"] == 2  # onnxruntime ran both as DynamicQuantizeMatMul
    assert not any(n.op_type == "MatMul" for n in model.graph)
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert cmp.outputs[0].sqnr_db > 30  # stated: >30 dB on this 3-D MLP
    w8 = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.INT8 and v.const_value.shape.rank() == 2]
    assert len(w8) == 2


def test_gemm_head_with_transb_alpha_beta(folded):
    model = folded("vgg")
    n_gemm = sum(n.op_type == "Gemm" for n in model.graph)
    rep, cmp = _run(model, min_size=16)
    assert n_gemm >= 2 and len(rep.changed) == n_gemm
    assert rep.stats["fusion"]["fused"] == n_gemm
    assert all("Conv stays float" in s.reason for s in rep.skipped if s.layer != "model")
    assert cmp.outputs[0].sqnr_db > 15 and cmp.outputs[0].cosine > 0.99


def test_gemm_alpha_beta_and_transb_are_folded_exactly_in_the_weights():
    rng = np.random.default_rng(1)
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 48] x) => (float[N, 32] y) {
        y = Gemm <alpha: float = 0.5, beta: float = 2.0, transB: int = 1> (x, W, C)
    }
    """
    model = named_model_from_text(text, W=rng.normal(size=(32, 48)).astype(np.float32), C=rng.normal(size=32).astype(np.float32))
    ref = clone_model(model)
    Pipeline([("quantize-dynamic", {"min_size": 16})], verify=False).run(model)
    feeds = random_inputs(input_specs(ref), batch=4, seed=0)
    assert compare_outputs(run_model(ref, feeds), run_model(model, feeds)).outputs[0].sqnr_db > 30


def test_refuses_quantized_models_and_skips_non_constant_weights():
    text = """
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 48] x, float[48, 32] w) => (float[N, 32] y) {
        y = MatMul(x, w)
    }
    """
    model = named_model_from_text(text)
    res = Pipeline([("quantize-dynamic", {})], verify=False).run(model)
    assert not res.steps[0].report.modified
    assert "not a constant" in res.steps[0].report.skipped[0].reason


def test_cli_dynamic_needs_no_calibration(cli, tmp_path):
    from onnxcc.compiler.ir_utils import save_model

    src = tmp_path / "mlp.onnx"
    save_model(_mlp(), src)
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "-o", out, "--dynamic", "--input-shape", "x:4x5x64")
    assert r.code == 0, r.err
    from onnxcc.compiler.ir_utils import load_model

    fused = fusion_report(load_model(out))["ops"].get("com.microsoft:DynamicQuantizeMatMul", 0)
    assert fused == 2
    r = cli("quantize", src, "-o", tmp_path / "x.onnx", "--dynamic", "--fp16")
    assert r.code == 2 and "alternatives" in r.err


def test_default_weights_give_the_same_result_on_every_x86_cpu():
    """7-bit weights: onnxruntime's int8 GEMM gives the same outputs whether it adds products in
    saturating int16 (AVX2 without VNNI) or exactly ("session.x64quantprecision", which promotes
    to int16 operands and int32 sums, as a VNNI kernel computes): the model does not depend on
    the CPU it runs on."""
    import onnxruntime as ort

    model = _mlp()
    ref = clone_model(model)
    rep = Pipeline([("quantize-dynamic", {})], verify=False).run(model).steps[0].report
    assert rep.stats["weight_bits"] == 7
    feeds = random_inputs(input_specs(ref), batch=8, seed=3, overrides={"x": (8, 5, 64)})[0]
    y_ref = run_model(ref, [feeds])["y"]
    outs = []
    for exact in ("0", "1"):
        so = ort.SessionOptions()
        so.add_session_config_entry("session.x64quantprecision", exact)
        outs.append(ort.InferenceSession(ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-5 * float(np.abs(y_ref).max()))
    assert compare_outputs({"y": y_ref}, {"y": outs[0]}).outputs[0].sqnr_db > 30


LSTM_NET = """
<ir_version: 8, opset_import: ["" : 17]>
rnn (float[7, 3, 32] x) => (float[7, 2, 3, 48] y, float[3, 7, 96] z) {
    y, yh = LSTM <direction = "bidirectional", hidden_size = 48> (x, W, R, B)
    t = Transpose <perm = [2, 0, 1, 3]> (y)
    s = Constant <value_ints = [0, 0, 96]> ()
    r = Reshape(t, s)
    z = Relu(r)
}
"""


def _lstm_net(layout: int = 0) -> ir.Model:
    rng = np.random.default_rng(1)
    model = named_model_from_text(
        LSTM_NET,
        W=rng.normal(0, 0.15, (2, 192, 32)).astype(np.float32),
        R=rng.normal(0, 0.1, (2, 192, 48)).astype(np.float32),
        B=rng.normal(0, 0.1, (2, 384)).astype(np.float32),
    )
    if layout:
        next(n for n in model.graph if n.op_type == "LSTM").attributes["layout"] = ir.AttrInt64("layout", 1)
    return model


def test_lstm_becomes_dynamic_quantize_lstm_and_agrees():
    """An LSTM with constant weights runs as onnxruntime's DynamicQuantizeLSTM (int8 weights per gate
    row, transposed as the contrib op reads them); both outputs keep their names and agree with fp32."""
    model = _lstm_net()
    ref = clone_model(model)
    res = Pipeline([("quantize-dynamic", {})], verify=False).run(model)
    rep = res.steps[0].report
    ops = [(n.domain, n.op_type) for n in model.graph]
    assert ("com.microsoft", "DynamicQuantizeLSTM") in ops and ("", "LSTM") not in ops
    assert rep.stats["layers"][rep.changed[0]]["W_sqnr_db"] > 35
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    assert "W" not in model.graph.initializers and "R" not in model.graph.initializers  # no float copy left
    feeds = [{"x": np.random.default_rng(2).normal(0, 1, (7, 3, 32)).astype(np.float32)}]
    cmp = compare_outputs(run_model(ref, feeds), run_model(model, feeds))
    assert cmp.min_sqnr > 25, cmp
    from onnxcc.compiler.analysis import analyze
    assert analyze(model).macs == analyze(ref).macs == 7 * 3 * 2 * 4 * 48 * (32 + 48)  # counted as the LSTM's


def test_lstm_with_batch_first_layout_stays_float_with_its_reason():
    model = _lstm_net(layout=1)
    res = Pipeline([("quantize-dynamic", {})], verify=False).run(model)
    assert any(n.op_type == "LSTM" for n in model.graph)
    assert any("layout=1" in s.reason for s in res.steps[0].report.skipped)
