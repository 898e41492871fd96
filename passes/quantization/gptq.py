"""GPTQ weight rounding (Frantar et al., 2023): int8 codes chosen for the layer's output, not weight by weight.

Rounding every weight to its nearest code minimises the error of each weight; what the
network sees is the error of the layer's output, ``‖(W − Ŵ) X‖²`` over its inputs ``X``.
GPTQ quantizes the input columns one after another and spreads each column's rounding error
over the columns not yet quantized, weighted by the inverse of ``H = X Xᵀ``: the inputs that
move together with the quantized one absorb its error (Optimal Brain Quantization, processed in
blocks of 128 columns with one matrix product per block for the rest).

``H`` comes from the calibration data: im2col rows at up to 128 sampled output positions per
image, accumulated in float32 while the data streams through the float model (memory flat in
the number of samples; as many layers per pass as fit in ``GRAM_BUDGET``). Grouped and depthwise convolutions get one ``H`` per group and
are solved together. Scales stay those of nearest rounding (``max |w| / 127`` per output
channel), so the format, the file and the kernels are unchanged; only the codes differ.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from compiler.calibration import Reducer
from compiler.ir_utils import const_array
from passes.pruning.dependency import _attr
from passes.pruning.reconstruct import conv_patches, sample_positions

BLOCK = 128
GRAM_BUDGET = 384 << 20  # bytes of Gram matrices (float32) accumulated in one pass over the calibration data
MAX_INPUTS = 6000  # inputs per output beyond which a layer keeps nearest rounding (its H alone would pass 140 MB)


def weight_groups(node: ir.Node, w: np.ndarray) -> tuple[np.ndarray, callable]:
    """``w`` as (groups, outputs per group, inputs per output), and the function undoing it."""
    if node.op_type == "Conv":
        g = _attr(node, "group", 1)
        m = w.reshape(g, w.shape[0] // g, -1)
        return m, lambda a: a.reshape(w.shape)
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return w[None], lambda a: a[0]
    return w.T[None], lambda a: np.ascontiguousarray(a[0].T)


class InputGram(Reducer):
    """``Σ x xᵀ`` per group over the layer's input rows (im2col patches at sampled positions for a conv)."""

    def __init__(self, node: ir.Node, rows_per_sample: int = 128, seed: int = 0):
        self.node, self.per, self.seed = node, rows_per_sample, seed
        self.h: np.ndarray | None = None
        self.rows = 0
        self.batch = 0

    def _rows(self, x: np.ndarray) -> np.ndarray:
        node = self.node
        if node.op_type != "Conv":
            return x.reshape(-1, 1, x.shape[-1])
        kh, kw = const_array(node.inputs[1]).shape[2:]
        sh, sw = _attr(node, "strides") or [1, 1]
        dh, dw = _attr(node, "dilations") or [1, 1]
        p = _attr(node, "pads") or [0, 0, 0, 0]
        ho = (x.shape[2] + p[0] + p[2] - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] + p[1] + p[3] - dw * (kw - 1) - 1) // sw + 1
        b, h, w = sample_positions(self.batch, x.shape[0], ho, wo, self.per, self.seed)
        patches = conv_patches(node, x, b, h, w)
        return patches.reshape(len(b), _attr(node, "group", 1), -1)  # channels of a group are contiguous, as in the weight

    def update(self, x: np.ndarray) -> None:
        a = self._rows(x).astype(np.float32)
        self.batch += 1
        prod = np.einsum("rgi,rgj->gij", a, a, optimize=True) if a.shape[1] > 1 else (a[:, 0].T @ a[:, 0])[None]
        if self.h is None:
            self.h = prod
        else:
            self.h += prod  # float32: half the memory of float64, ample for a dampened solve
        self.rows += a.shape[0]


def gptq_codes(w: np.ndarray, scale: np.ndarray, h: np.ndarray, *, damp: float = 0.01, qmax: int = 127) -> np.ndarray:
    """Integer codes for ``w`` (G, O, N) with per-output scales ``scale`` (G, O), given ``h`` (G, N, N).

    Columns whose input is always zero (``h[i, i] == 0``) take their nearest code. ``damp`` adds
    that fraction of the mean diagonal to ``h`` (the usual GPTQ dampening).
    """
    g, o, n = w.shape
    work = w.astype(np.float64).copy()
    s = scale.astype(np.float64)
    h = h.astype(np.float64).copy()
    idx = np.arange(n)
    diag = h[:, idx, idx]
    dead = diag <= 0
    mean = np.where(dead.all(1), 1.0, np.sum(np.where(dead, 0, diag), 1) / np.maximum((~dead).sum(1), 1))
    h[:, idx, idx] = np.where(dead, 1.0, diag) + damp * mean[:, None]
    # upper Cholesky factor of H⁻¹: the rows OBQ reads its updates from
    u = np.swapaxes(np.linalg.cholesky(np.linalg.inv(h)), 1, 2)
    codes = np.zeros((g, o, n))
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        blk = work[:, :, b0:b1]
        err = np.zeros_like(blk)
        for i in range(b1 - b0):
            col = blk[:, :, i]
            q = np.clip(np.round(col / s), -qmax, qmax)
            codes[:, :, b0 + i] = q
            e = (col - q * s) / u[:, None, b0 + i, b0 + i]
            e = np.where(dead[:, None, b0 + i], 0.0, e)
            blk[:, :, i:] -= e[:, :, None] * u[:, None, b0 + i, b0 + i:b1]
            err[:, :, i] = e
        if b1 < n:
            work[:, :, b1:] -= err @ u[:, b0:b1, b1:]
    return codes


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """``Σ_g trace((W − Ŵ) H (W − Ŵ)ᵀ)``: the squared output error over the rows that made ``h``."""
    d = (w_hat - w).astype(np.float64)
    return float(np.sum((d @ h) * d))


def is_supported(node: ir.Node) -> str | None:
    """Why GPTQ does not apply to ``node`` (None if it does)."""
    w = const_array(node.inputs[1])
    if w is None:
        return "weight not constant"
    if node.op_type == "Conv":
        if w.ndim != 4:
            return "not a 2-D conv"
        auto = _attr(node, "auto_pad", "NOTSET")
        if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", "VALID"):
            return "auto_pad SAME"
    return None
