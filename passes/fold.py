"""Fold pass: the exact clean-up every later pass relies on.

What it does, in order, and which library does each step:

1. optional opset upgrade (``onnx.version_converter``), for old exports;
2. weights held in ``Constant`` nodes (paddle2onnx, some tf2onnx graphs) are
   lifted to initializers so every later pass sees them as weights
   (``onnx_ir`` ``LiftConstantsToInitializersPass``);
3. functions are inlined, then constant folding with shape inference
   (``onnxscript.optimizer.fold_constants``) folds shape-computation chains
   (``Shape → Gather → Concat → Reshape``) where shapes are static; a dynamic
   batch stays dynamic;
4. onnxscript's rewrite rules: BatchNormalization folded into a preceding
   Conv / ConvTranspose / Gemm::

       Y = BN(W * X + B)  →  Y = (W·s) * X + ((B - μ)·s + β),  s = γ / sqrt(σ² + ε)

   plus Pad folded into Conv, Identity / inference Dropout / no-op Cast,
   Reshape, Transpose, Expand elimination, Relu/Clip fusion;
5. dead nodes and unused initializers removed, identical initializers
   de-duplicated, common subexpressions merged, nodes sorted.

Steps 2–5 repeat until nothing changes (at most ``max_iterations``).
Written here by hand: the opset guard, the report (what was folded, which
BatchNorms could not be folded and why), and the limits that let large
weights be folded (onnxscript's defaults skip tensors over 8192 elements,
which leaves e.g. transposed tf2onnx weights unfolded).

Before::

    x → Conv(W) → BatchNormalization(γ, β, μ, σ²) → Relu → Identity → y
After::

    x → Conv(W·s, b') → Relu → y
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript import optimizer, rewriter

from onnxcc.compiler.ir_utils import (
    add_initializer,
    check_model,
    const_array,
    convert_opset,
    default_opset,
    infer_shapes,
    node_label,
    positive_scale,
    replace_contents,
    replace_node_output,
    scalar_float,
)
from onnxcc.compiler.passbase import OnnxccPass, PassReport, Skipped
from onnxcc.passes.layout import sink_transposes

logger = logging.getLogger(__name__)

_FOLDABLE_INTO = ("Conv", "ConvTranspose", "Gemm")


class FoldPass(OnnxccPass):
    name = "fold"
    exact = True
    concrete_shapes = False  # it folds shape chains: a concrete input shape would be baked in
    summary = "constant folding, BatchNorm folding, shape-chain folding, dead-code and no-op removal"

    @dataclasses.dataclass(frozen=True)
    class Config:
        opset: int | None = dataclasses.field(
            default=None, metadata={"help": "upgrade the default-domain opset to this version first"}
        )
        fold_batchnorm: bool = dataclasses.field(
            default=True, metadata={"help": "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm"}
        )
        max_iterations: int = dataclasses.field(default=4, metadata={"help": "fold/rewrite rounds at most"})
        size_limit: int = dataclasses.field(
            default=64 * 1024 * 1024,
            metadata={"help": "largest tensor (elements) constant folding may read or create"},
        )
        exporter_metadata: bool = dataclasses.field(
            default=False,
            metadata={"help": "keep the exporter's per-node and per-tensor debug annotations (torch's stack traces, fx node names, name scopes: about 1.4 kB a node in a dynamo export, 9% of a ShuffleNetV2's INT8 file); dropped by default, as onnxslim does. The model's own metadata_props stay"},
        )

    def ensures(self, model: ir.Model) -> None:
        # The fold pass is the first thing every pipeline runs: its output must be valid ONNX.
        check_model(model)

    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        before = Counter(n.op_type for n in model.graph.all_nodes())
        n_before = sum(before.values())
        stats: dict = {"nodes_before": n_before}

        if cfg.opset is not None and default_opset(model) != cfg.opset:
            converted = convert_opset(model, cfg.opset)
            replace_contents(model, converted)
            stats["opset"] = cfg.opset

        # Declared graph-output shapes are the exporter's claim, not a fact (the torch 1.9
        # CRNN declares its [T, 1, classes] output as [1, seqlen]); rewrites that trust
        # them (onnxscript's MaterializeReshapeShape) bake the wrong shape in. Fold on
        # inferred shapes only and put the declared ones back where they agree.
        declared = {v.name: v.shape for v in model.graph.outputs}  # by name: rewrites may replace the value
        for v in model.graph.outputs:
            v.shape = None

        lifted = common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model).modified
        modified = lifted or stats.get("opset") is not None
        modified |= common.InlinePass()(model).modified

        # onnxscript's BN rule re-creates the Conv under a generated name; ours
        # keeps the user's layer names (used by --exclude and reports) and
        # records γ/σ for the pruning pass's bn_scale criterion. Rules that
        # would fold BN are dropped from onnxscript's list.
        from onnxscript.rewriter.rules.common import _fuse_batchnorm

        bn_rules = set(_fuse_batchnorm.rules.rules)
        rules = [r for r in rewriter._DEFAULT_REWRITE_RULES if r not in bn_rules]  # noqa: SLF001
        rewrite = rewriter.RewritePass(rules)
        folded_bn = transposes_removed = 0

        for _ in range(max(1, cfg.max_iterations)):
            changed = False
            changed |= optimizer.fold_constants(
                model,
                onnx_shape_inference=True,
                input_size_limit=cfg.size_limit,
                output_size_limit=cfg.size_limit,
            ).modified
            changed |= rewrite(model).modified
            infer_shapes(model)  # whole-graph inference with data propagation: symbolic reshape targets
            unify_reshape_dims(model)
            changed |= fold_static_shape_gathers(model) > 0
            # each folded target gives the next Reshape (and a Slice whose bounds read a shape) a
            # known input shape: a ShuffleNetV2 resolves one block per round
            for _ in range(64):
                n = fold_reshape_shape_chains(model) + fold_int_arithmetic(model)
                if not n:
                    break
                changed = True
                infer_shapes(model)
                unify_reshape_dims(model)
                fold_static_shape_gathers(model)
            sunk = sink_transposes(model, default_opset(model) or 13)
            transposes_removed += sunk
            changed |= sunk > 0
            for rule in REWRITES:  # each rule runs every round, in this order
                changed |= rule(model) > 0
            if cfg.fold_batchnorm:
                n = fold_batchnorms(model)
                folded_bn += n
                changed |= n > 0
            changed |= common.RemoveUnusedNodesPass()(model).modified
            modified |= changed
            if not changed:
                break
        for cleanup in (
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
            common.DeduplicateInitializersPass(),
            common.CommonSubexpressionEliminationPass(),
            common.RemoveUnusedNodesPass(),
        ):
            modified |= cleanup(model).modified
        common.TopologicalSortPass()(model)
        if not cfg.exporter_metadata and (dropped := drop_exporter_metadata(model)):
            stats["exporter_metadata_dropped"] = dropped
            modified = True
        _drop_attributes_newer_than_opset(model)
        corrected = _restore_declared_output_shapes(model, declared)
        if corrected:
            stats["output_shapes_corrected"] = corrected

        after = Counter(n.op_type for n in model.graph.all_nodes())
        n_after = sum(after.values())
        stats.update(
            nodes_after=n_after,
            constants_lifted=bool(lifted),
            batchnorms_folded=folded_bn,
            transposes_cancelled=transposes_removed,
            removed_by_op={op: before[op] - after.get(op, 0) for op in sorted(before) if before[op] > after.get(op, 0)},
            added_by_op={op: after[op] - before.get(op, 0) for op in sorted(after) if after[op] > before.get(op, 0)},
        )
        changed_layers = [f"removed {cnt} {op}" for op, cnt in stats["removed_by_op"].items()]
        changed_layers += [f"added {cnt} {op}" for op, cnt in stats["added_by_op"].items()]
        skipped = []
        if cfg.fold_batchnorm:
            for node in model.graph.all_nodes():
                if node.op_type == "BatchNormalization":
                    skipped.append(Skipped(node_label(node), _why_bn_stays(node) or "not folded"))
        return PassReport(model, bool(modified), changed=changed_layers, skipped=skipped, stats=stats)


#: metadata_props keys exporters write for debugging (torch.onnx's dynamo exporter and the
#: onnxscript optimizer it runs): source stack traces, fx node names, module paths
EXPORTER_METADATA_PREFIXES = ("pkg.torch.", "pkg.onnxscript.")
EXPORTER_METADATA_KEYS = frozenset({"namespace"})


def drop_exporter_metadata(model: ir.Model) -> int:
    """Remove the exporters' debug annotations from nodes and values; returns the bytes removed
    (keys and values). The model-level ``metadata_props`` (licences, authors, onnxcc's own
    provenance) are not touched."""
    removed = 0

    def strip(props) -> None:
        nonlocal removed
        for key in [k for k in props if k in EXPORTER_METADATA_KEYS or k.startswith(EXPORTER_METADATA_PREFIXES)]:
            removed += len(key) + len(props.pop(key))

    values = [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]
    for node in model.graph.all_nodes():
        strip(node.metadata_props)
        values.extend(node.outputs)
    for v in values:
        strip(v.metadata_props)
    return removed


BN_SCALE_META = "onnxcc.bn_scale"  # in-memory record of |γ|/σ per output channel of a folded layer


def fold_batchnorms(model: ir.Model) -> int:
    """Fold every BatchNormalization that follows a Conv/ConvTranspose/Gemm with private constant weights.

    ``W' = W·s`` along the output-channel axis and ``b' = (b − μ)·s + β`` with
    ``s = γ / sqrt(σ² + ε)``. The producer node keeps its name; the BN output
    value is replaced by the producer's output.
    """
    count = 0
    for bn in list(model.graph):
        if bn.op_type != "BatchNormalization" or len(bn.outputs) != 1 or _why_bn_stays(bn, strict=True):
            continue
        prod = bn.inputs[0].producer()
        gamma, beta, mean, var = (const_array(v).astype(np.float64) for v in bn.inputs[1:5])
        eps = bn.attributes["epsilon"].as_float() if "epsilon" in bn.attributes else 1e-5
        s = gamma / np.sqrt(var + eps)
        w_val = prod.inputs[1]
        w = const_array(w_val).astype(np.float64)
        cout = mean.shape[0]
        if prod.op_type == "Conv":
            w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        elif prod.op_type == "ConvTranspose":
            g = prod.attributes["group"].as_int() if "group" in prod.attributes else 1
            shp = w.shape
            w = (w.reshape(g, shp[0] // g, shp[1], *shp[2:]) * s.reshape(g, 1, shp[1], *([1] * (w.ndim - 2)))).reshape(shp)
        else:  # Gemm: output columns
            trans_b = "transB" in prod.attributes and prod.attributes["transB"].as_int() == 1
            alpha = prod.attributes["alpha"].as_float() if "alpha" in prod.attributes else 1.0
            w = w * (s[:, None] if trans_b else s[None, :]) * alpha
        old_b = const_array(prod.inputs[2]) if len(prod.inputs) > 2 and prod.inputs[2] is not None else None
        b = np.zeros(cout) if old_b is None else np.broadcast_to(old_b.astype(np.float64), (cout,))
        if prod.op_type == "Gemm":
            b = b * (prod.attributes["beta"].as_float() if "beta" in prod.attributes else 1.0)
            for key in ("alpha", "beta"):
                prod.attributes.pop(key, None)
        new_b = (b - mean) * s + beta
        w_val.const_value = ir.tensor(w.astype(np.float32), name=w_val.name)
        b_name = (prod.inputs[2].name if old_b is not None else None) or f"{w_val.name}_bias"
        if old_b is not None:
            prod.inputs[2].const_value = ir.tensor(new_b.astype(np.float32), name=b_name)
            prod.inputs[2].shape = ir.Shape([cout])
        else:
            b_val = add_initializer(model.graph, b_name, new_b.astype(np.float32))
            if len(prod.inputs) < 3:
                prod.resize_inputs(3)
            prod.replace_input_with(2, b_val)
        prev = prod.meta.get(BN_SCALE_META)
        prod.meta[BN_SCALE_META] = np.abs(s) * (prev if prev is not None else 1.0)
        replace_node_output(model.graph, bn, prod.outputs[0])
        count += 1
    return count


def _per_channel(c: np.ndarray, out_rank: int, cout: int) -> np.ndarray | None:
    """A constant that broadcasts against an ``[N, C, ...]`` output along C only, as ``(C,)``."""
    if c.ndim > out_rank or not np.issubdtype(c.dtype, np.floating):
        return None
    full = c.reshape((1,) * (out_rank - c.ndim) + c.shape)
    if any(d != 1 for i, d in enumerate(full.shape) if i != 1) or full.shape[1] not in (1, cout):
        return None
    return np.broadcast_to(full.reshape(-1).astype(np.float64), (cout,))


def _private_producer_and_constant(node: ir.Node, ops: tuple[str, ...], producer: str):
    """For a binary ``node`` in ``ops`` with one constant operand: (the other operand, the constant's
    index, its producer) when that producer is a ``producer`` node read by ``node`` alone; else Nones."""
    if node.op_type not in ops or len(node.inputs) != 2 or node.domain not in ("", "ai.onnx"):
        return None, None, None
    k = next((i for i, v in enumerate(node.inputs) if const_array(v) is not None), None)
    x = node.inputs[1 - k] if k is not None else None
    prod = x.producer() if x is not None else None
    if prod is None or prod.op_type != producer or len(x.uses()) != 1 or x.is_graph_output():
        return None, None, None
    return x, k, prod


def fold_conv_affine(model: ir.Model) -> int:
    """``Conv → Mul(per-channel constant)`` and ``Conv → Add(per-channel constant)`` into the conv's
    weights and bias (paddle2onnx writes biases as a separate Add; some exports write BatchNorm as
    a Mul/Add pair): ``W' = W·s``, ``b' = b·s`` for a Mul, ``b' = b + c`` for an Add."""
    count = 0
    for node in list(model.graph):
        x, k, conv = _private_producer_and_constant(node, ("Add", "Mul"), "Conv")
        if conv is None or len(conv.outputs) != 1:
            continue
        w_val = conv.inputs[1]
        b_val = conv.inputs[2] if len(conv.inputs) > 2 else None
        w = const_array(w_val)
        if w is None or not w_val.is_initializer() or len(w_val.uses()) != 1 or x.shape is None:
            continue
        if b_val is not None and (const_array(b_val) is None or not b_val.is_initializer() or len(b_val.uses()) != 1):
            continue
        c = _per_channel(const_array(node.inputs[k]), len(x.shape), w.shape[0])
        if c is None:
            continue
        b = np.zeros(w.shape[0]) if b_val is None else const_array(b_val).astype(np.float64)
        if node.op_type == "Mul":
            w_val.const_value = ir.tensor((w.astype(np.float64) * c.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32), name=w_val.name)
            b = b * c
            prev = conv.meta.get(BN_SCALE_META)
            conv.meta[BN_SCALE_META] = np.abs(c) * (prev if prev is not None else 1.0)
        else:
            b = b + c
        if b_val is None:
            if len(conv.inputs) < 3:
                conv.resize_inputs(3)
            conv.replace_input_with(2, add_initializer(model.graph, f"{w_val.name}_bias", b.astype(np.float32)))
        else:
            b_val.const_value = ir.tensor(b.astype(np.float32), name=b_val.name)
            b_val.shape = ir.Shape([w.shape[0]])
        replace_node_output(model.graph, node, x)
        count += 1
    return count


