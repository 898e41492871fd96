"""One view of a layer's weight (core layer): which axis holds its outputs, which its inputs, its groups.

Pruning, least-squares reconstruction, GPTQ, equalization, weight-only
quantization and factorization all read a Conv / ConvTranspose / Gemm / MatMul
weight "by output" or "by input". The layouts they meet:

=============  ==========================  ===========  ==========
op             stored weight               output axis  input axis
=============  ==========================  ===========  ==========
Conv           [O, I/g, kh, kw]            0            1
ConvTranspose  [I, O/g, kh, kw]            1            0
Gemm           [K, N], transB=1: [N, K]    1 (0)        0 (1)
MatMul         [K, N]                      1            0
=============  ==========================  ===========  ==========

Gemm's ``alpha`` is not folded in here (callers that need ``x @ W`` exactly use
:func:`onnxcc.compiler.ir_utils.gemm_as_matmul`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.ir_utils import attr, const_array

WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def out_axis(node: ir.Node) -> int:
    """The output-channel axis of the node's stored weight."""
    op = node.op_type
    if op == "Conv":
        return 0
    if op == "Gemm":
        return 0 if attr(node, "transB", 0) else 1
    return 1  # ConvTranspose, MatMul


def in_axis(node: ir.Node) -> int:
    """The input-channel axis of the node's stored weight (per group for grouped convs)."""
    op = node.op_type
    if op == "Conv":
        return 1
    if op == "Gemm":
        return 1 if attr(node, "transB", 0) else 0
    return 0  # ConvTranspose, MatMul


def weight(node: ir.Node) -> np.ndarray | None:
    return const_array(node.inputs[1]) if len(node.inputs) > 1 else None


def by_output(node: ir.Node, w: np.ndarray | None = None) -> np.ndarray:
    """One row per output channel (a producing filter), the rest flattened."""
    w = weight(node) if w is None else w
    return np.moveaxis(w, out_axis(node), 0).reshape(w.shape[out_axis(node)], -1)


def by_input(node: ir.Node, w: np.ndarray | None = None) -> np.ndarray:
    """One row per input channel: the weight slice a consumer applies to it (a grouped Conv's
    input channel ``j·I/g + k`` meets only group ``j``'s filters: row ``W[group j, k]``)."""
    w = weight(node) if w is None else w
    g = attr(node, "group", 1) if node.op_type == "Conv" else 1
    if g > 1:
        m = w.reshape(g, w.shape[0] // g, w.shape[1], -1)  # [g, O/g, I/g, k]
        return np.moveaxis(m, 2, 1).reshape(g * w.shape[1], -1)
    return np.moveaxis(w, in_axis(node), 0).reshape(w.shape[in_axis(node)], -1)


def as_matrix(node: ir.Node, w: np.ndarray | None = None) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """(W as outputs × inputs, the function turning such a matrix back into the stored layout).

    Conv: ``[O, I/g·kh·kw]``; Gemm/MatMul: ``[N, K]``.
    """
    w = weight(node) if w is None else w
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1), lambda m: m.reshape(w.shape)
    if out_axis(node) == 0:  # Gemm transB=1
        return w, lambda m: m
    return w.T, lambda m: np.ascontiguousarray(m.T)


def grouped(node: ir.Node, w: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """``w`` as (groups, outputs per group, inputs per output), and the function undoing it."""
    if node.op_type == "Conv":
        g = attr(node, "group", 1)
        m = w.reshape(g, w.shape[0] // g, -1)
        return m, lambda a: a.reshape(w.shape)
    mat, back = as_matrix(node, w)
    return mat[None], lambda a: back(a[0])


def input_contribution(node: ir.Node, channels: np.ndarray, values: np.ndarray) -> np.ndarray:
    """What constant input channels ``channels`` with values ``values`` add to each output channel
    (kernel positions summed, Gemm's alpha applied): the bias that stands in for them."""
    w = weight(node).astype(np.float64)
    op = node.op_type
    g = attr(node, "group", 1) if op == "Conv" else 1
    if g > 1:  # channel j·I/g + k reaches group j's filters
        per, cin_g = w.shape[0] // g, w.shape[1]
        out = np.zeros(w.shape[0])
        for ch, v in zip(np.asarray(channels), np.asarray(values)):
            j, k = divmod(int(ch), cin_g)
            out[j * per:(j + 1) * per] += w[j * per:(j + 1) * per, k].reshape(per, -1).sum(1) * v
        return out
    if op == "Conv":
        return (w[:, channels].reshape(w.shape[0], len(channels), -1).sum(2) * values[None, :]).sum(1)
    if op == "ConvTranspose":
        return (w[channels].reshape(len(channels), w.shape[1], -1).sum(2) * values[:, None]).sum(0)
    rows = np.moveaxis(w, in_axis(node), 0)[channels]
    return attr(node, "alpha", 1.0) * (values @ rows) if op == "Gemm" else values @ rows


def broadcast_along(s: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    """A per-channel vector (or a scalar) shaped to broadcast along ``axis`` of an ``ndim``-D weight."""
    if s.ndim == 0:
        return s
    shape = [1] * ndim
    shape[axis] = -1
    return s.reshape(shape)
