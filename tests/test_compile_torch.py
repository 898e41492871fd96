"""End to end: torch-exported ResNet- and MobileNetV2-style models (both exporters) through every shipped recipe.

Marked ``slow`` and ``torch``.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnxcc import shipped_recipes  # noqa: E402
from onnxcc.compiler.ir_utils import load_model  # noqa: E402
from tests import torch_zoo as Z  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    out = {}
    for name in ("resnet18", "mobilenet_v2"):
        module, hw = Z.make(name)
        for dynamo in (False, True):
            p = Z.export(module, hw, d / f"{name}-{'dynamo' if dynamo else 'legacy'}.onnx", dynamo=dynamo, optimize=False)
            calib = d / f"{name}.npy"
            np.save(calib, np.random.default_rng(0).standard_normal((32, 3, hw, hw)).astype(np.float32))
            out[(name, dynamo)] = (p, calib)
    return out


@pytest.mark.parametrize("recipe", sorted(shipped_recipes()))
@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_every_recipe_compiles_exported_models(cli, tmp_path, exported, name, dynamo, recipe):
    src, calib = exported[(name, dynamo)]
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    r = cli("compile", src, "-o", out, "--recipe", recipe, "--calib", calib, "--report", rep, "--no-latency")
    assert r.code == 0, r.err
    onnx.checker.check_model(str(out), full_check=True)
    data = json.loads(rep.read_text())
    assert data["passes"] and all("verify_vs_original" in p and "seconds" in p for p in data["passes"])
    assert data["before"]["macs"] > 0 and data["after"]["file_bytes"] > 0
    if recipe == "lossless":
        assert all(p["exact"] for p in data["passes"]) and data["passes"][-1]["verify_vs_original"]["outputs"][0]["rel"] < 1e-4
    if recipe == "smallest":
        assert data["after"]["file_bytes"] < 0.25 * data["before"]["file_bytes"]
    if recipe == "int8-x86":
        q = data["passes"][-1]
        guard = q["stats"]["speed_guard"]  # the recipe times INT8 against fp32 at batch 1 and 8
        assert {"int8_over_fp32_batch1", "int8_over_fp32_batch8"} <= set(guard)
        if q["modified"]:  # INT8 kept: measured faster, every conv runs in integer
            assert q["stats"]["fusion"]["float_heavy"] == [] or guard["slower_layers"]
            assert data["after"]["file_bytes"] < 0.5 * data["before"]["file_bytes"]  # tiny nets: biases and scales weigh
        else:  # kept in float, and the report says why
            assert any("kept in float" in s["reason"] for s in q["skipped"])
    load_model(out)


def test_a_tight_budget_weakens_a_recipe_on_an_exported_model(cli, tmp_path, exported):
    """The smallest recipe (60% sparsity, 4-bit codebook) breaks a 0.1-point budget on a
    random-weight export as asked: the budget weakens its passes until they fit (exit 0), and
    the report shows what was asked and what was kept. (The failing case: tests/test_budget.py.)"""
    src, calib = exported[("mobilenet_v2", True)]
    out = tmp_path / "o.onnx"
    r = cli("compile", src, "-o", out, "--recipe", "smallest", "--calib", calib, "--budget", "0.1", "--report", tmp_path / "r.json")
    assert r.code == 0, r.err
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["metric"]["drop_points"] <= 0.1
    searched = [p for p in rep["passes"] if "budget_search" in p["stats"]]
    assert searched and all(p["stats"]["budget_search"]["strength"] < 1 for p in searched)
