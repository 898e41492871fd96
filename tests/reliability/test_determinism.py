"""Every pass is deterministic: the same input and options give a byte-identical output file."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import digest


@pytest.mark.parametrize(
    "args",
    [
        ["fold"],
        ["prune", "--ratio", "0.4"],
        ["prune", "--ratio", "0.3", "--reconstruct", "--calib", "{calib}"],
        ["prune", "--target-macs", "0.6", "--calib", "{calib}", "--samples", "8"],
        ["quantize", "--calib", "{calib}", "--method", "entropy"],
        ["quantize", "--calib", "{calib}", "--equalize", "--bias-correction"],
        ["quantize", "--weight-only", "int4"],
        ["quantize", "--weight-only", "ternary"],
        ["quantize", "--dynamic"],
        ["factorize", "--method", "tucker", "--calib", "{calib}"],
        ["factorize", "--method", "cp", "--rank", "0.3"],
        ["sparsify", "--sparsity", "0.6", "--global", "--steps", "2", "--calib", "{calib}"],
        ["codebook", "--bits", "3"],
        ["compress", "--calib", "{calib}", "--prune", "0.2"],
        ["compile", "--recipe", "smallest", "--calib", "{calib}", "--no-latency"],  # int8-x86 and faster-2x time layers
    ],
    ids=["fold", "prune", "prune-reconstruct", "prune-target", "quantize", "quantize-eq-bc", "weight-only-int4", "ternary", "dynamic",
         "factorize-tucker-refit", "factorize-cp", "sparsify-global-refit", "codebook", "compress", "compile-smallest"],
)
def test_same_input_same_bytes(cli, tmp_path, resnet_path, args):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((16, 3, 32, 32)).astype(np.float32))
    args = [a.replace("{calib}", str(calib)) for a in args]
    outs = []
    for i in range(2):
        out = tmp_path / f"out{i}.onnx"
        r = cli(args[0], resnet_path, "-o", out, *args[1:])
        assert r.code == 0, r.err
        outs.append(digest(out))
    assert outs[0] == outs[1]
