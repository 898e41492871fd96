"""Bad input gets a one-line error, exit 2, the input untouched and no output written."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from tests.conftest import digest


def assert_refused(res, out, *fragments, code=2):
    assert res.code == code, res
    lines = [line for line in res.err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("onnxcc: error: "), res.err
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not os.path.exists(out)
    leftovers = [p for p in os.listdir(os.path.dirname(out)) if p.startswith(".onnxcc-")]
    assert not leftovers


@pytest.mark.parametrize(
    "content,fragment",
    [
        (os.urandom(4096), "not an ONNX model"),
        (b"", "empty file"),
        (b"\x08\x07\x12\x04test", "not an ONNX model"),  # valid protobuf, no graph
    ],
)
def test_not_onnx(cli, tmp_path, content, fragment):
    src = tmp_path / "bad.onnx"
    src.write_bytes(content)
    before = digest(src)
    out = tmp_path / "out.onnx"
    assert_refused(cli("fold", src, "-o", out), str(out), fragment)
    assert digest(src) == before


def test_truncated(cli, tmp_path, resnet_path):
    data = resnet_path.read_bytes()
    src = tmp_path / "trunc.onnx"
    src.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out.onnx"
    res = cli("fold", src, "-o", out)
    assert_refused(res, str(out), str(src))


def test_directory_and_missing(cli, tmp_path):
    out = tmp_path / "out.onnx"
    assert_refused(cli("fold", tmp_path, "-o", out), str(out), "is a directory")
    assert_refused(cli("fold", tmp_path / "nope.onnx", "-o", out), str(out), "no such file")


def test_checker_failure(cli, tmp_path):
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"]), onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", 1, [1])], [onnx.helper.make_tensor_value_info("y", 1, [1])],
    )
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    src = tmp_path / "dup.onnx"
    onnx.save(m, src)
    out = tmp_path / "out.onnx"
    assert_refused(cli("fold", src, "-o", out), str(out), "fails the ONNX checker")


def test_opset_out_of_range(cli, tmp_path):
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", 1, [1])], [onnx.helper.make_tensor_value_info("y", 1, [1])],
    )
    newest = onnx.defs.onnx_opset_version()  # onnxcc handles up to the installed onnx's newest
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", newest + 1)])
    src = tmp_path / "new.onnx"
    onnx.save(m, src)
    out = tmp_path / "out.onnx"
    assert_refused(cli("fold", src, "-o", out), str(out), f"opset {newest + 1}", f"11 to {newest}")


def test_old_opset_is_upgraded(cli, tmp_path):
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", 1, [1])], [onnx.helper.make_tensor_value_info("y", 1, [1])],
    )
    m = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 9)])
    m.ir_version = 4
    src = tmp_path / "old.onnx"
    onnx.save(m, src)
    out = tmp_path / "out.onnx"
    res = cli("fold", src, "-o", out)
    assert res.code == 0, res
    assert onnx.load(out).opset_import[0].version == 13


def test_missing_external_data(cli, tmp_path, resnet_path):
    m = onnx.load(resnet_path)
    src = tmp_path / "ext.onnx"
    onnx.save(m, src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    os.remove(tmp_path / "ext.onnx.data")
    out = tmp_path / "out.onnx"
    assert_refused(cli("fold", src, "-o", out), str(out), "external data file 'ext.onnx.data'", "missing")


def test_output_folder_missing_or_readonly(cli, tmp_path, resnet_path):
    out = tmp_path / "nope" / "out.onnx"
    res = cli("fold", resnet_path, "-o", out)
    assert res.code == 2 and "does not exist" in res.err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write to read-only folders")
        res = cli("fold", resnet_path, "-o", ro / "out.onnx")
        assert res.code == 2 and "not writable" in res.err
    finally:
        ro.chmod(0o700)


def test_refuses_to_overwrite_input(cli, resnet_path):
    before = digest(resnet_path)
    res = cli("fold", resnet_path, "-o", resnet_path)
    assert res.code == 2 and "refusing to overwrite the input" in res.err
    assert digest(resnet_path) == before
    res = cli("fold", resnet_path, "-o", resnet_path, "--in-place")
    assert res.code == 0
    assert digest(resnet_path) != before


def _calib_case(tmp_path, arr_or_dict):
    p = tmp_path / ("c.npz" if isinstance(arr_or_dict, dict) else "c.npy")
    if isinstance(arr_or_dict, dict):
        np.savez(p, **arr_or_dict)
    else:
        np.save(p, arr_or_dict)
    return p


@pytest.mark.parametrize(
    "data,fragment",
    [
        ({"wrong": np.zeros((4, 3, 32, 32), np.float32)}, "no data for model input(s) input"),
        ({"input": np.zeros((4, 3, 32, 32), np.float32), "extra": np.zeros((4, 1), np.float32)}, "unknown input(s) extra"),
        (np.zeros((4, 3, 16, 16), np.float32), "samples have shape (3, 16, 16)"),
        (np.zeros((4, 3, 32, 32), np.int64), "dtype int64"),
        (np.zeros((0, 3, 32, 32), np.float32), "empty"),
        (np.full((4, 3, 32, 32), np.nan, np.float32), "NaN or Inf"),
        (np.zeros((3, 32, 32), np.float32), "N samples first"),
    ],
)
def test_bad_calibration_data(cli, tmp_path, resnet_path, data, fragment):
    calib = _calib_case(tmp_path, data)
    out = tmp_path / "out.onnx"
    res = cli("compile", resnet_path, "-o", out, "--pass", "fold", "--calib", calib)
    assert_refused(res, str(out), fragment)


def test_unknown_pass_and_option(cli, tmp_path, resnet_path):
    out = tmp_path / "out.onnx"
    assert_refused(cli("compile", resnet_path, "-o", out, "--pass", "nonesuch"), str(out), "unknown pass 'nonesuch'")
    assert_refused(cli("compile", resnet_path, "-o", out, "--pass", "fold:bogus=1"), str(out), "has no option 'bogus'")
    assert_refused(cli("compile", resnet_path, "-o", out, "--pass", "fold:max-iterations=x"), str(out), "max-iterations")


def test_an_internal_error_has_its_own_exit_code_and_writes_nothing(cli, tmp_path, resnet_path, monkeypatch):
    """A bug in onnxcc is exit 3, one line, never exit 1 (a model that failed its check or budget)
    nor 2 (the user's input)."""
    import onnxcc.compiler.api as api

    def broken(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(api, "compile_model", broken)
    out = tmp_path / "o.onnx"
    r = cli("fold", resnet_path, "-o", out)
    assert r.code == 3 and r.err.strip().count("\n") == 0 and "internal error (KeyError)" in r.err
    assert not out.exists()


def test_no_input_file_is_ever_overwritten(cli, tmp_path, resnet_path):
    """Calibration data, labels, a recipe and the model's external data are inputs like the model:
    an output path naming one of them is refused, even with --in-place (which is for the model)."""
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(4, np.int64))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("passes: [fold]\n")
    ext = tmp_path / "ext.onnx"
    onnx.save(onnx.load(resnet_path), ext, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    cases = [
        (calib, ["quantize", resnet_path, "--calib", calib, "-o", calib]),
        (calib, ["quantize", resnet_path, "--calib", calib, "-o", calib, "--in-place"]),
        (labels, ["prune", resnet_path, "--calib", calib, "--labels", labels, "-o", labels]),
        (recipe, ["compile", resnet_path, "--recipe", recipe, "-o", recipe, "--no-latency"]),
        (tmp_path / "ext.onnx.data", ["fold", ext, "-o", tmp_path / "ext.onnx.data"]),
        (calib, ["prune", resnet_path, "--calib", calib, "-o", tmp_path / "o.onnx", "--report", calib]),
        (calib, ["fold", resnet_path, "--data", calib, "-o", calib, "--in-place"]),
    ]
    for victim, args in cases:
        before = digest(victim)
        r = cli(*args)
        assert r.code == 2 and "refusing to overwrite an input file" in r.err, (args, r)
        assert digest(victim) == before


def test_two_outputs_may_not_be_one_file(cli, tmp_path, resnet_path):
    out = tmp_path / "o.onnx"
    r = cli("fold", resnet_path, "-o", out, "--report", out)
    assert r.code == 2 and "given for two outputs" in r.err and not out.exists()


def test_an_output_path_ending_in_a_separator_is_a_folder_not_a_file(cli, tmp_path, resnet_path):
    r = cli("fold", resnet_path, "-o", f"{tmp_path / 'newdir'}/")
    assert r.code == 2 and "names a folder" in r.err
    assert not (tmp_path / "newdir").exists()


@pytest.mark.parametrize("exists", [True, False])
def test_external_data_outside_the_folder_gets_one_message_whether_or_not_the_file_exists(cli, tmp_path, resnet_path, exists):
    """A crafted model must not learn whether a file outside its folder exists."""
    inner = tmp_path / "m"
    inner.mkdir()
    target = tmp_path / "secret.bin"
    if exists:
        target.write_bytes(b"\0" * 1024)
    m = onnx.load(resnet_path)
    t = m.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value="../secret.bin")
    src = inner / "m.onnx"
    onnx.save(m, src)
    out = inner / "o.onnx"
    assert_refused(cli("fold", src, "-o", out), str(out), "points outside the model's folder")
    lines = cli("fold", src, "-o", out).err.strip()
    assert "secret" not in lines and "missing" not in lines


@pytest.mark.parametrize("dims", [[1, 3, 100000, 100000], [1, 3, 2**62, 1]])
def test_inputs_too_large_to_make_up_are_refused_up_front(cli, tmp_path, dims):
    """Random verification data for a huge declared input would exhaust memory: one line, exit 2."""
    from tests.conftest import named_model_from_text

    model = named_model_from_text(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[{dims[0]}, {dims[1]}, {dims[2]}, {dims[3]}] x) => (float[{dims[0]}, {dims[1]}, {dims[2]}, {dims[3]}] y) {{
            y = Relu (x)
        }}
    """)
    from onnxcc.compiler.ir_utils import save_model

    src = tmp_path / "big.onnx"
    save_model(model, src)
    out = tmp_path / "o.onnx"
    assert_refused(cli("fold", src, "-o", out), str(out), "input 'x'", "GiB")


def test_a_batch_stored_as_minus_one_is_dynamic(cli, tmp_path):
    """Some paddle2onnx exports store the batch as dim_value -1: a dynamic batch, not a size."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, 4, 4])])
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), src)
    r = cli("fold", src, "-o", tmp_path / "o.onnx")
    assert r.code == 0, r.err


