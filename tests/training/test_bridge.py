"""The graph-to-torch bridge: it computes what onnxruntime computes before any training, on graphs
from every exporter onnxcc meets, one step lowers the loss, and writing back changes constants only."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from onnxcc.compiler.calibration import CalibrationSet, input_specs, random_inputs  # noqa: E402
from onnxcc.compiler.ir_utils import clone_model, load_model  # noqa: E402
from onnxcc.compiler.pipeline import Pipeline  # noqa: E402
from onnxcc.compiler.verify import run_model  # noqa: E402
from onnxcc.passes.training.bridge import GraphModule, UnsupportedGraph  # noqa: E402
from tests.conftest import model_from_text  # noqa: E402

pytestmark = pytest.mark.torch
torch.set_num_threads(2)
MODELS = __import__("pathlib").Path(__file__).resolve().parents[2] / "models"


def _agree(model: ir.Model, batch: int = 2, overrides=None, rtol: float = 1e-5) -> GraphModule:
    """The bridge's outputs equal onnxruntime's (unoptimized) to float rounding; returns the module."""
    feeds = random_inputs(input_specs(model), 1, seed=0, batch=batch, overrides=overrides)[0]
    ref = run_model(model, [feeds])
    gm = GraphModule(model)
    with torch.no_grad():
        out = gm(feeds)
    assert len(out) == len(ref)
    for o, r in zip(out, ref.values()):
        assert o.shape == r.shape
        scale = max(float(np.abs(r).max()), 1e-6)
        assert float(np.abs(o.numpy() - r).max()) <= rtol * scale, (float(np.abs(o.numpy() - r).max()), scale)
    return gm


def _signature(model: ir.Model):
    """Everything but the constants' values: nodes, names, inputs, outputs, dtypes, dynamic axes."""
    g = model.graph
    nodes = [(n.op_type, n.name, [v.name if v is not None else None for v in n.inputs], [v.name for v in n.outputs],
              sorted(n.attributes)) for n in g]
    io = [(v.name, v.dtype, str(v.shape)) for v in (*g.inputs, *g.outputs)]
    inits = sorted((k, v.const_value.dtype, tuple(v.const_value.shape)) for k, v in g.initializers.items())
    return nodes, io, inits


@pytest.mark.parametrize("dynamo", [False, True])
def test_both_torch_exporters_graphs_agree_with_onnxruntime(tmp_path, dynamo):
    from tests.torch_zoo import export, make

    net, hw = make("mobilenet_v3")
    path = export(net.eval(), hw, tmp_path / "m.onnx", dynamo=dynamo, optimize=False)
    gm = _agree(load_model(path))
    assert gm.trainable_summary()["float"] >= 20  # every conv weight, BN scale and bias, the classifier


def test_tf2onnx_nhwc_graph_agrees():
    """tf2onnx's Keras MobileNetV3 export: NHWC Transposes, Pads, HardSwish as Mul/Add/Relu6."""
    gm = _agree(load_model(MODELS / "tf2onnx_mnv3_tiny.onnx"))
    assert gm.trainable_summary()["float"] > 0


def test_paddle_style_constant_weights_opset11_train_and_write_back_into_the_constant_nodes():
    rng = np.random.default_rng(0)
    w = ", ".join(f"{v:.4f}" for v in rng.normal(size=8 * 3 * 9))
    text = """
        <ir_version: 6, opset_import: ["" : 11]>
        g (float[N, 3, H, W] x) => (float[N, 8] y) {
            w = Constant <value = float[8, 3, 3, 3] {""" + w + """}> ()
            b = Constant <value = float[8] {0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8}> ()
            a = Conv <kernel_shape: ints = [3, 3], pads: ints = [1, 1, 1, 1]> (x, w, b)
            r = Relu (a)
            m = ReduceMean <axes: ints = [2, 3], keepdims: int = 0> (r)
            s = Unsqueeze <axes: ints = [2]> (m)
            y = Squeeze <axes: ints = [2]> (s)
        }"""
    model = model_from_text(text)
    gm = _agree(model, overrides={"x": (2, 3, 10, 12)})
    assert gm.trainable_summary()["float"] == 2
    before = _signature(model)
    with torch.no_grad():
        for p in gm.parameters():
            p.mul_(0.5)
    gm.write_back()
    assert _signature(model) == before
    w_after = next(n for n in model.graph if n.outputs[0].name == "w").attributes["value"].as_tensor().numpy()
    assert np.allclose(w_after.reshape(-1)[:3], 0.5 * np.array([float(v) for v in w.split(", ")[:3]]), atol=1e-4)