def matmul_add_to_gemm(model: ir.Model) -> int:
    """``MatMul(x, W) + b`` with a 2-D ``x``, a constant 2-D ``W`` and a constant ``b`` of shape
    ``[N]`` or ``[1, N]`` → ``Gemm(x, W, b)`` (one node, and the pattern onnxruntime's integer
    Gemm and the pruning rules know)."""
    count = 0
    for node in list(model.graph):
        y, k, mm = _private_producer_and_constant(node, ("Add",), "MatMul")
        if mm is None:
            continue
        x, w_val = mm.inputs
        w, b = const_array(w_val), const_array(node.inputs[k])
        if x is None or x.shape is None or len(x.shape) != 2 or w is None or w.ndim != 2:
            continue
        if b.ndim > 2 or b.size != w.shape[1] or (b.ndim == 2 and b.shape[0] != 1) or not np.issubdtype(b.dtype, np.floating):
            continue
        bias = add_initializer(model.graph, f"{mm.name or 'gemm'}_bias", b.reshape(-1).astype(w.dtype))
        gemm = ir.node("Gemm", [x, w_val, bias], name=mm.name or None)
        gemm.outputs[0].name, gemm.outputs[0].shape, gemm.outputs[0].type = y.name, y.shape, y.type
        model.graph.insert_before(mm, gemm)
        y.replace_all_uses_with(gemm.outputs[0])
        model.graph.remove(mm, safe=True)
        replace_node_output(model.graph, node, gemm.outputs[0])
        count += 1
    return count


