"""Cross-layer equalization (Nagel et al., 2019): exact rescaling of consecutive convolutions.

For a conv ``A`` whose output channel ``c`` feeds conv ``B`` only through a
positively homogeneous activation (none, Relu, LeakyRelu, PRelu):
``f(x / s) = f(x) / s`` for ``s > 0``, so::

    W_A[c] /= s_c,   b_A[c] /= s_c,   W_B[:, c] *= s_c      (B depthwise: W_B[c] *= s_c)

leaves the network's function unchanged. With ``r1_c = max|W_A[c]|`` and
``r2_c = max|W_B[:, c]|``, ``s_c = sqrt(r1_c / r2_c)`` makes both ranges
``sqrt(r1_c · r2_c)``, which evens out per-channel ranges so per-tensor (and
activation) quantization loses less, the known fix for depthwise networks.
Chains (``Conv → DW → Conv``) are equalized pair by pair, repeated until the
scales settle.

ReLU6 (``Clip(0, 6)``) is not scale-equivariant; pairs joined by it are
skipped with that reason unless ``relu6_to_relu`` is set (the paper's choice:
lossy, since activations above 6 are no longer clipped).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxcc.compiler.ir_utils import const_array, node_label
from onnxcc.compiler.passbase import OnnxccPass, PassReport, Skipped

HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu"}


class EqualizePass(OnnxccPass):
    name = "equalize"
    exact = True
    summary = "cross-layer equalization of consecutive convs (exact in float), for better INT8 ranges"

    @dataclasses.dataclass(frozen=True)
    class Config:
        iterations: int = dataclasses.field(default=8, metadata={"help": "rounds over all pairs"})
        relu6_to_relu: bool = dataclasses.field(default=False, metadata={"help": "replace Clip(0,6) between pairs by Relu (lossy)"})

    def __init__(self, config=None, context=None):
        super().__init__(config, context)
        self.exact = not self.config.relu6_to_relu

    def call(self, model: ir.Model) -> PassReport:
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        skipped: list[Skipped] = []
        replaced = []
        if self.config.relu6_to_relu:
            replaced = _relu6_to_relu(model.graph)
        pairs = find_pairs(model.graph, skipped)
        before = {f"{node_label(a)}→{node_label(b)}": _range_ratio(a) for a, b in pairs}
        for _ in range(max(1, self.config.iterations)):
            for a, b in pairs:
                equalize_pair(a, b)
        after = {f"{node_label(a)}→{node_label(b)}": _range_ratio(a) for a, b in pairs}
        stats = {
            "pairs": len(pairs),
            "relu6_replaced": replaced,
            "range_spread": {k: [round(before[k], 2), round(after[k], 2)] for k in after},
        }
        return PassReport(model, bool(pairs) or bool(replaced), changed=list(after), skipped=skipped, stats=stats)


def _conv_info(node: ir.Node) -> tuple[np.ndarray, int] | None:
    if node.op_type != "Conv" or len(node.inputs) < 2:
        return None
    w_val = node.inputs[1]
    w = const_array(w_val)
    if w is None or w_val.const_value is None or len(w_val.uses()) != 1 or w.dtype != np.float32:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b_val = node.inputs[2]
        if const_array(b_val) is None or b_val.const_value is None or len(b_val.uses()) != 1:
            return None
    g = node.attributes.get("group")
    return w, (g.value if g is not None else 1)


def find_pairs(graph: ir.Graph, skipped: list[Skipped]) -> list[tuple[ir.Node, ir.Node]]:
    outputs = set(graph.outputs)
    pairs = []
    for a in graph:
        if _conv_info(a) is None:
            continue
        v = a.outputs[0]
        if v in outputs or len(v.uses()) != 1:
            continue
        nxt = v.uses()[0].node
        if nxt.op_type in HOMOGENEOUS or nxt.op_type == "Clip":
            if nxt.op_type == "Clip":
                skipped.append(Skipped(f"{node_label(a)}→{node_label(nxt)}", "ReLU6/Clip is not scale-equivariant (relu6_to_relu makes it lossy)"))
                continue
            if nxt.op_type == "PRelu":
                slope = const_array(nxt.inputs[1])
                if slope is None or slope.size != 1:
                    continue  # a per-channel slope would need scaling too; keep it simple and exact
            v = nxt.outputs[0]
            if v in outputs or len(v.uses()) != 1:
                continue
            nxt = v.uses()[0].node
        if nxt.op_type != "Conv" or _conv_info(nxt) is None or nxt.inputs[0] is not v:
            continue
        pairs.append((a, nxt))
    return pairs


def _in_slices(w_b: np.ndarray, group: int, c: int) -> np.ndarray:
    """Weights of consumer B applied to its input channel ``c``."""
    cin_g = w_b.shape[1]
    g = c // cin_g
    cout_g = w_b.shape[0] // group
    return w_b[g * cout_g:(g + 1) * cout_g, c % cin_g]


def equalize_pair(a: ir.Node, b: ir.Node) -> None:
    w_a, _ = _conv_info(a)
    w_b, g_b = _conv_info(b)
    w_a = w_a.astype(np.float64)
    w_b = w_b.astype(np.float64)
    n = w_a.shape[0]
    if w_b.shape[1] * g_b != n:
        return
    r1 = np.abs(w_a.reshape(n, -1)).max(1)
    r2 = np.array([np.abs(_in_slices(w_b, g_b, c)).max() for c in range(n)])
    s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-30)), 1.0)
    w_a /= s.reshape(-1, *([1] * (w_a.ndim - 1)))
    cin_g = w_b.shape[1]
    cout_g = w_b.shape[0] // g_b
    for c in range(n):
        g = c // cin_g
        w_b[g * cout_g:(g + 1) * cout_g, c % cin_g] *= s[c]
    a.inputs[1].const_value = ir.tensor(w_a.astype(np.float32), name=a.inputs[1].name)
    b.inputs[1].const_value = ir.tensor(w_b.astype(np.float32), name=b.inputs[1].name)
    if len(a.inputs) > 2 and a.inputs[2] is not None:
        bias = const_array(a.inputs[2]).astype(np.float64) / s
        a.inputs[2].const_value = ir.tensor(bias.astype(np.float32), name=a.inputs[2].name)


def _range_ratio(a: ir.Node) -> float:
    """Spread of per-channel weight ranges of A's filters (max/min), what equalization shrinks."""
    w_a = const_array(a.inputs[1])
    r = np.abs(w_a.reshape(w_a.shape[0], -1)).max(1).astype(np.float64)  # float32 overflows on a denormal filter
    r = r[r > 0]
    return float(r.max() / r.min()) if r.size else 1.0


def _relu6_to_relu(graph: ir.Graph) -> list[str]:
    out = []
    for node in list(graph):
        if node.op_type != "Clip" or len(node.inputs) < 3:
            continue
        lo, hi = const_array(node.inputs[1]), const_array(node.inputs[2])
        if lo is None or hi is None or float(lo.reshape(-1)[0]) != 0.0:
            continue
        prod = node.inputs[0].producer() if node.inputs[0] is not None else None
        if prod is None or prod.op_type != "Conv":
            continue
        relu = ir.node("Relu", [node.inputs[0]], name=node.name)
        graph.insert_before(node, relu)
        node.outputs[0].replace_all_uses_with(relu.outputs[0], replace_graph_outputs=True)
        relu.outputs[0].name, node.outputs[0].name = node.outputs[0].name, f"{node.outputs[0].name}_unused"
        graph.remove(node, safe=True)
        out.append(node_label(relu))
    return out
