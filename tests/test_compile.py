"""`onnxcc compile` and `compiler.compile_model`: recipes, sound order, reports, the budget gate, the HTML page."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcc import compile_model, shipped_recipes
from onnxcc.compiler.api import compact_precision, layer_precision
from onnxcc.compiler.calibration import input_specs, random_inputs
from onnxcc.compiler.errors import BudgetError
from onnxcc.compiler.ir_utils import clone_model, load_model, save_model


def _calib(model, n=16):
    return random_inputs(input_specs(model), batch=n, seed=0)[0]


def test_compile_model_accepts_paths_protos_ir_models_and_ort_readers(tmp_path, tiny_models):
    from onnxruntime.quantization import CalibrationDataReader

    model = tiny_models["resnet"]
    path = tmp_path / "m.onnx"
    save_model(model, path)
    data = _calib(model)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{k: v[i : i + 4] for k, v in data.items()} for i in range(0, 16, 4)])

        def get_next(self):
            return next(self.items, None)

    before = ir.to_proto(clone_model(model)).SerializeToString()
    results = [
        compile_model(path, "int8-x86", calibration=data, measure_latency=False),
        compile_model(onnx.load(str(path)), [("fold", {}), ("quantize", {})], calibration=Reader(), measure_latency=False),
        compile_model(model, {"passes": ["fold", {"name": "quantize"}]}, calibration=str(_save_npz(tmp_path, data)), measure_latency=False),
    ]
    assert ir.to_proto(model).SerializeToString() == before  # an ir.Model given is not modified
    guard = results[0].report["passes"][-1]["stats"]["speed_guard"]  # int8-x86 keeps INT8 only where it measured faster
    kept_int8 = any(n.op_type == "DequantizeLinear" for n in results[0].model.graph)
    ratios = [(guard["int8_over_fp32_batch1"], guard["int8_over_fp32_batch8"])]
    if "unguarded_int8_over_fp32_batch1" in guard:
        ratios.append((guard["unguarded_int8_over_fp32_batch1"], guard["unguarded_int8_over_fp32_batch8"]))
    best = min(max(r) for r in ratios)
    assert kept_int8 == (best <= 1.0) or abs(best - 1.0) < 1e-3  # the report rounds to 3 digits
    for res in results if kept_int8 else results[1:]:
        assert any(n.op_type == "DequantizeLinear" for n in res.model.graph)
        rep = res.report
        assert rep["passes"][-1]["pass"] == "quantize" and rep["passes"][-1]["verify_vs_original"]["min_sqnr_db"] is not None
        # int8-x86's layer guard may send the layers it timed slower back to float (timing-dependent)
        floats = len(rep["passes"][-1]["stats"].get("speed_guard", {}).get("slower_layers", []))
        assert rep["after"]["file_bytes"] < (0.35 if not floats else 1.0) * rep["before"]["file_bytes"], floats
        assert rep["after"]["macs"] == rep["before"]["macs"]


def test_before_counts_the_input_nodes_and_the_folded_macs(tiny_models):
    """The before side's MACs come from a folded copy (shapes known), its nodes from the input as
    given: `onnxcc fold` on a raw export showed its own result on both sides."""
    from collections import Counter

    model = tiny_models["resnet"]  # BatchNorm unfolded, as frameworks export
    ops = Counter(n.op_type for n in model.graph.all_nodes())
    rep = compile_model(model, [("fold", {})], measure_latency=False).report
    assert rep["before"]["nodes"] == sum(ops.values()) and rep["before"]["op_counts"] == dict(ops)
    assert ops["BatchNormalization"] > 0 and rep["after"]["nodes"] == sum(ops.values()) - ops["BatchNormalization"]
    assert rep["before"]["macs"] == rep["after"]["macs"] > 0

def _save_npz(tmp_path, data):
    p = tmp_path / "c.npz"
    np.savez(p, **data)
    return p


def test_report_has_totals_latency_and_every_pass(tiny_models):
    res = compile_model(tiny_models["vgg"], "faster-2x", calibration=_calib(tiny_models["vgg"], 32))
    rep = res.report
    for key in ("params", "macs", "nodes", "file_bytes", "latency_ms"):
        assert key in rep["before"] and key in rep["after"]
    assert rep["latency_ratio"] > 0 and [p["pass"] for p in rep["passes"]] == ["fold", "factorize", "fold", "quantize"]
    for p in rep["passes"]:
        assert {"seconds", "changed", "skipped", "stats", "verify_vs_original"} <= set(p)
    json.dumps(rep, allow_nan=False)  # JSON-ready as returned: no model object, no numpy scalars, no inf


def test_shipped_recipes_exist_and_parse():
    from onnxcc.compiler.api import resolve_recipe

    assert set(shipped_recipes()) == {"lossless", "int8-x86", "faster-2x", "smallest"}
    for name in shipped_recipes():
        assert resolve_recipe(name)[0].name == "fold"


def test_cli_shortcut_flags_run_in_sound_order(cli, tmp_path, resnet_path):
    np.save(tmp_path / "c.npy", _calib(load_model(resnet_path))["input"])
    rep = tmp_path / "r.json"
    r = cli("compile", resnet_path, "-o", tmp_path / "o.onnx", "--quantize", "minmax", "--prune", "0.25", "--calib", tmp_path / "c.npy", "--report", rep, "--no-latency")
    assert r.code == 0, r.err
    assert [p["pass"] for p in json.loads(rep.read_text())["passes"]] == ["fold", "prune", "fold", "equalize", "quantize"]
    r = cli("compile", resnet_path, "-o", tmp_path / "x.onnx", "--quantize", "minmax", "--codebook", "4", "--calib", tmp_path / "c.npy")
    assert r.code == 2 and "give one" in r.err and not (tmp_path / "x.onnx").exists()
    r = cli("compile", resnet_path, "-o", tmp_path / "y.onnx", "--recipe", "no-such-recipe")
    assert r.code == 2 and "shipped recipe" in r.err


def test_budget_gate_exits_1_names_the_pass_and_writes_only_the_failure_report(cli, tmp_path, resnet_path):
    np.save(tmp_path / "c.npy", _calib(load_model(resnet_path))["input"])
    outs = [tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "r.html"]
    # faster-2x without keep-if-faster: the gate must not depend on timings
    r = cli("compile", resnet_path, "-o", outs[0], "--factorize", "spatial-svd:0.2", "--quantize", "minmax", "--calib", tmp_path / "c.npy", "--budget", "0.5", "--report", outs[1], "--html", outs[2])
    assert r.code == 1 and re.search(r"pass '(factorize|quantize)': (no setting fits the budget.*: as asked, )?metric drop .* exceeds the budget", r.err), r.err
    assert not outs[0].exists() and not outs[2].exists() and not list(tmp_path.glob("*.tmp*"))
    failed = json.loads(outs[1].read_text())  # the JSON report says why, for CI; no model, no page
    assert failed["status"] == "failed" and failed["failed_pass"] in ("factorize", "quantize")
    with pytest.raises(BudgetError):
        recipe = [("fold", {}), ("factorize", {"method": "spatial-svd", "rank": 0.2}), ("fold", {}), ("quantize", {})]
        compile_model(resnet_path, recipe, calibration=str(tmp_path / "c.npy"), budget=0.5, measure_latency=False)


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium (.ci/run installs Debian's chromium)")
def test_html_report_loads_in_headless_chromium_with_every_plot(cli, tmp_path, resnet_path):
    pytest.importorskip("matplotlib")
    np.save(tmp_path / "c.npy", _calib(load_model(resnet_path), 32)["input"])
    html = tmp_path / "r.html"
    r = cli("compile", resnet_path, "-o", tmp_path / "o.onnx", "--prune", "0.3", "--quantize", "minmax", "--calib", tmp_path / "c.npy", "--html", html)
    assert r.code == 0, r.err
    text = html.read_text()
    n_img = text.count("<img ")
    assert n_img >= 5 and "http://" not in text and "https://" not in text  # self-contained
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", "--dump-dom", html.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout
    assert f"<title>onnxcc report: {n_img} plots rendered</title>" in dom, dom[:300]
    narrow = subprocess.run(  # a phone-width window: the tables scroll, the page does not
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=390,844", "--virtual-time-budget=5000",
         "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120,
    ).stdout
    assert f"<title>onnxcc report: {n_img} plots rendered</title>" in narrow, narrow[:300]
    assert "name='viewport'" in text or 'name="viewport"' in text
    assert "<h2>Layers</h2>" in text and "why float" in text and "fused (integer kernel)" in text


def test_fingerprints_change_only_after_a_rewritten_layer(folded):
    """Activations are recomputed only where a pass changed the graph before them."""
    from onnxcc.compiler.calibration import tensor_fingerprints
    from onnxcc.passes.factorization.factorize import factorize_layer

    model = folded("vgg")
    before = tensor_fingerprints(model)
    convs = [n for n in model.graph if n.op_type == "Conv"]
    target = convs[2]
    upstream = [v.name for c in convs[:2] for v in c.outputs]
    downstream = [v.name for c in convs[3:] for v in c.outputs]
    factorize_layer(model.graph, target, "tucker", (4, 4))
    after = tensor_fingerprints(model)
    assert all(before[t] == after[t] for t in upstream)
    assert all(before[t] != after[t] for t in downstream)
    assert tensor_fingerprints(clone_model(model)) == after  # content, not object identity


def test_mixed_precision_tries_reuse_the_ranges_of_unchanged_tensors(folded):
    from onnxcc.compiler.pipeline import Pipeline

    model = folded("mobilenet_v2")
    calib = _calib(model, 64)
    from onnxcc.compiler.calibration import CalibrationSet

    res = Pipeline([("quantize", {"force_int8": True, "max_drop": 10.0, "check_fusion": False})], verify_samples=64).run(model, CalibrationSet(calib))
    rep = res.steps[0].report
    assert rep.stats["mixed_precision"]["tries"] > 1
    assert rep.stats["ranges_reused"] > 0 and rep.stats["ranges_reused"] >= rep.stats["quantized_tensors"] // 2


def test_before_and_after_latency_are_timed_in_one_alternating_run(tiny_models, monkeypatch):
    """The headline latency ratio comes from one bench run of both models (as `onnxcc bench`),
    not from two timings minutes apart; the report states the protocol."""
    from onnxcc.compiler import api, bench

    calls = []
    real = bench.bench_models

    def spy(models, **kw):
        calls.append([label for label, _ in models])
        return real(models, **kw)

    monkeypatch.setattr(bench, "bench_models", spy)
    res = api.compile_model(tiny_models["resnet"], "lossless")
    assert calls == [["before", "after"]]
    rep = res.report
    assert rep["latency_protocol"]["threads"] == 2 and rep["latency_protocol"]["batch"] == 1
    assert rep["latency_ratio"] == round(rep["after"]["latency_ms"] / rep["before"]["latency_ms"], 3)


def test_the_output_model_says_what_onnxcc_did_to_it(cli, tmp_path, resnet_path):
    """producer_name/version are onnxcc's and metadata_props carry the recipe, the calibration
    data's hash and count, and each weighted layer's precision (what Netron shows); the input's
    own metadata is kept."""
    import hashlib

    src = tmp_path / "in.onnx"
    m = onnx.load(resnet_path)
    onnx.helper.set_model_props(m, {"author": "someone"})
    onnx.save(m, src)
    calib = tmp_path / "c.npy"
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    np.save(calib, x)
    out = tmp_path / "q.onnx"
    r = cli("quantize", src, "-o", out, "--calib", calib, "--report", tmp_path / "r.json")
    assert r.code == 0, r
    q = onnx.load(out)
    assert q.producer_name == "onnxcc" and q.producer_version
    props = {p.key: p.value for p in q.metadata_props}
    assert props["author"] == "someone"
    assert [p["name"] for p in json.loads(props["onnxcc.recipe"])] == ["fold", "quantize"]
    cal = json.loads(props["onnxcc.calibration"])
    h = hashlib.sha256()
    h.update(f"input|{x.dtype.str}|{x.shape}|".encode())
    h.update(x.tobytes())
    assert cal == {"source": "c.npy", "samples": 8, "sha256": h.hexdigest()}
    stamped = json.loads(props["onnxcc.precision"])
    convs = [n.name for n in q.graph.node if n.op_type == "Conv"]
    precision = {c: layer_precision(stamped, c) for c in convs}
    assert convs and all(p in ("int8", "float32") for p in precision.values())
    assert sum(p == "int8" for p in precision.values()) >= len(convs) // 2  # the report agrees with the graph
    rep = json.loads((tmp_path / "r.json").read_text())
    assert {c: rep["provenance"]["precision"][c] for c in convs} == precision
    assert compact_precision(rep["provenance"]["precision"]) == stamped


def test_the_json_report_holds_json_numbers_and_its_versions(cli, tmp_path, resnet_path):
    """An exact pass's SQNR is infinite: the report says null with identical: true, never the
    string "inf" or the non-JSON Infinity, and it is stamped with its schema and onnxcc's version."""
    rep = tmp_path / "r.json"
    r = cli("compile", resnet_path, "-o", tmp_path / "o.onnx", "--recipe", "lossless", "--no-latency", "--report", rep)
    assert r.code == 0, r
    text = rep.read_text()
    assert "Infinity" not in text and '"inf"' not in text and "NaN" not in text
    data = json.loads(text)
    assert data["schema_version"] == 1 and data["onnxcc_version"]
    assert any(p["verify_vs_previous"]["identical"] for p in data["passes"])  # the unchanged prune step
    for p in data["passes"]:
        for o in p["verify_vs_previous"]["outputs"]:
            assert o["sqnr_db"] is None or isinstance(o["sqnr_db"], float)


