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

from onnxcc.compiler import weights as W
from onnxcc.compiler.calibration import ActivationCollector, Reducer, Statistics, tensor_fingerprints
from onnxcc.compiler.ir_utils import attr, const_array, node_label
from onnxcc.compiler.passbase import Skipped
from onnxcc.compiler.progress import bar
from onnxcc.passes.refit import conv_patches, sample_positions
from onnxcc.passes.quantization import ranges as R

BLOCK = 128
GRAM_BUDGET = 384 << 20  # bytes of Gram matrices (float32) accumulated in one pass over the calibration data
MAX_INPUTS = 6000  # inputs per output beyond which a layer keeps nearest rounding (its H alone would pass 140 MB)


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
        sh, sw = attr(node, "strides") or [1, 1]
        dh, dw = attr(node, "dilations") or [1, 1]
        p = attr(node, "pads") or [0, 0, 0, 0]
        ho = (x.shape[2] + p[0] + p[2] - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] + p[1] + p[3] - dw * (kw - 1) - 1) // sw + 1
        b, h, w = sample_positions(self.batch, x.shape[0], ho, wo, self.per, self.seed)
        patches = conv_patches(node, x, b, h, w)
        return patches.reshape(len(b), attr(node, "group", 1), -1)  # channels of a group are contiguous, as in the weight

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
        auto = attr(node, "auto_pad", "NOTSET")
        if (auto.decode() if isinstance(auto, bytes) else auto) not in ("NOTSET", "VALID"):
            return "auto_pad SAME"
    return None


# GPTQ needs H to describe the layer's inputs: with fewer calibration rows than this fraction of
# its inputs per output, a layer keeps nearest rounding. Dampened GPTQ still generalised at a third
# (the digits MobileNetV3 classifier: 64 rows for 193 inputs, SQNR up 0.1 dB; the torch-zoo
# EfficientNet's squeeze-excite convs and classifier, 64 rows each, up 1.8 dB with them).
MIN_ROWS_FRACTION = 0.125


class GptqRounding:
    """GPTQ codes per layer, ``{node: (int8 weight, scales, stats)}`` from :meth:`result`: each layer's
    input Gram matrix from the float model, accumulated while the calibration data streams through.

    The first memory-budgeted group of Gram matrices is declared on the pass's
    :class:`~onnxcc.compiler.calibration.Statistics` and filled by its one run over the data (with
    the ranges and the means); further groups, when the matrices pass ``GRAM_BUDGET``, take a run
    each (memory flat in the number of samples).

    ``cache`` (the pipeline's activation cache) keeps the codes by the fingerprint of the layer's
    output, which covers its weights and everything before it: the re-quantizations of mixed
    precision and of the speed guard round each unchanged layer once.
    """

    def __init__(self, stats: Statistics, nodes: list[ir.Node], cfg, skipped: list[Skipped], cache: dict):
        model = stats.model
        self.stats, self.cfg, self.skipped, self.cache = stats, cfg, skipped, cache
        self.out: dict[ir.Node, tuple] = {}
        fps = tensor_fingerprints(model)
        self.key = {n: ("gptq", fps.get(n.outputs[0].name), cfg.per_channel, cfg.calib_samples) for n in nodes}
        order = {n: i for i, n in enumerate(model.graph)}
        todo: dict[ir.Node, int] = {}  # node → bytes of its Gram matrices
        for node in sorted(nodes, key=order.__getitem__):
            if self.key[node] in cache:
                hit = cache[self.key[node]]
                if isinstance(hit, str):
                    skipped.append(Skipped(node_label(node), hit))
                else:
                    self.out[node] = hit
                continue
            why = is_supported(node)
            g, _, n = W.grouped(node, const_array(node.inputs[1]))[0].shape if why is None else (0, 0, 0)
            if why is None and n > MAX_INPUTS:
                why = f"{n} inputs per output (GPTQ's H would be too large)"
            if why:
                skipped.append(Skipped(node_label(node), f"weights rounded to nearest: {why}"))
                continue
            todo[node] = g * n * n * 4  # float32
        self.total = len(todo)
        self.groups: list[list[ir.Node]] = [[]] if todo else []
        size = 0
        for node, need in todo.items():
            if self.groups[-1] and size + need > GRAM_BUDGET:
                self.groups.append([])
                size = 0
            self.groups[-1].append(node)
            size += need
        self.first = {node: stats.add(node.inputs[0].name, InputGram(node)) for node in (self.groups[0] if self.groups else [])}

    def result(self) -> dict[ir.Node, tuple]:
        if not self.groups:
            return self.out
        self.stats.collect()
        progress = bar("GPTQ rounding")
        done = 0
        for i, group in enumerate(self.groups):
            if i == 0:
                grams = self.first
            else:
                grams = {node: InputGram(node) for node in group}
                reducers: dict[str, list] = {}
                for node, gram in grams.items():
                    reducers.setdefault(node.inputs[0].name, []).append(gram)
                ActivationCollector(self.stats.model, self.stats.calibration, batch_size=self.stats.batch_size).collect(reducers, limit=self.stats.limit)
            for node in group:
                gram = grams.pop(node)
                done += 1
                if progress:
                    progress(done, self.total)
                gptq_layer(node, gram, self.cfg, self.key[node], self.cache, self.out, self.skipped)
        return self.out


def gptq_layer(node: ir.Node, gram, cfg, key, cache: dict, out: dict, skipped: list[Skipped]) -> None:
    """One layer's GPTQ codes from its input Gram matrix, into ``out`` and ``cache``; nearest rounding (with the reason) when too few rows."""
    w = const_array(node.inputs[1])
    m, back = W.grouped(node, w)
    if gram.rows < MIN_ROWS_FRACTION * m.shape[2]:  # H says too little about the inputs: codes would fit these rows only
        why = f"weights rounded to nearest: {gram.rows} calibration rows for {m.shape[2]} inputs per output (GPTQ needs at least {MIN_ROWS_FRACTION:g} of that)"
        skipped.append(Skipped(node_label(node), why))
        cache[key] = why
        return
    axis = W.out_axis(node)
    bits = R.weight_bits(cfg)
    q_near, s_w = R.per_channel_weight(w, axis, bits=bits, per_channel=cfg.per_channel, half_scales=cfg.narrow_constants)
    s_full = np.broadcast_to(W.broadcast_along(s_w, axis, w.ndim), w.shape)
    s_g = W.grouped(node, s_full)[0][:, :, 0]  # per output: constant along the inputs
    codes = gptq_codes(m, s_g, gram.h, qmax=2 ** (bits - 1) - 1)
    q = back(codes).astype(np.int8)
    near, hat = W.grouped(node, q_near.astype(np.float64) * s_full)[0], W.grouped(node, q.astype(np.float64) * s_full)[0]
    e_near, e_gptq = output_error(m, near, gram.h), output_error(m, hat, gram.h)
    if not e_gptq < e_near:  # dampening and clipping can make it worse on a layer: keep nearest there
        q, e_gptq = q_near, e_near
    out[node] = cache[key] = (q, s_w, {"gptq_output_error_ratio": round(e_gptq / e_near, 4) if e_near > 0 else 1.0})