def _clip_bounds(clip: ir.Node) -> tuple[float | None, float | None]:
    if "min" in clip.attributes or "max" in clip.attributes:  # opset < 11: attributes
        return clip.attributes.get_float("min", None), clip.attributes.get_float("max", None)
    lo = scalar_float(clip.inputs[1]) if len(clip.inputs) > 1 else None
    hi = scalar_float(clip.inputs[2]) if len(clip.inputs) > 2 else None
    return lo, hi


def _sole_user(value: ir.Value) -> ir.Node | None:
    uses = value.uses()
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def fuse_hard_activations(model: ir.Model) -> int:
    """Decomposed hard activations back into their ops (paddle2onnx, tf2onnx and old torch exports
    write them as four nodes)::

        s · Clip(x + c, 0, h)        with s·h = 1  →  HardSigmoid(x, α=s, β=s·c)
        x · Clip(x + c, 0, h) · s    with s·h = 1  →  x · HardSigmoid(x, α=s, β=s·c)
        x · HardSigmoid(x, 1/6, 1/2)                →  HardSwish(x)   (opset ≥ 14)

    where ``· s`` is a Mul by, or a Div by the inverse of, a positive scalar. Exact up to float
    rounding. The quantizer rebuilds its integer form from these ops (``lower.py``); a Div left
    after the product had no integer kernel and cost a float island per activation."""
    opset = default_opset(model) or 13
    count = 0
    for clip in list(model.graph):
        if clip.op_type != "Clip" or clip.domain not in ("", "ai.onnx") or clip.graph is None:
            continue
        add = clip.inputs[0].producer() if clip.inputs and clip.inputs[0] is not None else None
        if add is None or add.op_type != "Add" or len(add.inputs) != 2 or _sole_user(add.outputs[0]) is not clip:
            continue
        k = next((i for i, v in enumerate(add.inputs) if scalar_float(v) is not None), None)
        if k is None or const_array(add.inputs[1 - k]) is not None:
            continue
        x, c = add.inputs[1 - k], scalar_float(add.inputs[k])
        lo, hi = _clip_bounds(clip)
        if lo != 0.0 or hi is None or hi <= 0:
            continue
        user = _sole_user(clip.outputs[0])
        if user is None:
            continue
        product = None
        s = positive_scale(user, clip.outputs[0])
        if s is None and user.op_type == "Mul" and set(user.inputs) == {x, clip.outputs[0]}:
            last = _sole_user(user.outputs[0])
            s = positive_scale(last, user.outputs[0]) if last is not None else None
            product, user = user, last
        if s is None or abs(s * hi - 1.0) > 1e-5:
            continue
        alpha, beta = s, s * c
        end = user.outputs[0]
        base = user.name or clip.name or "hard"
        hs = ir.node("HardSigmoid", [x], attributes={"alpha": float(alpha), "beta": float(beta)}, name=f"{base}_hardsigmoid")
        new = [hs]
        swish = product is not None and abs(alpha - 1 / 6) < 1e-6 and abs(beta - 0.5) < 1e-6 and opset >= 14
        if swish:
            new = [ir.node("HardSwish", [x], name=f"{base}_hardswish")]
        elif product is not None:
            new.append(ir.node("Mul", [x, hs.outputs[0]], name=f"{base}_mul"))
        for n in new:
            n.outputs[0].dtype, n.outputs[0].shape = end.dtype, end.shape
        if len(new) > 1:
            new[0].outputs[0].name = f"{end.name}_hardsigmoid"
        model.graph.insert_before(add, new)
        replace_node_output(model.graph, user, new[-1].outputs[0], take_name=True)
        for gone in (product, clip, add):
            if gone is not None and gone.graph is not None and not any(o.uses() for o in gone.outputs):
                model.graph.remove(gone, safe=True)
        count += 1
    for mul in list(model.graph):  # x · HardSigmoid(x) as exported (torch at opset < 14, or fused above)
        if opset < 14 or mul.op_type != "Mul" or mul.graph is None or len(mul.inputs) != 2:
            continue
        hs = next((v.producer() for v in mul.inputs if v is not None and v.producer() is not None
                   and v.producer().op_type == "HardSigmoid"), None)
        if hs is None or _sole_user(hs.outputs[0]) is not mul or set(mul.inputs) != {hs.inputs[0], hs.outputs[0]}:
            continue
        if abs(hs.attributes.get_float("alpha", 0.2) - 1 / 6) > 1e-6 or abs(hs.attributes.get_float("beta", 0.5) - 0.5) > 1e-6:
            continue
        end = mul.outputs[0]
        swish = ir.node("HardSwish", [hs.inputs[0]], name=mul.name or None)
        swish.outputs[0].dtype, swish.outputs[0].shape = end.dtype, end.shape
        model.graph.insert_before(hs, swish)
        replace_node_output(model.graph, mul, swish.outputs[0], take_name=True)
        model.graph.remove(hs, safe=True)
        count += 1
    return count


CONSTANT_OF_SHAPE_LIMIT = 1 << 16  # elements: larger ones stay nodes (a small file beats one node less)


