"""A model over 2 GB (external data in and out) compiles within a stated peak memory and loads afterwards.

Marked ``slow``. The model is generated on the fly: a stack of 9 Gemms of 8192×8192 float32 weights
(2.4 GB) with a BatchNorm-free MatMul head, saved with external data. ``onnxcc fold`` runs in its own
process; its peak resident memory must stay under 3× the weights (onnxcc holds the model, and
onnxruntime's verification sessions hold their own copy).
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxcc.compiler.ir_utils import load_model, save_model

pytestmark = pytest.mark.slow

N, LAYERS = 8192, 9


def _big_model() -> ir.Model:
    x = ir.Value(name="x", shape=ir.Shape(["N", N]), type=ir.TensorType(ir.DataType.FLOAT))
    nodes, inits, cur = [], [], x
    rng = np.random.default_rng(0)
    for i in range(LAYERS):
        w = ir.Value(name=f"w{i}", const_value=ir.tensor((rng.standard_normal((N, N), dtype=np.float32) / np.float32(np.sqrt(N))).astype(np.float32), name=f"w{i}"))
        inits.append(w)
        node = ir.node("Gemm", [cur, w], name=f"fc{i}")
        node.outputs[0].name = f"h{i}"
        nodes.append(node)
        cur = node.outputs[0]
        if i < LAYERS - 1:
            r = ir.node("Relu", [cur], name=f"relu{i}")
            r.outputs[0].name = f"r{i}"
            nodes.append(r)
            cur = r.outputs[0]
    ident = ir.node("Identity", [cur], name="out")  # something for fold to remove
    ident.outputs[0].name = "y"
    ident.outputs[0].shape = ir.Shape(["N", N])
    ident.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    nodes.append(ident)
    graph = ir.Graph([x], [ident.outputs[0]], nodes=nodes, initializers=inits, opset_imports={"": 17}, name="big")
    return ir.Model(graph, ir_version=8)


def test_fold_a_model_over_2gb_within_3x_its_size(tmp_path):
    src, out = tmp_path / "big.onnx", tmp_path / "big.folded.onnx"
    save_model(_big_model(), src)
    data = Path(str(src) + ".data")
    size = data.stat().st_size
    assert size > 2 * 1024**3 and src.stat().st_size < 1024**2  # weights outside the protobuf
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    r = subprocess.run([sys.executable, "-m", "onnxcc.compiler.cli", "fold", str(src), "-o", str(out)], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert before * 1024 < 3 * size  # no earlier child was larger (the measurement is this run's)
    assert peak < 3 * size, f"peak {peak / 1e9:.2f} GB for {size / 1e9:.2f} GB of weights"
    assert Path(str(out) + ".data").stat().st_size > 2 * 1024**3
    m = load_model(out)
    assert not any(n.op_type == "Identity" for n in m.graph) and len([n for n in m.graph if n.op_type == "Gemm"]) == LAYERS
    print(f"peak RSS {peak / 1e9:.2f} GB for {size / 1e9:.2f} GB of weights")
