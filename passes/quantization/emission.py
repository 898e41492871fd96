"""How the ``quantize`` pass writes QDQ: int8 weights, int32 biases, Q/DQ pairs, compact constants.

* weights: **int8 initializers** (symmetric, per output channel by default)
  followed by DequantizeLinear; onnxscript's constant folder never folds Q/DQ,
  and onnxruntime needs the int8 initializer + DQ form to build QLinearConv;
* bias: int32 with scale ``s_x · s_w``, optionally corrected for the weights'
  quantization error from the input channel means (bias correction);
* activations: ``Q → DQ`` with one DequantizeLinear per consumer (onnxruntime's
  node units need unshared DQ outputs);
* afterwards the bias scales become ``Mul(s_x, s_w)`` of the stored scales and
  the tensors the pass made up get short names (smaller files, same kernels).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcc.compiler import weights as W
from onnxcc.compiler.ir_utils import add_initializer, const_array
from onnxcc.compiler.metrics import weight_sqnr
from onnxcc.passes.quantization import ranges as R


def reaching_qparams(lo: float, hi: float, dtype: str) -> tuple[np.float32, int]:
    """``qparams(lo, hi)`` widened until the end codes dequantize to ``lo`` and ``hi`` or beyond.

    A range cut where an activation turns flat is exact only if the clamped value is still on
    the flat side: with a rounded zero point, code 0 may dequantize to −2.99 instead of −3, and
    every value below −3 would then come out of HardSwish as −0.005 instead of 0.
    """
    qmin, qmax = (0, 255) if dtype == "uint8" else (-128, 127)
    for _ in range(8):
        scale, zp = R.qparams(lo, hi, dtype=dtype)
        low, high = (qmin - zp) * float(scale), (qmax - zp) * float(scale)
        if low <= lo and high >= hi:
            break
        lo, hi = (lo - float(scale) if low > lo else lo), (hi + float(scale) if high < hi else hi)
    return scale, zp


def bypass_rescale(out: ir.Value) -> None:
    """``Q(x) → DQ → Mul(α) → Q(s·α) → DQ_k``  ⇒  ``Q(x) → DQ_k(scale s·α)``: the Mul and its quantizer go."""
    mul = out.producer()
    q_out = next((u.node for u in out.uses() if u.node.op_type == "QuantizeLinear"), None)
    dq_in = next((v.producer() for v in mul.inputs if v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"), None)
    if q_out is None or dq_in is None or len(out.uses()) != 1:
        return
    codes = dq_in.inputs[0]
    for use in list(q_out.outputs[0].uses()):
        use.node.replace_input_with(0, codes)


def dq_node(graph: ir.Graph, q: ir.Value, scale: ir.Value, zp: ir.Value | None, axis: int | None, name: str) -> ir.Node:
    """DequantizeLinear(q, scale[, zp]); no ``zp``: the operator's default zero point 0."""
    attrs = {"axis": axis} if axis is not None else {}
    node = ir.node("DequantizeLinear", [q, scale] if zp is None else [q, scale, zp], attributes=attrs, name=name)
    node.outputs[0].name = f"{name}_out"
    node.outputs[0].dtype = ir.DataType.FLOAT
    graph.append(node)
    return node


def quantize_weights(graph, node, s_x: np.float32, cfg, cache, mean_x: np.ndarray | None, rounded: tuple | None = None) -> dict:
    op = node.op_type
    w_val = node.inputs[1]
    w = const_array(w_val)
    axis = W.out_axis(node)
    q, s_w = R.per_channel_weight(w, axis, bits=R.weight_bits(cfg), per_channel=cfg.per_channel) if rounded is None else rounded[:2]
    key = (id(w_val), axis)
    if key not in cache:
        base = w_val.name or f"{node.name}_w"
        qv = add_initializer(graph, f"{base}_int8", q)
        sv = add_initializer(graph, f"{base}_scale", s_w)
        # Symmetric: zero point 0, left to the operator's default for Conv. Gemm/MatMul store it,
        # because onnxruntime's QGemm selector does not fuse without it.
        zv = None if op == "Conv" else add_initializer(graph, f"{base}_zero_point", np.zeros(s_w.shape, np.int8))
        cache[key] = (qv, sv, zv)
    qv, sv, zv = cache[key]
    dq = dq_node(graph, qv, sv, zv, axis if cfg.per_channel else None, f"{node.name or 'w'}_weight_dq")
    node.replace_input_with(1, dq.outputs[0])
    info = {"op": op, "input_scale": float(s_x), "weight_scale_max": float(np.max(s_w)), "weight_sqnr_db": weight_sqnr(w, q.astype(np.float32) * W.broadcast_along(s_w, axis, w.ndim))}
    if rounded is not None:
        info.update(rounded[2])

    # bias: int32 with scale s_x · s_w (per output channel), zero point 0
    if op == "MatMul":
        return info
    b_val = node.inputs[2] if len(node.inputs) > 2 else None
    b = const_array(b_val) if b_val is not None else None
    n_out = w.shape[axis]
    if cfg.bias_correction and mean_x is not None and op == "Conv":
        w_err = q.astype(np.float64) * W.broadcast_along(s_w, axis, w.ndim) - w.astype(np.float64)
        g = node.attributes.get("group")
        group = g.value if g is not None else 1
        delta = conv_mean_shift(w_err, mean_x, group)
        b = (np.zeros(n_out) if b is None else b.astype(np.float64)) - delta
        info["bias_correction_max"] = float(np.max(np.abs(delta)))
    if b is None:
        return info
    if b.ndim != 1 or b.shape[0] != n_out:
        if b.size == 1:
            b = np.full(n_out, float(b.reshape(-1)[0]))
        else:
            info["bias"] = "kept in float (not a per-channel vector)"
            return info
    if op == "Gemm":
        beta = node.attributes.get("beta")
        if beta is not None:
            b = b * beta.value
            node.attributes.pop("beta")
    s_b = (np.float64(s_x) * np.broadcast_to(s_w.astype(np.float64), (n_out,))).astype(np.float32)
    qb = np.round(b.astype(np.float64) / s_b)
    if np.any(np.abs(qb) > 2**31 - 1):
        info["bias"] = "kept in float (int32 overflow)"
        return info
    base = (b_val.name if b_val is not None and b_val.name else f"{node.name}_b")
    bq = add_initializer(graph, f"{base}_int32", qb.astype(np.int32))
    bs = add_initializer(graph, f"{base}_scale", s_b)
    dq = dq_node(graph, bq, bs, None, 0, f"{node.name or 'b'}_bias_dq")  # zero point 0: the default
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, dq.outputs[0])
    return info