def constant_of_shape_to_initializer(model: ir.Model) -> int:
    """``ConstantOfShape`` with a constant shape (an LSTM's zero initial state, once the batch is
    known) → an initializer, up to :data:`CONSTANT_OF_SHAPE_LIMIT` elements."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "ConstantOfShape" or node.outputs[0].is_graph_output():
            continue
        shape = const_array(node.inputs[0])
        if shape is None or shape.ndim != 1 or np.prod(shape, dtype=np.int64) > CONSTANT_OF_SHAPE_LIMIT:
            continue
        attr = node.attributes.get("value")
        fill = attr.as_tensor().numpy().reshape(-1) if attr is not None else np.zeros(1, np.float32)
        value = np.full(tuple(int(d) for d in shape), fill[0], dtype=fill.dtype)
        const = add_initializer(model.graph, f"{node.outputs[0].name or 'constant'}_folded", value)
        node.outputs[0].replace_all_uses_with(const)
        model.graph.remove(node, safe=True)
        count += 1
    return count


def _slice_params(node: ir.Node) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(starts, ends, axes, steps) of an opset >= 10 Slice with constant parameters, axes explicit."""
    if node.op_type != "Slice" or len(node.inputs) < 3 or node.attributes:
        return None
    vals = [const_array(v) if v is not None else None for v in node.inputs[1:5]]
    if vals[0] is None or vals[1] is None or (len(vals) > 2 and node.inputs[3] is not None and vals[2] is None):
        return None
    starts, ends = [int(a) for a in vals[0].reshape(-1)], [int(a) for a in vals[1].reshape(-1)]
    axes = [int(a) for a in vals[2].reshape(-1)] if len(vals) > 2 and vals[2] is not None else list(range(len(starts)))
    steps = [int(a) for a in vals[3].reshape(-1)] if len(vals) > 3 and vals[3] is not None else [1] * len(starts)
    rank = len(node.inputs[0].shape) if node.inputs[0] is not None and node.inputs[0].shape is not None else None
    if rank is None or not (len(starts) == len(ends) == len(axes) == len(steps)):
        return None
    return starts, ends, [a % rank for a in axes], steps


def merge_slice_chains(model: ir.Model) -> int:
    """``Slice(Slice(x, axis a), axis b)`` with constant parameters on different axes → one Slice
    over both axes (YOLOX's Focus layer slices rows, then columns, four times). The first Slice
    goes once no other node reads it."""
    count = 0
    for node in list(model.graph):
        inner = node.inputs[0].producer() if node.op_type == "Slice" and node.inputs and node.inputs[0] is not None else None
        if inner is None or inner.op_type != "Slice" or inner.outputs[0].is_graph_output():
            continue
        a, b = _slice_params(inner), _slice_params(node)
        if a is None or b is None or set(a[2]) & set(b[2]):
            continue
        params = [np.array(a[i] + b[i], np.int64) for i in range(4)]
        base = node.name or "slice"
        merged = [add_initializer(model.graph, f"{base}_{k}", v) for k, v in zip(("starts", "ends", "axes", "steps"), params)]
        node.replace_input_with(0, inner.inputs[0])
        if len(node.inputs) < 5:
            node.resize_inputs(5)
        for i, v in enumerate(merged, start=1):
            node.replace_input_with(i, v)
        if not inner.outputs[0].uses():
            model.graph.remove(inner, safe=True)
        count += 1
    return count


def unit_transposes_to_reshapes(model: ir.Model) -> int:
    """A Transpose that only moves dims of size 1 (the non-1 dims keep their order) moves no data:
    it becomes a Reshape, which then merges with the Reshapes around it. SSD heads reshape each
    level's [N, A·K, h, w] to [N, A, K, h, w], transpose and flatten; at the 1×1 level the
    transpose is such a no-op. A dynamic dim keeps its place (0) or is the one -1."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        x, shape = node.inputs[0], node.inputs[0].shape
        if shape is None or "perm" not in node.attributes:
            continue
        perm = list(node.attributes["perm"].as_ints())
        if len(perm) != len(shape) or perm == sorted(perm):
            continue
        moved = [p for p in perm if not (isinstance(shape[p], int) and shape[p] == 1)]
        if moved != sorted(moved):
            continue
        target, free = [], 0
        for i, p in enumerate(perm):
            d = shape[p]
            if isinstance(d, int):
                target.append(d)
            elif p == i:
                target.append(0)
            else:
                target.append(-1)
                free += 1
        if free > 1 or any(isinstance(d, int) and d == 0 for d in shape):
            continue
        const = add_initializer(model.graph, f"{node.name or 'transpose'}_shape", np.array(target, np.int64))
        reshape = ir.node("Reshape", [x, const], name=node.name or None)
        out = node.outputs[0]
        reshape.outputs[0].dtype, reshape.outputs[0].shape = out.dtype, out.shape
        model.graph.insert_before(node, reshape)
        replace_node_output(model.graph, node, reshape.outputs[0], take_name=True)
        count += 1
    return count


def drop_identity_arithmetic(model: ir.Model) -> int:
    """``x + 0``, ``x - 0``, ``x · 1``, ``x / 1`` with a constant operand of zeros / ones that does
    not broadcast ``x`` to a larger shape: the node goes (a Linear's bias that is still at its
    zero initialisation, a layer scale of ones). The output keeps its name when it is a graph output."""
    count = 0
    neutral = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}
    for node in list(model.graph):
        if node.op_type not in neutral or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        ks = [1] if node.op_type in ("Sub", "Div") else [0, 1]
        for k in ks:
            c, x = const_array(node.inputs[k]), node.inputs[1 - k]
            if c is None or x is None or const_array(x) is not None or x.shape is None or x.dtype != node.outputs[0].dtype:
                continue
            if c.size == 0 or not np.all(c == neutral[node.op_type]) or not _within(c.shape, x.shape):
                continue  # not neutral, or the constant would broadcast x to a larger shape
            replace_node_output(model.graph, node, x)
            count += 1
            break
    return count


#: ops whose output is finite for any input: times zero they give zero
_BOUNDED = {"Sigmoid", "Tanh", "HardSigmoid", "Softmax", "Softsign"}


def _all_zero(v: ir.Value | None, depth: int = 0) -> bool:
    """``v`` is all zeros whatever the inputs: ``ConstantOfShape`` of 0 (an RNN's zero initial
    state with a dynamic batch), a Gemm/MatMul of such a tensor by a finite constant without bias,
    or a bounded activation or finite constant times one (finite · 0 = 0)."""
    if v is None or depth > 8:
        return False
    c = const_array(v)
    if c is not None:
        return c.size > 0 and np.issubdtype(c.dtype, np.floating) and not np.any(c)
    node = v.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "ConstantOfShape":
        value = node.attributes.get("value")
        arr = value.as_tensor().numpy() if value is not None else np.zeros(1, np.float32)
        return np.issubdtype(arr.dtype, np.floating) and not np.any(arr)
    product = node.op_type == "MatMul" or (node.op_type == "Gemm" and (len(node.inputs) < 3 or node.inputs[2] is None))
    if (product or node.op_type == "Mul") and len(node.inputs) == 2:
        for k in (0, 1):  # zero times a finite operand (inf · 0 would be NaN)
            if _finite(node.inputs[1 - k], allow_bounded=node.op_type == "Mul") and _all_zero(node.inputs[k], depth + 1):
                return True
    return False


def _finite(v: ir.Value | None, allow_bounded: bool) -> bool:
    """``v`` holds only finite values: a constant that does, or (``allow_bounded``, elementwise
    use) the output of a bounded activation."""
    if v is None:
        return False
    c = const_array(v)
    if c is not None:
        return bool(np.all(np.isfinite(c))) if np.issubdtype(c.dtype, np.floating) else True
    producer = v.producer()
    return allow_bounded and producer is not None and producer.op_type in _BOUNDED


def _equal_dims(a, b) -> bool:
    """Two dims known equal: the same size, or the same named symbolic dim (see :func:`_same_dim`)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim) and a.value is not None and a.value == b.value


