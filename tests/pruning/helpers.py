"""Test helpers: zero whole channel groups the way a framework's structured masks do."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.ir_utils import const_array
from onnxcc.passes.pruning.dependency import ChannelGraph
from onnxcc.passes.pruning.cut import prepare


def zero_groups(model: ir.Model, fraction: float = 0.3, seed: int = 0, zero_bias: bool = False, grouped: str = "whole") -> int:
    """Zero the producing filters of a random ``fraction`` of each prunable space's channel groups.

    Every source in a chosen group (the conv writing it, a depthwise conv tied
    to it, every conv adding into a residual stream) gets its filter zeroed, as
    structured masks made permanent in a framework would. With ``zero_bias``
    the biases go too (activation exactly 0); otherwise they stay, and the
    channel is a nonzero constant. ``grouped``: the groups of grouped convs as
    ``criterion=zero`` sees them by default (whole groups) or ``"within"``.
    Returns the number of groups zeroed.
    """
    prepare(model)
    cg = ChannelGraph(model, grouped=grouped)
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for sp in cg.spaces:
        free = [g for g in sp.groups if cg.groups[g].blocked is None]
        if sp.blocked or len(free) < 2:
            continue
        k = max(1, int(len(free) * fraction))
        chosen.update(int(g) for g in rng.choice(free, size=min(k, len(free) - 1), replace=False))
    for node in cg.sources:
        out = node.outputs[0]
        if out not in cg.tracked:
            continue
        idx = [i for i, g in enumerate(cg.value_groups(out)) if g in chosen]
        if not idx:
            continue
        w = const_array(node.inputs[1]).copy()
        if node.op_type == "Conv":
            w[idx] = 0
        elif node.op_type == "ConvTranspose":
            w[:, idx] = 0
        elif node.op_type == "Gemm" and node.attributes.get("transB") is not None and node.attributes["transB"].value:
            w[idx] = 0
        else:
            w[:, idx] = 0
        node.inputs[1].const_value = ir.tensor(w)
        if zero_bias and len(node.inputs) > 2 and node.inputs[2] is not None:
            b = const_array(node.inputs[2]).copy()
            b.reshape(-1)[idx] = 0 if b.size > 1 else b.reshape(-1)[0]
            node.inputs[2].const_value = ir.tensor(b)
    return len(chosen)