#: node meta key marking the ``Mul(s_x, s_w)`` that :func:`compact_constants` makes
BIAS_SCALE = "onnxcc.bias_scale"


def compact_constants(graph: ir.Graph) -> int:
    """Store a bias's int32 scale as ``Mul(s_x, s_w)`` of the two scales already stored; returns bytes saved.

    The scale is exactly ``s_x · s_w`` in float32. onnxruntime folds the Mul (level 1) before its
    QDQ fusion (level 2), so the layer still becomes one QLinearConv/QGemm, bit for bit. With the
    zero points left to their default (bias, Conv weights: see :func:`quantize_weights`), that is
    9·C of the 13·C bytes of scales and zero points around an int8 layer of C channels: about 1.5%
    of the fp32 file on depthwise networks. Done once every activation has its scale stored.
    """
    saved = 0
    for node in list(graph):
        if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3 or node.inputs[2] is None:
            continue
        x_dq, w_dq, b_dq = (v.producer() for v in node.inputs[:3])
        if any(p is None or p.op_type != "DequantizeLinear" for p in (x_dq, w_dq, b_dq)):
            continue
        s_x, s_w, s_b = (const_array(p.inputs[1]) for p in (x_dq, w_dq, b_dq))
        if s_x is None or s_w is None or s_b is None or s_x.size != 1 or s_b.size < 4:
            continue
        if s_w.size != s_b.size or not np.array_equal(s_x * s_w, s_b):  # per-tensor: a stored scalar is smaller than a Mul
            continue
        old = b_dq.inputs[1]
        mul = ir.node("Mul", [x_dq.inputs[1], w_dq.inputs[1]], name=f"{b_dq.name}_scale")
        mul.meta[BIAS_SCALE] = True  # in memory only: compact_qdq names it short
        mul.outputs[0].name = f"{b_dq.name}_scale_out"
        mul.outputs[0].dtype = ir.DataType.FLOAT
        graph.insert_before(b_dq, mul)
        b_dq.replace_input_with(1, mul.outputs[0])
        if not old.uses() and old.name in graph.initializers:
            saved += old.const_value.nbytes
            graph.initializers.pop(old.name)
    return saved


def compact_qdq(graph: ir.Graph, nodes_before: set[ir.Node], names_before: set[str]) -> dict[str, int]:
    """Bytes the integer kernels never read, taken out of the file; onnxruntime fuses the same kernels.

    * equal scalars this pass stored (scales, zero points, quantized constant operands) are one
      initializer;
    * one DequantizeLinear per quantized tensor: a tensor read by k layers had k identical DQs
      (onnxruntime's ``EnsureUniqueDQForNodeUnit`` makes one per consumer again when it loads
      the model, before its QDQ fusion);
    * the DQ nodes (and bias-scale Muls) this pass made are named after their output, ``q17``,
      not ``<conv>_weight_dq`` or ``<tensor>_DQ0`` (PaddleOCR's detector: 20 characters a node,
      about 400 nodes); a QuantizeLinear keeps ``<tensor>_Q``, which says what it quantizes.

    Returns what it removed, per kind.
    """
    equal: dict[tuple, ir.Value] = {}
    scalars = 0
    for name, v in list(graph.initializers.items()):  # equal scalars: one initializer (the constant 3 of every hard-swish)
        if name in names_before or v.is_graph_input() or v.is_graph_output():
            continue
        c = const_array(v)
        if c is None or c.ndim != 0:
            continue
        keep = equal.setdefault((c.dtype.str, c.tobytes()), v)
        if keep is not v:
            v.replace_all_uses_with(keep)
            graph.initializers.pop(name)
            scalars += 1
    first: dict[tuple, ir.Node] = {}
    shared = 0
    for node in list(graph):
        if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") or node in nodes_before:
            continue
        key = (tuple(id(v) for v in node.inputs), tuple(sorted((k, repr(a.value)) for k, a in node.attributes.items())))
        keep = first.setdefault(key, node)
        if keep is not node and not node.outputs[0].is_graph_output():
            node.outputs[0].replace_all_uses_with(keep.outputs[0])
            graph.remove(node, safe=True)
            shared += 1
    taken = {n.name for n in graph if n.name}
    renamed = 0
    for node in graph:
        if node in nodes_before or not (node.op_type == "DequantizeLinear" or node.meta.get(BIAS_SCALE)):
            continue  # a QuantizeLinear keeps the name of the tensor it quantizes
        short = node.outputs[0].name
        if short and len(short) < len(node.name or "") and short not in taken:
            taken.discard(node.name)
            node.name = short
            taken.add(short)
            renamed += 1
    return {"shared_scalars": scalars, "shared_dequantize": shared, "short_node_names": renamed}


