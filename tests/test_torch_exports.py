"""Real exported graphs: every torch zoo network, legacy and dynamo exporters, raw and optimised.

Marked ``slow`` and ``torch``: CI runs them (the README's test command installs
the torch extra); they are skipped only where torch is not installed.
"""

from __future__ import annotations

from collections import Counter

import onnx
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")

from onnxcc.compiler.ir_utils import load_model  # noqa: E402
from onnxcc.compiler.pipeline import Pipeline  # noqa: E402
from tests import torch_zoo as Z  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Export each network once per exporter (raw graphs: BN, Identity, shape chains kept)."""
    d = tmp_path_factory.mktemp("torch")
    cache = {}

    def get(name: str, dynamo: bool):
        key = (name, dynamo)
        if key not in cache:
            module, hw = Z.make(name)
            cache[key] = Z.export(module, hw, d / f"{name}_{'dynamo' if dynamo else 'legacy'}.onnx", dynamo=dynamo, optimize=False)
        return cache[key]

    return get


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", list(Z.ZOO))
def test_fold_torch_export_exact(exports, name, dynamo):
    path = exports(name, dynamo)
    model = load_model(path)
    opset = model.opset_imports[""]
    assert opset == (17 if not dynamo else opset) and (dynamo is False or opset >= 18)
    before = Counter(n.op_type for n in model.graph)
    res = Pipeline(["fold"], verify_samples=4).run(model)
    after = Counter(n.op_type for n in model.graph)
    step = res.steps[0]
    assert step.vs_previous.within(1e-4), step.vs_previous.to_json()
    assert sum(after.values()) < sum(before.values())
    assert after["Identity"] == 0 and after["Constant"] == 0
    expected_bn = 8 if name == "densenet" else 0  # pre-activation BN stays, with a reason
    assert after["BatchNormalization"] == expected_bn
    assert len(step.report.skipped) == expected_bn  # fold only skips BatchNorms, each with its reason
    onnx.checker.check_model(ir.to_proto(model))
    assert not isinstance(model.graph.inputs[0].shape[0], int)  # batch stays dynamic
    # the dynamo exporter's debug annotations (stack traces, fx node names) are dropped
    props = [k for n in model.graph for k in n.metadata_props] + [k for v in model.graph.initializers.values() for k in v.metadata_props]
    assert not any(k.startswith("pkg.torch.") or k == "namespace" for k in props)
    if dynamo:
        assert step.report.stats["exporter_metadata_dropped"] > 100 * len(model.graph)
