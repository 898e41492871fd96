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


#: what an int32 bias may reach: half of int32, for the bias correction added later
BIAS_LIMIT = 2.0 ** 30


def fit_int32_bias(w: np.ndarray, axis: int, q: np.ndarray, s_w: np.ndarray, b: np.ndarray | None, s_x: np.float32, bits: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Widen the weight scale of channels whose bias would not fit int32 at scale ``s_x · s_w``.

    A channel whose weights are all but zero (BatchNorm folded over a dead channel: weights of
    1e-10 under a bias of 0.3) gets a weight scale of 1e-12, and its bias needs 10^11 codes. The
    layer then kept a float bias, and onnxruntime ran it in float (PP-OCRv4's detector: 3 of 63
    convs). Such a channel's scale becomes ``|b| / (s_x · 2^30)``: its weights round to (almost)
    all zeros, which they were, and the bias is exact; onnxruntime's quantizer does the same.
    Returns (codes, scales, channels widened).
    """
    if b is None or not np.all(np.isfinite(b)) or (b.size != 1 and (b.ndim != 1 or b.shape[0] != w.shape[axis])):
        return q, s_w, 0
    if not np.isfinite(s_x) or s_x <= 0:
        return q, s_w, 0
    need = np.abs(b.astype(np.float64)).max() if s_w.size == 1 else np.abs(np.broadcast_to(b.astype(np.float64).reshape(-1), s_w.shape))
    need = need / (np.float64(s_x) * BIAS_LIMIT)
    low = s_w.astype(np.float64) < need
    if not np.any(low):
        return q, s_w, 0
    s_new = np.where(low, np.nextafter(need.astype(np.float32), np.float32(np.inf)), s_w).astype(np.float32)
    widened = np.broadcast_to(W.broadcast_along(low, axis, w.ndim), q.shape)  # the other channels keep their codes (GPTQ's among them)
    q_new = np.where(widened, R.weight_codes(w, s_new, axis, 2 ** (bits - 1) - 1), q)
    return q_new, s_new, int(np.count_nonzero(low))


def quantize_weights(graph, node, s_x: np.float32, cfg, cache, mean_x: np.ndarray | None, rounded: tuple | None = None) -> dict:
    op = node.op_type
    w_val = node.inputs[1]
    w = const_array(w_val)
    axis = W.out_axis(node)
    q, s_w = R.per_channel_weight(w, axis, bits=R.weight_bits(cfg), per_channel=cfg.per_channel, half_scales=cfg.narrow_constants) if rounded is None else rounded[:2]
    key = (id(w_val), axis)
    widened = 0
    if key not in cache:
        if op != "MatMul" and len(node.inputs) > 2 and node.inputs[2] is not None:
            q, s_w, widened = fit_int32_bias(w, axis, q, s_w, const_array(node.inputs[2]), s_x, R.weight_bits(cfg))
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
    if widened:
        info["bias_fit_channels"] = widened

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
    * the Q and DQ nodes (and bias-scale Muls) this pass made are named after their output,
      ``q17``, not ``<conv>_weight_dq``, ``<tensor>_DQ0`` or ``<tensor>_Q`` (PaddleOCR's
      detector: 20 characters a node, about 600 nodes); a Q node's first input still names the
      tensor it quantizes.

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
        if node in nodes_before or not (node.op_type in ("QuantizeLinear", "DequantizeLinear") or node.meta.get(BIAS_SCALE)):
            continue
        short = node.outputs[0].name
        if short and len(short) < len(node.name or "") and short not in taken:
            taken.discard(node.name)
            node.name = short
            taken.add(short)
            renamed += 1
    return {"shared_scalars": scalars, "shared_dequantize": shared, "short_node_names": renamed}


#: below this many elements a narrowed constant saves little more than its Cast node costs (about 45 bytes)
NARROW_MIN_SIZE = 64


def narrow_constants(graph: ir.Graph, names_before: set[str]) -> dict[str, int]:
    """Per-channel float32 scales that are float16 values, and int32 biases within int16, stored
    at half width behind a ``Cast`` back to their type.

    onnxruntime folds a Cast of an initializer when it loads the model, before its QDQ fusion, so
    the fused kernels and the outputs are those of the wide form (checked by the pass's fusion
    report). Runtimes that want Q/DQ scales as initializers without folding first would not fuse:
    hence an option, on in the onnxruntime recipe (int8-x86). PP-OCRv4's detector has 8,600
    output channels for 1.17 M weights: its scales and biases were 4.7% of the INT8 file.
    Returns how many tensors of each kind were narrowed and the element bytes saved (the Casts
    cost about 45 bytes each of that).
    """
    done = {"scales": 0, "biases": 0, "element_bytes": 0}
    first = next(iter(graph), None)  # the Casts go before it
    if first is None:
        return done
    for name, v in list(graph.initializers.items()):
        if name in names_before or v.is_graph_input() or v.is_graph_output():
            continue
        c = const_array(v)
        if c is None or c.ndim != 1 or c.size < NARROW_MIN_SIZE:
            continue
        uses = list(v.uses())
        if not uses:
            continue
        if c.dtype == np.float32 and all((u.node.op_type == "DequantizeLinear" and u.idx == 1) or u.node.meta.get(BIAS_SCALE) for u in uses):
            h = c.astype(np.float16)
            if not (np.all(np.isfinite(h)) and np.array_equal(h.astype(np.float32), c)):
                continue
            narrow, to, kind = h, ir.DataType.FLOAT, "scales"
        elif c.dtype == np.int32 and all(u.node.op_type == "DequantizeLinear" and u.idx == 0 for u in uses):
            if np.abs(c.astype(np.int64)).max() > np.iinfo(np.int16).max:
                continue
            narrow, to, kind = c.astype(np.int16), ir.DataType.INT32, "biases"
        else:
            continue
        graph.initializers.pop(name)
        src = add_initializer(graph, f"{name}h", narrow)
        cast = ir.node("Cast", [src], attributes={"to": to}, name=name)
        v.replace_all_uses_with(cast.outputs[0])
        cast.outputs[0].name = name
        cast.outputs[0].dtype = to
        cast.outputs[0].shape = ir.Shape(c.shape)
        graph.insert_before(first, cast)
        first = cast
        done[kind] += 1
        done["element_bytes"] += c.nbytes // 2
    return done


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