def _within(shape, x_shape) -> bool:
    """An operand of ``shape`` broadcast against ``x_shape`` leaves ``x_shape``: no more dims, and
    each of its trailing dims 1 or known equal to x's."""
    if len(shape) > len(x_shape):
        return False
    return all(d == 1 or _equal_dims(d, xd) for d, xd in zip(shape, list(x_shape)[len(x_shape) - len(shape):]))


def drop_zero_states(model: ir.Model) -> int:
    """``x + Z`` → ``x`` where ``Z`` is zero at run time though not a constant (see
    :func:`_all_zero`) and does not broadcast ``x`` to a larger shape (each dim of ``Z`` is 1 or
    the same as ``x``'s, a symbolic dim by name after shape inference with data propagation).
    A torch LSTM unrolled by the exporter starts from ``h0 = c0 = zeros(batch, hidden)``: with a
    dynamic batch the zeros are not constant, so ``h0 @ W_hh`` and ``f · c0`` were computed and
    added at every first step; they go, and the state's shape chain with them."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        for k in (0, 1):
            z, x = node.inputs[k], node.inputs[1 - k]
            if x is None or z is None or const_array(z) is not None or x.shape is None or z.shape is None:
                continue
            if x.dtype != node.outputs[0].dtype or not _within(z.shape, x.shape) or not _all_zero(z):
                continue
            replace_node_output(model.graph, node, x)
            count += 1
            break
    return count


#: ops that only reshape (same elements, same order): a Reshape after one reads its input instead
_RESHAPING = ("Reshape", "Squeeze", "Unsqueeze", "Flatten")


def drop_noop_reshapes(model: ir.Model) -> int:
    """``Reshape(x, s)`` → ``x`` when the constant ``s`` gives x's own shape: each entry x's static
    dim, a 0 copying it, or the one -1 (what the element count leaves is that dim). A dynamic dim
    must be a 0 or the -1. tf2onnx writes squeeze-excite as ``Squeeze`` then ``Reshape([-1, C, 1, 1])``
    back (merged into one Reshape of the pool's output by :func:`merge_reshape_chains`, then dropped here)."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        x, target = node.inputs[0], const_array(node.inputs[1])
        if target is None or x.shape is None or target.ndim != 1 or len(target) != len(x.shape) or (target == -1).sum() > 1:
            continue
        zero_copies = node.attributes.get_int("allowzero", 0) == 0
        if all((t == 0 and zero_copies) or t == -1 or (isinstance(d, int) and d == t) for t, d in zip(target.tolist(), x.shape)):
            replace_node_output(model.graph, node, x)
            count += 1
    return count


def merge_reshape_chains(model: ir.Model) -> int:
    """``Reshape(R(x, ...), s2)`` → ``Reshape(x, s2)`` for R a Reshape, Squeeze, Unsqueeze or Flatten;
    after a Reshape, when ``s2`` is a constant whose 0 entries
    (copies of a dim of the intermediate tensor) stand where ``s1`` copied ``x``'s dim too; a -1 is
    computed from the element count, which both share. The first Reshape, and the shape chain that computed a dynamic ``s1``, go
    once nothing else reads them (the torch 1.9 CRNN reshapes its LSTM output twice)."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2 or node.inputs[0] is None:
            continue
        inner = node.inputs[0].producer()
        if inner is None or inner.op_type not in _RESHAPING or inner.domain not in ("", "ai.onnx") or inner.outputs[0].is_graph_output():
            continue
        target = const_array(node.inputs[1])
        if target is None or inner.inputs[0] is None:
            continue
        if inner.op_type != "Reshape" and (target == 0).any() and node.attributes.get_int("allowzero", 0) == 0:
            continue  # a 0 copies the Squeeze/Unsqueeze/Flatten output's dim, which need not be x's
        if inner.op_type == "Reshape" and node.attributes.get_int("allowzero", 0) == 0 and (target == 0).any():
            # a 0 copies the intermediate's dim: the same as x's where the first Reshape copied it too
            first = const_array(inner.inputs[1]) if len(inner.inputs) > 1 else None
            copied = first is not None and inner.attributes.get_int("allowzero", 0) == 0 and first.ndim == 1
            if not copied or any(i >= len(first) or first[i] != 0 for i in np.flatnonzero(target == 0)):
                continue
        node.replace_input_with(0, inner.inputs[0])
        if not inner.outputs[0].uses():
            model.graph.remove(inner, safe=True)
        count += 1
    return count


def _dim_scalar(value: ir.Value | None) -> tuple[ir.Value, int] | None:
    """``(src, i)`` when the scalar ``value`` is dim ``i`` of ``src``: ``Squeeze(Shape(src, start=i,
    end=i+1))`` (the dynamo exporter's ``sym_size``), ``Squeeze``/``Gather`` of a one-dim ``Shape`` slice."""
    node = _skip_identity(value.producer() if value is not None else None)
    if node is None or node.op_type not in ("Squeeze", "Gather") or not node.inputs or node.inputs[0] is None:
        return None
    if node.op_type == "Gather":
        idx = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if idx is None or idx.ndim != 0:
            return None
        elements = _shape_elements(node.inputs[0])
        picked = elements[int(idx)] if elements is not None and -len(elements) <= int(idx) < len(elements) else None
        return picked if isinstance(picked, tuple) else None
    shape_node = node.inputs[0].producer()
    if shape_node is not None and shape_node.op_type == "Shape" and shape_node.inputs[0] is not None:
        src = shape_node.inputs[0]
        if src.shape is None:
            return None
        rank = len(src.shape)
        start, end = _clamp_dims(shape_node.attributes.get_int("start", 0), shape_node.attributes.get_int("end", rank), rank)
        return (src, start) if end - start == 1 else None
    elements = _shape_elements(node.inputs[0])
    return elements[0] if elements is not None and len(elements) == 1 and isinstance(elements[0], tuple) else None


def drop_identity_gathers(model: ir.Model) -> int:
    """``Gather(Reshape(x, [-1]), idx)`` → ``x`` where ``idx`` lists x's elements in order:
    ``Unsqueeze(Range(0, N, 1) · S) + C`` with ``N`` dim 0 of x (the batch, static or named),
    ``S`` the product of x's other dims, all static, and ``C`` the constant ``arange(S)`` shaped
    like one sample of x. The dynamo exporter writes torch's ``as_strided`` (ConvNeXt's flatten after
    its pool) this way; with the batch dynamic the indices are not constant, so constant folding
    left a Shape, Range, Mul, Unsqueeze, Add and Gather computing a copy."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2 or node.attributes.get_int("axis", 0) != 0:
            continue
        flat, idx = node.inputs
        flatten = flat.producer() if flat is not None else None
        if flatten is None or flatten.op_type != "Reshape" or flatten.inputs[0] is None or idx is None:
            continue
        target = const_array(flatten.inputs[1]) if len(flatten.inputs) > 1 else None
        x = flatten.inputs[0]
        if target is None or target.tolist() != [-1] or x.shape is None or len(x.shape) < 1 or node.outputs[0].is_graph_output():
            continue
        rest = list(x.shape)[1:]
        if not all(isinstance(d, int) for d in rest):
            continue
        per = int(np.prod(rest)) if rest else 1
        if not _enumerates(idx, x, per, rest):
            continue
        replace_node_output(model.graph, node, x)
        count += 1
    return count


def _enumerates(idx: ir.Value, x: ir.Value, per: int, rest: list[int]) -> bool:
    """``idx`` is ``arange(numel(x))`` shaped like ``x`` (see :func:`drop_identity_gathers`)."""
    arr = const_array(idx)
    if arr is not None:
        return isinstance(x.shape[0], int) and arr.shape == tuple(x.shape) and np.array_equal(arr.ravel(), np.arange(arr.size))
    add = idx.producer()
    if add is None or add.op_type != "Add" or len(add.inputs) != 2:
        return False
    for k in (0, 1):
        c, u = const_array(add.inputs[k]), add.inputs[1 - k]
        if c is None or c.shape != (1, *rest) or not np.array_equal(c.ravel(), np.arange(per)) or u is None:
            continue
        unsq = u.producer()
        axes = const_array(unsq.inputs[1]) if unsq is not None and unsq.op_type == "Unsqueeze" and len(unsq.inputs) > 1 else None
        if axes is None or sorted(int(a) % (len(rest) + 1) for a in np.ravel(axes)) != list(range(1, len(rest) + 1)):
            continue
        mul = unsq.inputs[0].producer() if unsq.inputs[0] is not None else None
        if mul is None or mul.op_type != "Mul" or len(mul.inputs) != 2:
            continue
        for j in (0, 1):
            stride, rng = const_array(mul.inputs[j]), mul.inputs[1 - j]
            if stride is None or stride.size != 1 or int(stride.reshape(-1)[0]) != per or rng is None:
                continue
            r = rng.producer()
            if r is None or r.op_type != "Range" or len(r.inputs) != 3:
                continue
            start, delta = const_array(r.inputs[0]), const_array(r.inputs[2])
            if start is None or delta is None or start.size != 1 or delta.size != 1 or int(start) != 0 or int(delta) != 1:
                continue
            limit, dim = const_array(r.inputs[1]), _dim_scalar(r.inputs[1])
            if limit is not None and limit.size == 1 and isinstance(x.shape[0], int) and int(limit) == x.shape[0]:
                return True
            if dim is not None and _same_dim(x, 0, dim[0], dim[1]):
                return True
    return False


def fold_static_shape_gathers(model: ir.Model) -> int:
    """``Gather(Shape(x), i)`` → constant where dim ``i`` of ``x`` is static.

    The legacy torch exporter writes ``n, c, h, w = x.shape`` as a Shape and
    four Gathers; with a dynamic batch the whole Shape is not constant, so the
    constant folder keeps all four. Only the static dims become constants; the
    batch stays dynamic.
    """
    count = 0
    for node in list(model.graph):
        if node.op_type != "Gather" or node.inputs[0] is None:
            continue
        shape_node = node.inputs[0].producer()
        if shape_node is None or shape_node.op_type != "Shape" or shape_node.attributes:
            continue
        idx = const_array(node.inputs[1])
        src = shape_node.inputs[0]
        if idx is None or src is None or src.shape is None:
            continue
        rank = len(src.shape)
        dims = [src.shape[int(i) % rank] for i in np.ravel(idx)] if rank else []
        if not dims or not all(isinstance(d, int) for d in dims):
            continue
        value = np.array(dims, np.int64).reshape(np.shape(idx))
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        const = add_initializer(model.graph, f"{out.name or 'shape'}_folded", value)
        out.replace_all_uses_with(const)
        model.graph.remove(node, safe=True)
        count += 1
    return count


_INT_OPS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide}


def _int_arithmetic(value: ir.Value | None, depth: int = 0) -> int | None:
    """A scalar integer that constant folding left as arithmetic on constants (Add/Sub/Mul/Div of
    int64 scalars, as the legacy exporter writes ``c // groups``), or None."""
    if value is None or depth > 4:
        return None
    c = const_array(value)
    if c is not None:
        return int(c.reshape(-1)[0]) if c.size == 1 and np.issubdtype(c.dtype, np.integer) else None
    node = value.producer()
    if node is None or node.op_type not in _INT_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    a, b = (_int_arithmetic(v, depth + 1) for v in node.inputs)
    if a is None or b is None or (node.op_type == "Div" and (b == 0 or a % b)):
        return None
    return int(_INT_OPS[node.op_type](a, b))


def fold_int_arithmetic(model: ir.Model) -> int:
    """Add/Sub/Mul/Div of small integer constants (shape arithmetic whose inputs a shape fold just
    made constant) → one initializer; Div truncates toward zero, as ONNX's integer Div does."""
    count = 0
    for node in list(model.graph):
        if node.op_type not in _INT_OPS or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        if node.outputs[0].is_graph_output():
            continue
        a, b = (const_array(v) for v in node.inputs)
        if a is None or b is None or a.size > 64 or b.size > 64 or not (np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer)):
            continue
        if node.op_type == "Div":
            if (b == 0).any():
                continue
            r = (np.abs(a) // np.abs(b)) * np.sign(a) * np.sign(b)
        else:
            r = _INT_OPS[node.op_type](a, b)
        value = add_initializer(model.graph, f"{node.outputs[0].name or 'int'}_value", np.asarray(r).astype(a.dtype))
        node.outputs[0].replace_all_uses_with(value)
        model.graph.remove(node, safe=True)
        count += 1
    return count


def resize_sizes_to_scales(model: ir.Model) -> int:
    """``Resize(x, sizes=Concat(Shape(x)[0:2], [H, W]))`` → ``Resize(x, scales=[1, 1, H/h, W/w])``
    where ``x``'s spatial dims ``h, w`` are static: the batch stays dynamic and the shape chain
    goes (segmentation heads upsample to the input's size this way). onnxruntime computes the
    scale of a ``sizes`` Resize as ``float(H) / float(h)``: the same float32 stored here, so the
    sampling positions are the same; kept only where ``floor(h · scale)`` gives ``H`` back."""
    count = 0
    for node in list(model.graph):
        if node.op_type != "Resize" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 4 or node.inputs[3] is None:
            continue
        if const_array(node.inputs[3]) is not None or "axes" in node.attributes or "keep_aspect_ratio_policy" in node.attributes:
            continue
        x = node.inputs[0]
        elems = _shape_elements(node.inputs[3])
        if x is None or x.shape is None or not elems or len(elems) != len(x.shape):
            continue
        scales = []
        for pos, e in enumerate(elems):
            d = x.shape[pos]
            if not isinstance(e, int) and _same_dim(x, pos, *e):
                scales.append(1.0)  # a dim copied from x itself: kept, dynamic or not
            elif isinstance(e, int) and isinstance(d, int) and d > 0 and e > 0:
                sc = np.float32(e) / np.float32(d)
                if int(np.floor(np.float32(d) * sc)) != e or int(np.floor(d * float(sc))) != e:
                    scales = []
                    break
                scales.append(float(sc))
            elif not isinstance(e, int) and isinstance(d, int) and isinstance(e[0].shape[e[1]], int) and e[0].shape[e[1]] == d:
                scales.append(1.0)
            else:
                scales = []
                break
        if not scales:
            continue
        if node.inputs[2] is not None and (const_array(node.inputs[2]) is None or const_array(node.inputs[2]).size):
            continue  # scales given as well: not a valid Resize, leave it to onnxruntime to say so
        node.replace_input_with(2, add_initializer(model.graph, f"{node.name or 'resize'}_scales", np.array(scales, np.float32)))
        node.resize_inputs(3)
        count += 1
    return count


def _shape_slice(node: ir.Node) -> list | None:
    """``Slice(Shape(src), [a], [b])`` (axis 0, step 1, constant bounds) as ``(src, i)`` pairs."""
    shape_node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.attributes or len(node.inputs) < 3:
        return None
    src = shape_node.inputs[0]
    params = _slice_params(node)
    if src is None or src.shape is None or params is None or params[2] != [0] or params[3] != [1]:
        return None
    start, end = _clamp_dims(params[0][0], params[1][0], len(src.shape))
    return [(src, i) for i in range(start, end)]


def _clamp_dims(start: int, end: int, rank: int) -> tuple[int, int]:
    """Slice bounds over a shape of ``rank`` dims (``Slice`` or ``Shape(start, end)``): negatives count
    from the end, then both are clamped to ``[0, rank]``."""
    return tuple(min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))


def _shape_elements(value: ir.Value) -> list | None:
    """The elements of a 1-D int64 shape tensor built by ``Concat`` of constants and
    ``[Unsqueeze](Gather(Shape(src), i))`` pieces: each element is an int, or a
    ``(src, i)`` pair naming a dim of another tensor. None for any other construction."""
    prod = value.producer()
    pieces = prod.inputs if prod is not None and prod.op_type == "Concat" else [value]
    out: list = []
    for piece in pieces:
        arr = const_array(piece)
        if arr is not None:
            if arr.ndim != 1:
                return None
            out.extend(int(a) for a in arr)
            continue
        node = _skip_identity(piece.producer() if piece is not None else None)
        if node is not None and node.op_type == "Slice":  # Shape(src)[a:b]: dims a..b-1 of src
            dims = _shape_slice(node)
            if dims is None:
                return None
            out.extend(dims)
            continue
        if node is not None and node.op_type == "Unsqueeze":
            axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if axes is None and "axes" in node.attributes:
                axes = np.array(node.attributes["axes"].as_ints())
            if axes is None or list(np.ravel(axes)) not in ([0], [-1]):
                return None
            known = _int_arithmetic(node.inputs[0])
            if known is not None:  # e.g. Div(116, 2): the channels per group of a channel shuffle
                out.append(known)
                continue
            node = _skip_identity(node.inputs[0].producer())
            scalar = True
        else:
            scalar = False
        if node is None or node.op_type != "Gather" or node.inputs[0] is None:
            return None
        if "axis" in node.attributes and node.attributes["axis"].as_int() != 0:
            return None
        shape_node = node.inputs[0].producer()
        idx = const_array(node.inputs[1])
        if shape_node is None or shape_node.op_type != "Shape" or shape_node.attributes or idx is None:
            return None
        if idx.ndim != (0 if scalar else 1) or (scalar and idx.ndim != 0):
            return None
        src = shape_node.inputs[0]
        if src is None or src.shape is None:
            return None
        out.extend((src, int(i) % len(src.shape)) for i in np.ravel(idx))
    return out


def _skip_identity(node: ir.Node | None) -> ir.Node | None:
    while node is not None and node.op_type == "Identity" and node.inputs and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    return node


def unify_reshape_dims(model: ir.Model) -> int:
    """Name the dim a ``-1`` of a Reshape stands for when it is the input's one dynamic dim.

    ONNX shape inference gives ``Reshape([batch,116,28,28], [-1,116,28,28])`` a fresh ``unk__0``
    for its first dim, and every tensor after it inherits that name: a later shape chain that
    reads the batch from such a tensor (ShuffleNetV2's channel shuffle, in every block) can then
    not be proven to carry the batch through, and stays. Where the input has exactly one symbolic
    dim, the target's other entries are numbers or copies (0) of numbers, and the known sizes
    on both sides have the same product, the ``-1`` is that symbolic dim: the generated name is
    replaced by it everywhere. Only names shape inference made up (``unk__``) are replaced."""
    alias: dict[str, str] = {}

    def canon(d):
        if isinstance(d, int) or getattr(d, "value", None) is None:
            return d
        name = d.value
        while name in alias:
            name = alias[name]
        return name

    for node in model.graph:
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        data, out = node.inputs[0], node.outputs[0]
        target = const_array(node.inputs[1])
        if data is None or data.shape is None or out.shape is None or target is None or target.ndim != 1:
            continue
        if len(out.shape) != len(target) or (node.attributes.get_int("allowzero", 0) != 0 and (target == 0).any()):
            continue
        dims = [canon(d) for d in data.shape]
        symbolic = [d for d in dims if not isinstance(d, int)]
        if len(symbolic) != 1 or not isinstance(symbolic[0], str) or list(target).count(-1) != 1:
            continue
        known_out, ok = 1, True
        for i, t in enumerate(target):
            t = int(t)
            if t == 0:
                if i >= len(dims) or not isinstance(dims[i], int):
                    ok = False  # a copy of the symbolic dim: inference already names it
                    break
                known_out *= dims[i]
            elif t > 0:
                known_out *= t
        known_in = int(np.prod([d for d in dims if isinstance(d, int)], dtype=np.int64))
        if not ok or known_in != known_out:
            continue
        got = canon(out.shape[int(np.flatnonzero(target == -1)[0])])
        if isinstance(got, str) and got != symbolic[0] and got.startswith("unk__"):
            alias[got] = symbolic[0]
    if not alias:
        return 0
    values = {v for node in model.graph for v in (*node.inputs, *node.outputs) if v is not None}
    for v in values:
        if v.shape is not None and any(not isinstance(d, int) and getattr(d, "value", None) in alias for d in v.shape):
            v.shape = ir.Shape([canon(d) if not isinstance(d, int) and getattr(d, "value", None) is not None else d for d in v.shape])
    return len(alias)


def _same_dim(data: ir.Value, pos: int, src: ir.Value, idx: int) -> bool:
    """Dim ``pos`` of ``data`` is dim ``idx`` of ``src``: the same tensor and index, or the same
    named symbolic dim. Fold re-infers every intermediate shape (declared value_info is dropped),
    so a shared name is ONNX shape inference's proof that the sizes are one, or the graph
    inputs' own declaration."""
    if src is data:
        return pos == idx
    if data.shape is None or pos >= len(data.shape):
        return False
    a, b = data.shape[pos], src.shape[idx]
    return not isinstance(a, int) and not isinstance(b, int) and a.value is not None and a.value == b.value


def fold_reshape_shape_chains(model: ir.Model) -> int:
    """``Reshape(x, Concat(Gather(Shape(x), 0), [-1]))`` → ``Reshape(x, [0, -1])``.

    Exporters write "keep the batch, flatten the rest" as shape arithmetic on the
    runtime shape. Reshape's own ``0`` (copy this dim of the input) says the same
    without the chain, and the batch stays dynamic. An element that reads a static dim
    becomes that number; one that reads a dynamic dim of another position or tensor
    keeps the chain (unless shape inference named it the same dim). At most one ``-1``.
    """
    count = 0
    for node in list(model.graph):
        if node.op_type != "Reshape" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        if const_array(node.inputs[1]) is not None:
            continue
        if "allowzero" in node.attributes and node.attributes["allowzero"].as_int() != 0:
            continue
        data = node.inputs[0]
        elems = _shape_elements(node.inputs[1])
        if data is None or not elems:
            continue
        target: list[int] = []
        for pos, e in enumerate(elems):
            if isinstance(e, int):
                target.append(e)
            elif _same_dim(data, pos, *e):
                target.append(0)
            elif isinstance(e[0].shape[e[1]], int):
                target.append(int(e[0].shape[e[1]]))
            else:
                target = []
                break
        if not target or target.count(-1) > 1:
            continue
        const = add_initializer(model.graph, f"{node.name or 'reshape'}_shape", np.array(target, np.int64))
        node.replace_input_with(1, const)
        count += 1
    return count


def reduce_mean_to_global_pool(model: ir.Model, *, squeezed: bool = False) -> int:
    """``ReduceMean(x, axes=[2, 3])`` on a 4-D tensor → ``GlobalAveragePool(x)`` (then Flatten if ``keepdims=0``
    and ``squeezed``).

    The dynamo exporter writes ``adaptive_avg_pool2d(x, 1)`` (heads, squeeze-
    excite) as ReduceMean; GlobalAveragePool is the same function, has a faster
    kernel and an integer one (QLinearGlobalAveragePool) onnxruntime fuses.
    """
    count = 0
    opset = model.opset_imports.get("", 0)
    for node in list(model.graph):
        if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx") or node.inputs[0] is None:
            continue
        x = node.inputs[0]
        if x.shape is None or len(x.shape) != 4:
            continue
        keep = node.attributes.get("keepdims")
        squeeze = keep is not None and keep.value == 0
        if squeeze and not squeezed:
            continue  # GAP + Flatten would be one node more; the quantize pass asks for it (integer kernel)
        if opset >= 18:
            axes = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        else:
            a = node.attributes.get("axes")
            axes = None if a is None else np.array(a.value)
        if axes is None or sorted(int(v) % 4 for v in np.ravel(axes)) != [2, 3]:
            continue
        gap = ir.node("GlobalAveragePool", [x], name=node.name)
        model.graph.insert_before(node, gap)
        if squeeze:  # keepdims=0: (N, C, 1, 1) → (N, C)
            flat = ir.node("Flatten", [gap.outputs[0]], attributes={"axis": 1}, name=f"{node.name or 'gap'}_flatten")
            model.graph.insert_before(node, flat)
            gap = flat
        out = node.outputs[0]
        gap.outputs[0].type, gap.outputs[0].shape = out.type, out.shape
        was_output = out.is_graph_output()
        name = out.name
        out.replace_all_uses_with(gap.outputs[0], replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        gap.outputs[0].name = name if was_output or name else gap.outputs[0].name
        count += 1
    return count


def _restore_declared_output_shapes(model: ir.Model, declared: dict) -> dict[str, str]:
    """Put each graph output's declared shape back unless shape inference contradicts it
    (another rank, or another static size); those keep the inferred shape and are returned
    as ``{output: "declared [..], computes [..]"}`` for the report."""
    infer_shapes(model)
    corrected = {}
    for v in model.graph.outputs:
        claim = declared.get(v.name)
        found = v.shape
        if claim is None:
            continue
        if found is None:
            v.shape = claim
            continue
        agree = len(claim) == len(found) and all(
            not (isinstance(a, int) and isinstance(b, int)) or a == b for a, b in zip(claim.dims, found.dims)
        )
        if agree:
            # keep the declared names of dynamic dims, and any static size inference adds
            v.shape = ir.Shape([b if isinstance(b, int) else a for a, b in zip(claim.dims, found.dims)])
        else:
            # names shape inference made up (unk__N) mean nothing to a user: unnamed dynamic dims
            v.shape = ir.Shape([None if not isinstance(d, int) and str(d.value or "").startswith("unk__") else d
                                for d in found.dims])
            found = v.shape
            corrected[v.name] = f"declared {_dims(claim)}, computes {_dims(found)}"
            logger.warning("output '%s' is declared %s but the model computes %s; the declared shape is dropped",
                           v.name, _dims(claim), _dims(found))
    return corrected


def _dims(shape: ir.Shape) -> str:
    return "[" + ",".join(str(d) if isinstance(d, int) else (str(d.value) if d.value else "?") for d in shape.dims) + "]"


def _why_bn_stays(node: ir.Node, strict: bool = False) -> str | None:
    x = node.inputs[0]
    prod = x.producer() if x is not None else None
    if prod is None:
        return "input is a graph input, nothing to fold into"
    if prod.op_type not in _FOLDABLE_INTO:
        return f"preceded by {prod.op_type}, not Conv/ConvTranspose/Gemm"
    if len(x.uses()) > 1 or x.is_graph_output():
        return f"the {prod.op_type} output has other consumers"
    if len(prod.inputs) < 2 or len(prod.outputs) != 1:
        return f"{prod.op_type} has an unexpected signature"
    for w in prod.inputs[1:]:
        if w is not None and (const_array(w) is None or not w.is_initializer()):
            return f"{prod.op_type} weight '{w.name}' is not a constant initializer"
        if w is not None and len(w.uses()) > 1:
            return f"{prod.op_type} weight '{w.name}' is shared with another node"
    if any(v is None or const_array(v) is None for v in node.inputs[1:5]):
        return "BatchNorm parameters are not constants"
    if "training_mode" in node.attributes and node.attributes["training_mode"].as_int() != 0:
        return "BatchNorm is in training mode"
    if prod.op_type == "Gemm" and "transA" in prod.attributes and prod.attributes["transA"].as_int() == 1:
        return "Gemm with transA"
    if const_array(prod.inputs[1]).ndim < 2:
        return f"{prod.op_type} weight has rank < 2"
    if strict:
        return None
    return "not folded"


def _drop_attributes_newer_than_opset(model: ir.Model) -> None:
    """onnxscript's rewrites may emit Reshape(allowzero=…) at opset < 14, where the
    attribute does not exist yet. allowzero=0 is the old behaviour, and allowzero=1
    only differs from it when the shape holds a 0, so dropping it is exact otherwise."""
    opset = default_opset(model) or 0
    if opset >= 14:
        return
    for node in model.graph.all_nodes():
        if node.op_type == "Reshape" and "allowzero" in node.attributes:
            shape = const_array(node.inputs[1])
            if node.attributes["allowzero"].as_int() != 0 and (shape is None or (shape == 0).any()):
                raise ir.passes.PostconditionError("Reshape(allowzero=1) cannot be expressed before opset 14")
            del node.attributes["allowzero"]


#: the graph rewrites FoldPass runs every round after constant folding and transpose sinking
REWRITES = (
    reduce_mean_to_global_pool,
    fold_conv_affine,
    matmul_add_to_gemm,
    fuse_hard_activations,
    constant_of_shape_to_initializer,
    merge_slice_chains,
    unit_transposes_to_reshapes,
    drop_identity_arithmetic,
    drop_zero_states,
    drop_identity_gathers,
    merge_reshape_chains,
    drop_noop_reshapes,
    resize_sizes_to_scales,
)