def _shape_input_model(path):
    """Gather(x, idx) → Reshape(·, shape): an index input and a shape input, as exported
    detectors and the conformance suite have them."""
    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["x", "idx"], ["g"], axis=0),
         onnx.helper.make_node("Reshape", ["g", "shape"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", 1, [5, 6]), onnx.helper.make_tensor_value_info("idx", 7, [4]),
         onnx.helper.make_tensor_value_info("shape", 7, [2])],
        [onnx.helper.make_tensor_value_info("y", 1, [3, 8])],
    )
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)


def test_data_gives_real_inputs_to_verify_on(cli, tmp_path):
    """Random values cannot make a valid Reshape target: the refusal names the integer inputs and
    asks for --data; with the user's inputs the model folds, verified on them."""
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    _shape_input_model(src)
    r = cli("fold", src, "-o", out)
    assert_refused(r, str(out), "integer input(s) idx, shape got random values", "--data")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.arange(30, dtype=np.float32).reshape(5, 6), idx=np.array([4, 0, 2, 2]), shape=np.array([3, 8]))
    rep = tmp_path / "r.json"
    r = cli("fold", src, "-o", out, "--data", data, "--report", rep)
    assert r.code == 0, r
    import json

    step = json.loads(rep.read_text())["passes"][0]
    assert step["verify_vs_previous"]["outputs"][0]["shape_ref"] == [3, 8]  # verified on the given feed


