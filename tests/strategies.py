"""Hypothesis strategy for random CNN graphs, shared by the pruning property tests and the pass fuzzer.

A stack of 1..``max_blocks`` blocks drawn from ``blocks`` (conv 1×1 / 3×3 / strided / dilated /
depthwise / grouped + BatchNorm + Relu/Relu6/HardSwish/SiLU/none, residual Add, Concat, Split,
max/average pooling, squeeze-excite Mul), then either a Flatten→Gemm→Relu→Gemm head over the
H·W positions or a pooled classifier.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from hypothesis import strategies as st

from onnxcc.compiler.pipeline import Pipeline
from onnxcc.models.builders import NetBuilder

ALL_BLOCKS = ("cba1", "cba3", "strided", "dilated", "dw", "grouped", "residual", "concat", "split", "pool", "se")


@st.composite
def cnn_graphs(draw, *, name: str = "fuzz", hw: int = 16, in_channels: tuple[int, ...] | None = (1, 3, 4), blocks=ALL_BLOCKS,
               max_blocks: int = 7, max_ch: int = 12, max_residual: int = 8, max_hidden: int = 8, classes: int = 4, maybe_fold: bool = False,
               foreign: tuple[tuple[str, dict], ...] = ()) -> ir.Model:
    """``foreign``: (op_type, attributes) of shape-keeping operators drawn from ONNX's conformance
    suite (models.conformance.unary_float_ops), dropped in as the block kind "foreign"."""
    if in_channels is None:
        b = NetBuilder(name, hw, seed=draw(st.integers(0, 2**16)))
    else:
        b = NetBuilder(name, hw, in_ch=draw(st.sampled_from(list(in_channels))), seed=draw(st.integers(0, 2**16)))
    x = b.input
    kinds = list(blocks) + (["foreign"] if foreign else [])
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=max_blocks)):
        c = b.ch[x]
        act = draw(st.sampled_from(["relu", "relu6", "hardswish", "silu", None]))
        if kind == "cba1":
            x = b.cba(x, draw(st.integers(2, max_ch)), 1, act=act)
        elif kind == "cba3":
            x = b.cba(x, draw(st.integers(2, max_ch)), 3, act=act)
        elif kind == "strided" and hw >= 4:
            x = b.cba(x, draw(st.integers(2, max_ch)), draw(st.sampled_from([1, 3])), s=2, act=act)
            hw //= 2
        elif kind == "dilated" and hw >= 6:
            x = b.act(b.bn(b.conv(x, draw(st.integers(2, max_ch)), 3, d=2)), act)
        elif kind == "dw" and c > 1:
            x = b.cba(x, c, 3, g=c, act=act)
        elif kind == "grouped" and c % 2 == 0:
            x = b.cba(x, c, 3, g=2, act=act)
        elif kind == "residual":
            y = b.cba(b.cba(x, draw(st.integers(2, max_residual)), 1, act="relu"), c, 3, act=None)
            x = b.add(x, y)
        elif kind == "concat":
            x = b.concat([x, b.cba(x, draw(st.integers(2, 6)), 3, act=act)])
        elif kind == "split" and c >= 2:
            k = draw(st.integers(1, c - 1))
            parts = b.tape.op_multi_out("Split", [x, b.const(np.array([k, c - k], np.int64), "split")], {"axis": 1}, num_outputs=2, name=b._name("split"))
            for i, (v, n) in enumerate(zip(parts, (k, c - k))):
                v.name = f"{parts[0].producer().name}_out{i}"
                b.ch[v] = n
            x = b.concat([b.cba(parts[0], draw(st.integers(2, 6)), 3, act=act), parts[1]])
        elif kind == "pool" and hw >= 4:
            x = b.maxpool(x) if draw(st.booleans()) else b.avgpool(x)
            hw //= 2
        elif kind == "se" and c >= 2:
            x = b.se(x, max(1, c // 2))
        elif kind == "foreign":
            op, attrs = draw(st.sampled_from(list(foreign)))
            x = b.op(op, [x], dict(attrs), ch=c)
    if draw(st.booleans()):
        x = b.gemm(b.flatten(x, spatial=hw * hw), draw(st.integers(2, max_hidden)))  # Flatten→Gemm over H·W blocks
        x = b.gemm(b.relu(x), classes)
    else:
        x = b.classifier(x, classes)
    model = b.finish(x, calibrate=False)
    if maybe_fold and draw(st.booleans()):
        Pipeline(["fold"], verify=False).run(model)
    return model