def value_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs} | set(graph.initializers)
    names.update(o.name for n in graph for o in n.outputs if o.name)
    return names


def shorten_new_names(graph: ir.Graph, before: set[str]) -> None:
    """Give the tensors this pass made up (Q and DQ outputs, scales, zero points) short names, ``q0, q1, ...``.

    Exporters name tensors by module path (torch: 40-80 characters), and the names made from
    them were repeated about ten times per quantized tensor (its Q, its DQs, their scale and zero
    point): a third of the INT8 file of the digits MobileNetV3 (0.58 of fp32 with them, 0.40
    without). Node names keep the long form, so a viewer still shows which layer each Q/DQ
    belongs to; the int8/int32 weights keep their weight's name; graph inputs and outputs and
    every tensor the model had before are untouched.
    """
    taken = value_names(graph)
    k = 0
    for v in [*graph.initializers.values(), *(o for n in graph for o in n.outputs)]:
        if not v.name or v.name in before or v.is_graph_output() or v.name.endswith(("_int8", "_int32")):
            continue
        while f"q{k}" in taken:
            k += 1
        v.name = f"q{k}"
        taken.add(v.name)


def conv_mean_shift(w_err: np.ndarray, mean_x: np.ndarray, group: int) -> np.ndarray:
    """E[(W_q − W) * x] per output channel for inputs with per-channel means (border effects ignored)."""
    cout, cin_g = w_err.shape[0], w_err.shape[1]
    per = w_err.reshape(cout, cin_g, -1).sum(2)
    cout_g = cout // group
    out = np.zeros(cout)
    for g in range(group):
        m = mean_x[g * cin_g:(g + 1) * cin_g]
        out[g * cout_g:(g + 1) * cout_g] = per[g * cout_g:(g + 1) * cout_g] @ m
    return out


def quantize_constant_operand(graph: ir.Graph, node: ir.Node, idx: int, dtype: str) -> None:
    """A constant operand of Add/Mul as an 8-bit initializer + DequantizeLinear (so QLinearAdd/Mul can take it)."""
    v = node.inputs[idx]
    c = const_array(v).astype(np.float32)
    scale, zp = R.qparams(float(c.min()), float(c.max()), dtype)
    np_t = np.uint8 if dtype == "uint8" else np.int8
    info = np.iinfo(np_t)
    q = np.clip(np.round(c / scale) + zp, info.min, info.max).astype(np_t)
    base = v.name or f"{node.name}_const"
    qv = add_initializer(graph, f"{base}_q", q)
    sv = add_initializer(graph, f"{base}_q_scale", np.array(scale, np.float32))
    zv = add_initializer(graph, f"{base}_q_zero_point", np.array(zp, np_t))
    dq = dq_node(graph, qv, sv, zv, None, f"{node.name or base}_const{idx}_dq")
    node.replace_input_with(idx, dq.outputs[0])


def insert_qdq(graph: ir.Graph, v: ir.Value, scale: np.float32, zp: int, dtype: str) -> None:
    uses = list(v.uses())
    if not uses:
        return
    base = v.name or "t"
    np_t = np.uint8 if dtype == "uint8" else np.int8
    s = add_initializer(graph, f"{base}_scale", np.array(scale, np.float32))
    z = add_initializer(graph, f"{base}_zero_point", np.array(zp, np_t))
    qn = ir.node("QuantizeLinear", [v, s, z], name=f"{base}_Q")
    qn.outputs[0].name = f"{base}_quantized"
    qn.outputs[0].dtype = ir.DataType.UINT8 if dtype == "uint8" else ir.DataType.INT8
    graph.append(qn)
    for i, use in enumerate(uses):
        dq = dq_node(graph, qn.outputs[0], s, z, None, f"{base}_DQ{i}")
        use.node.replace_input_with(use.idx, dq.outputs[0])