def test_random_indices_stay_inside_the_gathered_axis():
    import onnx_ir as ir

    from onnxcc.compiler.calibration import index_ranges, input_specs, random_inputs

    g = onnx.helper.make_graph(
        [onnx.helper.make_node("Gather", ["x", "idx"], ["y"], axis=1),
         onnx.helper.make_node("ReduceSum", ["x", "axes"], ["s"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", 1, [2, 3, 4]), onnx.helper.make_tensor_value_info("idx", 7, [50]),
         onnx.helper.make_tensor_value_info("axes", 7, [3])],
        [onnx.helper.make_tensor_value_info("y", 1, [2, 50, 4]), onnx.helper.make_tensor_value_info("s", 1, [1, 1, 1])],
    )
    m = ir.serde.deserialize_model(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18)]))
    assert index_ranges(m) == {"idx": (0, 3, False), "axes": (0, 3, True)}
    feed = random_inputs(input_specs(m), seed=5)[0]
    assert feed["idx"].min() >= 0 and feed["idx"].max() <= 2
    assert sorted(feed["axes"].tolist()) == [0, 1, 2]  # distinct axes


@pytest.mark.parametrize("arrays,fragment", [
    ({"x": np.zeros((5, 6), np.float32), "idx": np.zeros(4, np.int32), "shape": np.array([3, 8])}, "dtype int32"),
    ({"x": np.zeros((5, 6), np.float32), "idx": np.zeros(4, np.int64)}, "no data for model input(s) shape"),
    ({"x": np.zeros((5, 6), np.float32), "idx": np.zeros(4, np.int64), "shape": np.array([3, 8]), "z": np.zeros(1)}, "unknown input(s) z"),
])
def test_bad_verification_data_is_refused_in_one_line(cli, tmp_path, arrays, fragment):
    src, out, data = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "d.npz"
    _shape_input_model(src)
    np.savez(data, **arrays)
    assert_refused(cli("fold", src, "-o", out, "--data", data), str(out), fragment)


def test_quiet_and_verbose_may_follow_the_subcommand(cli, tmp_path, resnet_path):
    out = tmp_path / "o.onnx"
    r = cli("fold", resnet_path, "-o", out, "-q")
    assert r.code == 0 and r.out == "" and out.exists()
    r = cli("fold", tmp_path / "missing.onnx", "-o", tmp_path / "o2.onnx", "--verbose")
    assert r.code == 2 and "Traceback" in r.err  # -v after the subcommand: the traceback is shown
