"""ONNX's operator conformance suite through the real CLI (models/conformance.py).

Every eligible node test case (regenerated from the installed onnx, cached) runs through
``fold``, ``quantize``, ``prune --ratio 0.5`` and the ``lossless`` recipe, as shipped, with every
input but the first frozen to constants, and with all inputs frozen, verifying on the case's own
inputs (``--data``). Promises checked:

* no silent wrong graph: every exit-0 output reproduces the expected outputs (or onnxruntime's
  own result on the original) within the dtype's tolerance; a lossy command may change values
  only where its report says a lossy step changed something and measured it;
* no internal error, no traceback;
* every refusal is one line on stderr, exit 1 (verification) or 2 (bad input).

CI runs ``fold`` as shipped on every other case and the other command/variant pairs on every
``ONNXCC_CONFORMANCE_EVERY``-th case (default 10; about 3 minutes in all on 2 cores);
``ONNXCC_CONFORMANCE_EVERY=1`` runs all of them (``python -m benchmarks.conformance`` prints
the class counts of a full campaign).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from benchmarks.conformance import in_process_runner
from onnxcc.models import conformance as C

pytestmark = pytest.mark.slow

EVERY = int(os.environ.get("ONNXCC_CONFORMANCE_EVERY", "10"))


@pytest.fixture(scope="module")
def cases():
    return C.cases()


@pytest.fixture(scope="module")
def runner():
    return in_process_runner()


def _stride(command: str, variant: str) -> int:
    return min(2, EVERY) if (command, variant) == ("fold", "shipped") else EVERY


@pytest.mark.parametrize("variant", C.VARIANTS)
@pytest.mark.parametrize("command", C.COMMANDS)
def test_node_suite_has_no_silent_wrong_graph_and_no_crash(cases, runner, command, variant):
    stride = _stride(command, variant)
    picked = [c for i, c in enumerate(cases) if i % stride == 0]
    outcomes = [C.classify(c, command, variant, runner) for c in picked]
    bad = [f"{o.kind}: {o.case}: {o.detail}" for o in outcomes if o.kind in ("wrong", "crash")]
    assert not bad, f"{len(bad)} of {len(outcomes)}:\n" + "\n".join(bad[:30])
    ok = sum(o.kind == "ok" for o in outcomes)
    # most of the suite is a plain model onnxcc must handle, not refuse (quantize takes the case's
    # inputs as one calibration feed; a model with every input frozen needs none)
    assert ok >= 0.8 * len(outcomes), f"only {ok} of {len(outcomes)} ok"


def test_the_suite_is_all_there(cases):
    assert len(cases) > 1500
    ops = {c.op_type for c in cases}
    assert {"Conv", "Gather", "Resize", "Scan", "LSTM", "TopK", "Einsum"} <= ops


def test_fold_without_data_verifies_on_valid_random_indices(cases, runner):
    """Random integers for index/axes inputs are drawn inside the range their node accepts, so
    gather/reduce/slice cases verify without --data."""
    names = {"test_gather_0", "test_gather_elements_0", "test_reduce_l1_do_not_keepdims_random", "test_slice"}
    picked = [c for c in cases if c.name in names]
    assert len(picked) == len(names)
    for c in picked:
        o = C.classify(c, "fold", "shipped", runner, with_data=False)
        assert o.kind == "ok", (c.name, o)


def test_an_upgrade_that_changes_the_model_is_refused_not_written(cases, runner, tmp_path):
    """Scan at opset 8 → 9 changes the scan axes' meaning: onnx's version converter gives a model
    with other input ranks. The upgrade step is verified against the user's file, so fold refuses
    (exit 1, one line) instead of writing a model that rejects the user's own data."""
    case = next(c for c in cases if c.name == "test_scan_sum")
    model = onnx.load(str(case.model_path))
    assert model.opset_import[0].version == 8
    src, out, data = tmp_path / "scan.onnx", tmp_path / "out.onnx", tmp_path / "d.npz"
    onnx.save(model, str(src))
    np.savez(data, **case.data()[0])
    code, err = runner(["-q", "fold", str(src), "-o", str(out), "--data", str(data)])
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert "pass 'upgrade'" in err and not out.exists()


def test_nan_in_part_of_an_output_is_compared_place_by_place(cases, runner):
    """Sqrt of negative inputs gives NaN where the input is negative: exact passes must give NaN
    in the same places and agree elsewhere, not refuse the model."""
    case = next(c for c in cases if c.name == "test_sqrt")
    o = C.classify(case, "fold", "shipped", runner, with_data=False)
    assert o.kind == "ok", o


def test_float16_models_are_held_to_float16_resolution(cases, runner):
    """Fold reorders float16 arithmetic (the expanded attention and convolution-with-state cases):
    the outputs move by float16 rounding, below 4 units in its last place, which the exact check
    accepts; float32's 1e-4 would refuse them."""
    from onnxcc.compiler.verify import dtype_floor

    assert dtype_floor(np.dtype(np.float16)) == pytest.approx(3.9e-3, rel=0.01)
    assert dtype_floor(np.dtype(np.float32)) == 1e-4
    picked = [c for c in cases if "fp16" in c.name and c.name.endswith("_expanded")]
    assert len(picked) >= 6
    outcomes = [C.classify(c, "fold", "shipped", runner) for c in picked]
    assert all(o.kind in ("ok", "unrunnable") for o in outcomes), [o for o in outcomes if o.kind not in ("ok", "unrunnable")]
    assert sum(o.kind == "ok" for o in outcomes) >= 6


def test_quantize_takes_scalar_inputs_and_models_without_a_default_domain(cases, runner):
    """A window operator's only input is a 0-d size: as one calibration feed it stays a 0-d array.
    An ai.onnx.ml model has no default-domain opset to convert: the QDQ domain is added, not
    converted (onnx's converter asserts on 'opset None')."""
    names = {"test_hannwindow_expanded", "test_blackmanwindow_expanded", "test_ai_onnx_ml_binarizer",
             "test_ai_onnx_ml_array_feature_extractor"}
    picked = [c for c in cases if c.name in names]
    assert len(picked) == len(names)
    for c in picked:
        for variant in ("shipped", "first-input"):
            o = C.classify(c, "quantize", variant, runner)
            assert o.kind == "ok", o
