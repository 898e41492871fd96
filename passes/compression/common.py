"""What the storage passes share: which weights they touch, and what a model weighs on disk and zipped."""

from __future__ import annotations

import fnmatch
import zlib

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.ir_utils import const_array, node_label
from onnxcc.compiler.passbase import Skipped

WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def weights(model: ir.Model, *, min_size: int, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (), skipped: list[Skipped] | None = None):
    """(node, float32 weight array) for each Conv/ConvTranspose/Gemm/MatMul whose weight the pass may rewrite."""
    out = []
    for node in model.graph:
        if node.op_type not in WEIGHTED or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        w = const_array(node.inputs[1])
        if w is None or w.dtype != np.float32:
            continue
        name = node.name or ""
        why = None
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            why = "not matched by --layers"
        elif any(fnmatch.fnmatchcase(name, p) for p in exclude):
            why = "excluded by pattern"
        elif w.size < min_size:
            why = f"{w.size} weights < min_size {min_size}"
        elif len(node.inputs[1].uses()) > 1:
            why = "weight is shared with another node"
        if why:
            if skipped is not None:
                skipped.append(Skipped(node_label(node), why))
            continue
        out.append((node, w))
    return out


def storage_sizes(model: ir.Model) -> dict[str, int]:
    """Serialized size and zipped size (deflate at level 6, zip's and gzip's default) of the model, in bytes.

    Level 9 is within about 1% of it but several times slower on sparse models (15 s on a
    60%-sparse ResNet-50, which the report measures twice per pass)."""
    data = ir.to_proto(model).SerializeToString()
    return {"bytes": len(data), "zipped_bytes": len(zlib.compress(data, 6))}
