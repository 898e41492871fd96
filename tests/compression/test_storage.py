"""Storage compression: sparsity hits its target, codebook rebuild is exact, binary/ternary take only allowed values."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcc.compiler.calibration import CalibrationSet, input_specs, random_inputs
from onnxcc.compiler.ir_utils import clone_model, const_array
from onnxcc.compiler.pipeline import Pipeline
from onnxcc.compiler.verify import compare_outputs, run_model
from onnxcc.passes.compression.codebook import cluster, kmeans_1d
from onnxcc.compiler.sessions import optimized_graph


def _calib(model, n=32):
    return CalibrationSet(random_inputs(input_specs(model), batch=n, seed=5)[0])


def _weights(model):
    return {n.name: const_array(n.inputs[1]) for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul") and const_array(n.inputs[1]) is not None}


@pytest.mark.parametrize("sparsity", [0.3, 0.7])
def test_per_layer_sparsity_hits_its_target(folded, sparsity):
    model = folded("resnet")
    res = Pipeline([("sparsify", {"sparsity": sparsity, "min_size": 64})], verify_samples=4).run(model)
    rep = res.steps[0].report
    for name, w in _weights(model).items():
        if name in rep.stats["layers"]:
            assert abs(np.mean(w == 0) - sparsity) <= 1.0 / w.size + 1e-9, name
    assert rep.stats["size_after"]["zipped_bytes"] < rep.stats["size_before"]["zipped_bytes"]
    assert rep.stats["size_after"]["bytes"] == rep.stats["size_before"]["bytes"]  # dense tensors: only zip shrinks


def test_global_threshold_hits_the_overall_target(folded):
    model = folded("vgg")
    rep = Pipeline([("sparsify", {"sparsity": 0.6, "global_threshold": True, "min_size": 64})], verify=False).run(model).steps[0].report
    assert abs(rep.stats["sparsity"] - 0.6) < 0.01
    per = [v["sparsity"] for v in rep.stats["layers"].values()]
    assert max(per) - min(per) > 0.05  # a global threshold prunes layers unevenly


def test_masked_refit_keeps_the_sparsity_pattern_exactly(folded):
    """(Its accuracy gain is measured on trained networks: tests/compression/test_storage_trained.py.)"""
    base = folded("vgg")
    calib = _calib(base, 64)
    out = {}
    for refit in (False, True):
        m = clone_model(base)
        res = Pipeline([("sparsify", {"sparsity": 0.6, "reconstruct": refit, "min_size": 64})], verify_samples=16).run(m, calib)
        out[refit] = (res.steps[0].vs_original.min_sqnr, _weights(m))
    assert np.isfinite(out[True][0])
    for name, w in out[False][1].items():
        # no pruned weight comes back (ridge may also zero the weights of inputs that are always 0)
        assert np.all(out[True][1][name][w == 0] == 0), name


def test_kmeans_is_deterministic_and_optimal_on_separated_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(c, 0.01, 500) for c in (-1.0, 0.2, 3.0)])
    c, idx = kmeans_1d(x, 3, seed=0)
    assert np.allclose(c, [-1.0, 0.2, 3.0], atol=0.01)
    c2, idx2 = kmeans_1d(x, 3, seed=0)
    assert np.array_equal(c, c2) and np.array_equal(idx, idx2)
    w = np.where(rng.random((64, 32)) < 0.5, 0.0, rng.normal(size=(64, 32))).astype(np.float32)
    book, ids = cluster(w, 3)
    assert book[0] == 0.0 and book.size <= 8 and np.all(book[ids][w == 0] == 0) and np.all(book[ids][w != 0] != 0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codebook_rebuild_is_exact_and_folded_at_session_start(folded, bits):
    model = folded("resnet")
    float_ops = sorted(n.op_type for n in optimized_graph(model).graph.node)
    ref = clone_model(model)
    rep = Pipeline([("codebook", {"bits": bits, "min_size": 64})], verify=False).run(model).steps[0].report
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert rep.changed and rep.stats["index_type"] == ("uint4" if bits <= 4 else "uint8")
    # the clustered weights, computed here, substituted into the float model: same outputs to float rounding
    by_name = {n.name: n for n in model.graph}
    expected = clone_model(ref)
    for node in expected.graph:
        if node.name in rep.changed:
            gather = by_name[node.name].inputs[1].producer()
            book = const_array(gather.inputs[0])
            idx = const_array(gather.inputs[1].producer().inputs[0]).astype(np.int64)
            assert book.size <= 2**bits and idx.dtype == np.int64
            w = const_array(node.inputs[1])
            assert np.array_equal(book[idx].shape, w.shape)
            node.inputs[1].const_value = ir.tensor(book[idx])
    feeds = random_inputs(input_specs(ref), batch=2, seed=0)
    assert compare_outputs(run_model(expected, feeds), run_model(model, feeds)).within(1e-5)
    # onnxruntime folds Cast+Gather at session start: the optimized graph is the float model's
    assert sorted(n.op_type for n in optimized_graph(model).graph.node) == float_ops


def test_sparse_layers_keep_their_zeros_through_the_codebook(folded):
    model = folded("vgg")
    res = Pipeline([("sparsify", {"sparsity": 0.7, "min_size": 64}), ("codebook", {"bits": 3, "min_size": 64})], verify=False).run(model)
    rep = res.steps[1].report
    assert all(v["zero_centroid"] for v in rep.stats["layers"].values())
    assert rep.stats["size_after"]["zipped_bytes"] < 0.25 * res.steps[0].report.stats["size_before"]["zipped_bytes"]


@pytest.mark.parametrize("kind, allowed", [("binary", {-1, 1}), ("ternary", {-1, 0, 1})])
def test_binary_and_ternary_weights_take_only_the_allowed_values(folded, kind, allowed):
    model = folded("resnet")
    res = Pipeline([("weight-only", {"dtype": kind, "min_size": 64})], verify_samples=8).run(model)
    rep = res.steps[0].report
    assert rep.changed and "without fine-tuning" in rep.stats["warning"]
    n = 0
    for node in model.graph:
        if node.op_type == "DequantizeLinear":
            q = node.inputs[0].const_value
            assert q.dtype == ir.DataType.INT4
            vals = set(np.unique(q.numpy().astype(np.int8)).tolist())
            assert vals <= allowed and (kind == "binary" or 0 in vals)
            n += 1
    assert n == len(rep.changed)
    assert res.steps[0].vs_original is not None  # the accuracy cost is measured and reported


def test_cli_sparsify_codebook_compress(cli, tmp_path, resnet_path):
    x = np.random.default_rng(0).normal(size=(32, 3, 32, 32)).astype(np.float32)
    from onnxcc.compiler.ir_utils import load_model

    spec = input_specs(load_model(resnet_path))[0]
    x = random_inputs([spec], batch=32, seed=0)[0][spec.name]
    np.save(tmp_path / "c.npy", x)
    r = cli("sparsify", resnet_path, "-o", tmp_path / "s.onnx", "--sparsity", "0.5", "--report", tmp_path / "s.json")
    assert r.code == 0, r.err
    step = json.loads((tmp_path / "s.json").read_text())["passes"][1]
    assert step["pass"] == "sparsify" and abs(step["stats"]["sparsity"] - 0.5) < 0.01
    r = cli("codebook", tmp_path / "s.onnx", "-o", tmp_path / "cb.onnx", "--bits", "4")
    assert r.code == 0, r.err
    assert (tmp_path / "cb.onnx").stat().st_size < 0.2 * resnet_path.stat().st_size
    r = cli("compress", resnet_path, "-o", tmp_path / "z.onnx", "--calib", tmp_path / "c.npy", "--report", tmp_path / "z.json")
    assert r.code == 0, r.err
    assert "zipped" in r.out
    names = [p["pass"] for p in json.loads((tmp_path / "z.json").read_text())["passes"]]
    assert names == ["fold", "sparsify", "codebook"]
    r = cli("codebook", resnet_path, "-o", tmp_path / "bad.onnx", "--bits", "9")
    assert r.code == 2 and not (tmp_path / "bad.onnx").exists()


def test_codebook_on_int8_weights_keeps_every_conv_fused(folded):
    """INT8 activations + codebook: shared int8 levels, Gather folded at session start, QLinearConv kept."""
    from onnxcc.passes.quantization.fusion import fusion_report

    model = folded("resnet")
    calib = _calib(model)
    res = Pipeline([("sparsify", {"sparsity": 0.5, "min_size": 64}), ("quantize", {}), ("codebook", {"bits": 4, "min_size": 64})], verify_samples=4).run(model, calib)
    rep = res.steps[-1].report
    assert rep.changed and all(v["int8"] and v["centroids"] <= 16 for v in rep.stats["layers"].values())
    fusion = fusion_report(model)
    assert fusion["float_heavy"] == [] and fusion["integer_kernels"] >= len(rep.changed)
    for node in model.graph:  # zeros from sparsify stay exact int8 zeros
        if node.op_type == "Gather" and node.inputs[0].const_value.dtype == ir.DataType.INT8:
            assert 0 in node.inputs[0].const_value.numpy()
    assert rep.stats["size_after"]["zipped_bytes"] < 0.75 * rep.stats["size_before"]["zipped_bytes"]  # vs the INT8 model


def test_cli_compress_int8(cli, tmp_path, resnet_path):
    from onnxcc.compiler.ir_utils import load_model

    spec = input_specs(load_model(resnet_path))[0]
    np.save(tmp_path / "c.npy", random_inputs([spec], batch=16, seed=0)[0][spec.name])
    r = cli("compress", resnet_path, "-o", tmp_path / "z.onnx", "--calib", tmp_path / "c.npy", "--int8", "--report", tmp_path / "z.json")
    assert r.code == 0, r.err
    names = [p["pass"] for p in json.loads((tmp_path / "z.json").read_text())["passes"]]
    assert names == ["fold", "sparsify", "quantize", "codebook"]
