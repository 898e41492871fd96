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

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript import optimizer, rewriter

from compiler.ir_utils import convert_opset, const_array, default_opset, node_label
from compiler.registry import OnnxccPass, PassReport, Skipped, register

logger = logging.getLogger(__name__)

_FOLDABLE_INTO = ("Conv", "ConvTranspose", "Gemm")


@register
class FoldPass(OnnxccPass):
    name = "fold"
    exact = True
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

    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        before = Counter(n.op_type for n in model.graph.all_nodes())
        n_before = sum(before.values())
        stats: dict = {"nodes_before": n_before}

        if cfg.opset is not None and default_opset(model) != cfg.opset:
            converted = convert_opset(model, cfg.opset)
            _replace_contents(model, converted)
            stats["opset"] = cfg.opset

        lifted = common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model).modified
        modified = lifted or stats.get("opset") is not None
        modified |= common.InlinePass()(model).modified

        rules = list(rewriter._DEFAULT_REWRITE_RULES)  # noqa: SLF001 - the public rewrite() takes the same list
        if not cfg.fold_batchnorm:
            from onnxscript.rewriter.rules.common import _fuse_batchnorm

            bn_rules = set(_fuse_batchnorm.rules.rules)
            rules = [r for r in rules if r not in bn_rules]
        rewrite = rewriter.RewritePass(rules)

        for _ in range(max(1, cfg.max_iterations)):
            changed = False
            changed |= optimizer.fold_constants(
                model,
                onnx_shape_inference=True,
                input_size_limit=cfg.size_limit,
                output_size_limit=cfg.size_limit,
            ).modified
            changed |= rewrite(model).modified
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

        after = Counter(n.op_type for n in model.graph.all_nodes())
        n_after = sum(after.values())
        stats.update(
            nodes_after=n_after,
            constants_lifted=bool(lifted),
            removed_by_op={op: before[op] - after.get(op, 0) for op in sorted(before) if before[op] > after.get(op, 0)},
            added_by_op={op: after[op] - before.get(op, 0) for op in sorted(after) if after[op] > before.get(op, 0)},
        )
        changed_layers = [f"removed {cnt} {op}" for op, cnt in stats["removed_by_op"].items()]
        changed_layers += [f"added {cnt} {op}" for op, cnt in stats["added_by_op"].items()]
        skipped = []
        if cfg.fold_batchnorm:
            for node in model.graph.all_nodes():
                if node.op_type == "BatchNormalization":
                    skipped.append(Skipped(node_label(node), _why_bn_stays(node)))
        return PassReport(model, bool(modified), changed=changed_layers, skipped=skipped, stats=stats)


def _why_bn_stays(node: ir.Node) -> str:
    x = node.inputs[0]
    prod = x.producer() if x is not None else None
    if prod is None:
        return "input is a graph input, nothing to fold into"
    if prod.op_type not in _FOLDABLE_INTO:
        return f"preceded by {prod.op_type}, not Conv/ConvTranspose/Gemm"
    if len(x.uses()) > 1 or x.is_graph_output():
        return f"the {prod.op_type} output has other consumers"
    for w in prod.inputs[1:]:
        if w is not None and const_array(w) is None:
            return f"{prod.op_type} weight '{w.name}' is not a constant"
    if any(const_array(p) is None for p in node.inputs[1:]):
        return "BatchNorm parameters are not constants"
    return "weights are shared with another node"


def _replace_contents(model: ir.Model, new: ir.Model) -> None:
    """Move ``new``'s graph and opsets into ``model`` (keeps the in-place contract)."""
    model.graph = new.graph
    model.ir_version = new.ir_version
    model.functions.clear()
    model.functions.update(new.functions)
