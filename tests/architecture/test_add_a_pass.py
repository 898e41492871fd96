"""ARCHITECTURE.md's worked example of a new pass, run as written: registered, verified, reported."""

from __future__ import annotations

import re
from pathlib import Path

from onnxcc.compiler.pipeline import Pipeline
from onnxcc.compiler.registry import register, registered_passes, unregister
from tests.conftest import named_model_from_text


def _example_pass():
    text = (Path(__file__).resolve().parents[2] / "ARCHITECTURE.md").read_text()
    code = re.search(r"```python\n(import dataclasses.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "ARCHITECTURE.md", "exec"), scope)
    return scope["DropIdentityPass"]


def test_the_documented_example_pass_runs_through_the_registry_and_the_verified_pipeline():
    cls = _example_pass()
    register(cls)
    try:
        assert "drop-identity" in registered_passes()
        model = named_model_from_text("""
            <ir_version: 8, opset_import: ["" : 17]>
            g (float[N, 4] x) => (float[N, 4] y) {
                a = Identity (x)
                b = Relu (a)
                y = Identity (b)
            }
        """)
        res = Pipeline([("drop-identity", {"min_uses": 1})], verify_samples=4).run(model)
        step = res.steps[0]
        assert step.exact and len(step.report.changed) == 1
        assert [n.op_type for n in model.graph] == ["Relu", "Identity"]  # the graph output's Identity stays
        assert step.vs_previous.max_rel == 0.0
    finally:
        unregister("drop-identity")
    assert "drop-identity" not in registered_passes()