def test_qdq_graph_agrees_and_trains_its_int8_weights(tmp_path):
    """The quantize pass's output: int8 weights, int32 biases, activation Q/DQ pairs."""
    model = load_model(MODELS / "sample_resnet.onnx")
    calib = CalibrationSet.load(MODELS / "sample_calib.npy", model)
    Pipeline(["fold", ("quantize", {})], verify=False).run(model, calib)
    gm = _agree(model)
    s = gm.trainable_summary()
    assert s["float"] == 0 and s["quantized"] >= 10  # every weight is int8 behind a DequantizeLinear


def test_lstm_graph_agrees():
    """A torch-1.x-style CRNN head: ONNX LSTM, bidirectional."""
    rng = np.random.default_rng(1)
    H, I = 5, 4
    model = model_from_text(
        """
        <ir_version: 8, opset_import: ["" : 12]>
        g (float[T, N, 4] x) => (float[T, 2, N, 5] y) {
            y, yh, yc = LSTM <hidden_size: int = 5, direction: string = "bidirectional"> (x, W, R, B)
        }""", W=rng.normal(size=(2, 4 * H, I)).astype(np.float32), R=rng.normal(size=(2, 4 * H, H)).astype(np.float32),
        B=rng.normal(size=(2, 8 * H)).astype(np.float32))
    gm = _agree(model, overrides={"x": (6, 3, 4)})
    assert gm.trainable_summary()["float"] == 3


def test_one_step_lowers_the_loss_and_write_back_keeps_the_graph():
    model = load_model(MODELS / "sample_resnet.onnx")
    gm = GraphModule(model)
    x = torch.from_numpy(np.load(MODELS / "sample_calib.npy")[:8])
    target = torch.zeros(8, dtype=torch.long)
    opt = torch.optim.SGD(gm.parameters(), lr=1e-2)
    name = model.graph.inputs[0].name
    loss0 = torch.nn.functional.cross_entropy(gm({name: x})[0], target)
    opt.zero_grad()
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = torch.nn.functional.cross_entropy(gm({name: x})[0], target)
    assert float(loss1) < float(loss0.detach())
    before = _signature(model)
    ref = run_model(clone_model(model), [{name: x.numpy()}])
    gm.write_back()
    assert _signature(model) == before  # node list, names, dtypes, dynamic axes unchanged
    after = run_model(model, [{name: x.numpy()}])
    with torch.no_grad():
        torch_out = gm({name: x})[0].numpy()
    out = next(iter(after.values()))
    assert not np.allclose(out, next(iter(ref.values())))  # the trained values are in the graph ...
    assert np.allclose(out, torch_out, rtol=1e-4, atol=1e-4)  # ... and onnxruntime computes what torch trained


def test_unsupported_ops_are_refused_in_one_line():
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, 8, 8] x) => (float[N, 3, 8, 8] y) {
            y = LRN <size: int = 3> (x)
        }""")
    with pytest.raises(UnsupportedGraph) as e:
        GraphModule(model)
    assert "LRN" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", ["int4", "ternary", "fp16"])
def test_weight_only_graphs_agree_and_write_back_in_their_storage_type(dtype):
    """Blocked int4 codes, binary/ternary codes (int4 in {-1, 0, 1}) and fp16 weights behind a Cast."""
    model = load_model(MODELS / "sample_resnet.onnx")
    Pipeline(["fold", ("weight-only", {"dtype": dtype, "block_size": 16})], verify=False).run(model)
    gm = _agree(model)
    s = gm.trainable_summary()
    assert s["quantized"] + s["float"] >= 10
    before = _signature(model)
    with torch.no_grad():
        for p in gm.parameters():
            p.mul_(1.01)
    gm.write_back()
    assert _signature(model) == before  # int4 stays int4, fp16 stays fp16
    _agree(model)  # and onnxruntime still runs what torch computes


def test_codebook_graph_trains_its_levels_and_assignments_and_keeps_zeros():
    model = load_model(MODELS / "sample_resnet.onnx")
    Pipeline(["fold", ("sparsify", {"sparsity": 0.5}), ("codebook", {"bits": 4})], verify=False).run(model)
    gm = _agree(model)
    assert gm.codebooks
    zeros_before = {cb.indices.name: (gm._static(cb.book).numpy()[_idx(cb)] == 0) for cb in gm.codebooks.values()}
    before = _signature(model)
    with torch.no_grad():
        for cb in gm.codebooks.values():
            getattr(gm, cb.param).mul_(1.3)  # move the latent weights: assignments change
    gm.write_back()
    assert _signature(model) == before  # uint4 indices stay uint4, the Gather stays
    gm2 = _agree(model)
    for cb in gm2.codebooks.values():
        w = gm2._static(cb.book).numpy()[_idx(cb)]
        assert np.all(w[zeros_before[cb.indices.name]] == 0)  # sparsity kept


def _idx(cb):
    from onnxcc.compiler.ir_utils import const_array

    return np.asarray(const_array(cb.indices)).astype(np.int64)