def test_the_report_schema_is_shipped_and_catches_a_malformed_report(report_validator, tiny_models):
    import jsonschema

    from onnxcc.compiler.api import REPORT_SCHEMA, json_report

    assert REPORT_SCHEMA.is_file()
    good = json_report(compile_model(tiny_models["resnet"], "lossless", measure_latency=False).report)
    report_validator.validate(good)
    for broken in ({**good, "status": "fine"}, {k: v for k, v in good.items() if k != "after"},
                   {**good, "before": {**good["before"], "params": "many"}}):
        with pytest.raises(jsonschema.ValidationError):
            report_validator.validate(broken)


@pytest.mark.parametrize("args", [["--calib", "CALIB"], ["--weight-only", "int8"], ["--weight-only", "int4"], ["--fp16"]])
def test_quantization_keeps_the_parameter_count(cli, tmp_path, resnet_path, args):
    """A quantized model holds as many parameters as the float one, biases included (an int32
    bias behind a DequantizeLinear is still a bias): the report counts what the model holds."""
    calib = tmp_path / "c.npy"
    np.save(calib, _calib(load_model(resnet_path))["input"])
    rep = tmp_path / "r.json"
    r = cli("quantize", resnet_path, "-o", tmp_path / "q.onnx", "--report", rep, *[str(calib) if a == "CALIB" else a for a in args])
    assert r.code == 0, r
    data = json.loads(rep.read_text())
    assert data["after"]["params"] == data["before"]["params"] > 0


def test_a_far_lossy_result_without_a_budget_succeeds_with_a_one_line_warning(cli, tmp_path, resnet_path):
    """Static INT8 of a random-weight ResNet changes many of its top-1 answers: exit 0, but
    one warning line with the figure and how to set a budget, also in the report; with a budget
    the gate decides instead, and an exact recipe never warns."""
    rep = tmp_path / "r.json"
    np.save(tmp_path / "c.npy", _calib(load_model(resnet_path), 32)["input"])
    r = cli("quantize", resnet_path, "-o", tmp_path / "q.onnx", "--calib", tmp_path / "c.npy", "--report", rep)
    assert r.code == 0, r
    warnings = [ln for ln in r.err.splitlines() if "WARNING" in ln]
    assert len(warnings) == 1 and "top-1 agreement with the input dropped" in warnings[0] and "--budget" in warnings[0]
    assert "--budget" in json.loads(rep.read_text())["warning"]
    r = cli("compile", "models/sample_resnet.onnx", "-o", tmp_path / "l.onnx", "--recipe", "lossless", "--no-latency")
    assert r.code == 0 and "WARNING" not in r.err
