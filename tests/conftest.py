"""Shared helpers: run the CLI in-process, build small models from ONNX text."""

from __future__ import annotations

import dataclasses

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxcc.compiler.ir_utils import save_model
from onnxcc.compiler.passbase import OnnxccPass, PassReport
from onnxcc.compiler.search import RAY_LOOPBACK_ENV

# Ray clusters the tests start stay on loopback (set before any test imports Ray)
os.environ.setdefault(RAY_LOOPBACK_ENV, "0")


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, err={self.err!r})"


@pytest.fixture(scope="session")
def report_validator():
    import json

    import jsonschema

    from onnxcc.compiler.api import REPORT_SCHEMA

    schema = json.loads(REPORT_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(autouse=True)
def _every_report_follows_the_schema(monkeypatch, report_validator):
    """Every JSON report a test makes (``--report``, a failed run's, ``json_report``) is validated
    against the shipped schema as it is made."""
    import json

    from onnxcc.compiler import api

    real = api.json_report

    def checked(report):
        out = real(report)
        report_validator.validate(json.loads(json.dumps(out, default=str)))
        return out

    monkeypatch.setattr(api, "json_report", checked)


@pytest.fixture
def cli(capsys):
    """Run ``onnxcc ARGS`` in-process; returns exit code, stdout, stderr."""
    from onnxcc.compiler.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        cap = capsys.readouterr()
        return CliResult(code, cap.out, cap.err)

    return run


def digest(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def model_from_text(text: str, **initializers: np.ndarray) -> ir.Model:
    import onnx

    proto = onnx.parser.parse_model(text)
    for name, arr in initializers.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(arr), name))
    return ir.serde.deserialize_model(proto)


def named_model_from_text(text: str, **initializers: np.ndarray) -> ir.Model:
    """``model_from_text``, with every unnamed node named after its first output (reports and patterns use names)."""
    m = model_from_text(text, **initializers)
    for n in m.graph:
        n.name = n.name or n.outputs[0].name
    return m


@pytest.fixture(scope="session")
def tiny_models():
    """Tiny builder models by family (built once per session)."""
    from onnxcc.models.builders import FAMILIES, build

    return {fam: build(fam, "tiny", seed=1) for fam in FAMILIES}


@pytest.fixture
def resnet_path(tmp_path):
    from onnxcc.models.builders import build

    p = tmp_path / "resnet.onnx"
    save_model(build("resnet", "tiny", seed=3), p)
    return p


@pytest.fixture(scope="session")
def folded():
    """Getter for tiny builder models after the fold pass (BN scales recorded in node.meta); returns a copy each call."""
    from onnxcc.compiler.ir_utils import clone_model
    from onnxcc.compiler.pipeline import Pipeline
    from onnxcc.models.builders import build

    cache: dict[str, ir.Model] = {}

    def get(family: str) -> ir.Model:
        if family not in cache:
            m = build(family, "tiny", seed=1)
            Pipeline(["fold"], verify=False).run(m)
            cache[family] = m
        return clone_model(cache[family])

    return get


class ScaleConvWeights(OnnxccPass):
    """Test-only pass that multiplies the first (or last) Conv's weights: a wrong 'exact' rewrite
    when registered with ``exact = True``, a measurable loss otherwise."""

    name = "test-scale-conv"
    exact = True

    @dataclasses.dataclass(frozen=True)
    class Config:
        factor: float = 1.01
        last: bool = False

    def call(self, model):
        convs = [n for n in model.graph if n.op_type == "Conv"]
        conv = convs[-1] if self.config.last else convs[0]
        w = conv.inputs[1]
        w.const_value = ir.tensor(w.const_value.numpy() * self.config.factor, name=w.name)
        return PassReport(model, True, changed=[conv.name])
