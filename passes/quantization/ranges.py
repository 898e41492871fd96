"""Activation ranges from calibration data, streaming: min-max, percentile, entropy (KL) and MSE.

Every method needs one pass for the min/max of each tensor; the others take a
second pass that fills a fixed 2048-bin histogram per tensor over that range.
Memory is the histograms plus one batch of activations, however many samples
are used.

* ``minmax``: the observed range.
* ``percentile``: the ``p``-th and ``(100 − p)``-th percentiles (``p`` = 99.999 by default).
* ``entropy``: the clipping range whose 8-bit histogram has the smallest
  KL divergence from the full one (the TensorRT calibration, on the
  tensor's own range; candidate ranges shrink the observed one).
* ``mse``: the clipping range minimising the expected squared error,
  ``Σ_clipped n·(x − edge)² + N_in · Δ² / 12`` with ``Δ`` the step of the range.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from onnxcc.compiler import weights as W
from onnxcc.compiler.calibration import ActivationCollector, Histogram, MinMax, Statistics

METHODS = ("minmax", "percentile", "entropy", "mse")
BINS = 2048
LEVELS = 256


class RangeRequest:
    """(lo, hi) of ``tensors``, declared on a :class:`~onnxcc.compiler.calibration.Statistics` (min/max
    reducers fed by the pass's one run over the data); :meth:`result` once it was collected.

    ``cache`` (shared by the passes of one pipeline run) keeps ranges by the tensor's content
    fingerprint (:func:`compiler.calibration.tensor_fingerprints`): a tensor whose computation no
    pass has changed since its range was collected is not collected again. The histogram methods
    need a second run (the bins come from the min/max), made by :meth:`result`.
    """

    def __init__(self, stats: Statistics, tensors: Sequence[str], *, method: str = "minmax", percentile: float = 99.999,
                 cache: dict | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown calibration method '{method}' (known: {', '.join(METHODS)})")
        self.stats, self.tensors, self.method, self.percentile, self.cache = stats, list(tensors), method, percentile, cache
        if cache is not None:
            from onnxcc.compiler.calibration import tensor_fingerprints

            fps = tensor_fingerprints(stats.model)
            self.keys = {t: (fps.get(t, t), method, percentile, stats.limit, stats.batch_size) for t in self.tensors}
            self.missing = [t for t in self.tensors if self.keys[t] not in cache]
        else:
            self.keys, self.missing = {}, list(self.tensors)
        self.minmax = {t: stats.add(t, MinMax()) for t in self.missing}

    def result(self) -> dict[str, tuple[float, float]]:
        self.stats.collect()
        mm = self.minmax
        got = {t: (min(float(r.min), 0.0) if np.isfinite(r.min) else 0.0, max(float(r.max), 0.0) if np.isfinite(r.max) else 0.0) for t, r in mm.items()}
        bad = [t for t, r in mm.items() if not (np.isfinite(r.min) and np.isfinite(r.max))]
        if bad:
            from onnxcc.compiler.errors import BadInputError

            raise BadInputError(f"calibration produced NaN/Inf activations in '{bad[0]}' (and {len(bad) - 1} more)")
        if self.method != "minmax" and got:
            hists = {t: Histogram(lo, hi, BINS) for t, (lo, hi) in got.items()}
            ActivationCollector(self.stats.model, self.stats.calibration, batch_size=self.stats.batch_size).collect(
                {t: [h] for t, h in hists.items()}, limit=self.stats.limit)
            got = {t: choose_range(h.counts, h.edges, self.method, self.percentile) for t, h in hists.items()}
        if self.cache is None:
            return got
        for t in self.missing:
            self.cache[self.keys[t]] = got[t]
        self.cache.setdefault("_stats", {"collected": 0, "reused": 0})
        self.cache["_stats"]["collected"] += len(self.missing)
        self.cache["_stats"]["reused"] += len(self.tensors) - len(self.missing)
        return {t: self.cache[self.keys[t]] for t in self.tensors}


def choose_range(counts: np.ndarray, edges: np.ndarray, method: str, percentile: float = 99.999) -> tuple[float, float]:
    lo, hi = float(edges[0]), float(edges[-1])
    total = counts.sum()
    if total == 0 or hi <= lo:
        return lo, hi
    if method == "percentile":
        cdf = np.cumsum(counts) / total
        q = percentile / 100.0
        i_hi = int(np.searchsorted(cdf, q))
        i_lo = int(np.searchsorted(cdf, 1.0 - q))
        new_hi = float(edges[min(i_hi + 1, len(edges) - 1)]) if hi > 0 else hi
        new_lo = float(edges[i_lo]) if lo < 0 else lo
        return min(new_lo, 0.0), max(new_hi, 0.0)
    zero_bin = int(np.clip(np.searchsorted(edges, 0.0) - 1, 0, len(counts) - 1))
    centers = (edges[:-1] + edges[1:]) / 2
    best, best_err = (lo, hi), np.inf
    for t in np.linspace(0.25, 1.0, 61):
        c_lo, c_hi = lo * t, hi * t
        if method == "mse":
            step = (c_hi - c_lo) / (LEVELS - 1)
            inside = (centers >= c_lo) & (centers <= c_hi)
            err = float((counts[~inside] * (np.clip(centers[~inside], c_lo, c_hi) - centers[~inside]) ** 2).sum())
            err += float(counts[inside].sum()) * step * step / 12.0
        else:
            err = _kl(counts, edges, c_lo, c_hi, zero_bin)
        if err < best_err - 1e-12:
            best, best_err = (c_lo, c_hi), err
    return best


def _kl(counts: np.ndarray, edges: np.ndarray, c_lo: float, c_hi: float, zero_bin: int) -> float:
    """KL(P‖Q): P the histogram clipped to [c_lo, c_hi] (outliers in the edge bins), Q its 256-level quantisation."""
    i0 = int(np.clip(np.searchsorted(edges, c_lo, side="right") - 1, 0, len(counts) - 1))
    i1 = int(np.clip(np.searchsorted(edges, c_hi, side="left"), i0 + 1, len(counts)))
    raw = counts[i0:i1].astype(np.float64)
    p = raw.copy()
    p[0] += counts[:i0].sum()
    p[-1] += counts[i1:].sum()
    n = p.size
    if n <= LEVELS:
        return 0.0
    if i0 <= zero_bin < i1:
        # 0 is exactly representable: the spike of zeros (ReLU outputs) would otherwise be smeared
        # over its whole quantization level in Q and make every wide range look bad.
        raw = raw.copy()
        raw[zero_bin - i0] = 0.0
        p[zero_bin - i0] = 0.0
    # Q is built from the in-range counts only: the outliers folded into P's edge bins are what
    # Q cannot represent, so clipping too much costs divergence (TensorRT's calibration).
    bounds = np.linspace(0, n, LEVELS + 1).astype(np.int64)
    nz = raw > 0
    sums = np.add.reduceat(raw, bounds[:-1])
    cnt = np.add.reduceat(nz.astype(np.float64), bounds[:-1])
    q = np.repeat(np.where(cnt > 0, sums / np.maximum(cnt, 1), 0.0), np.diff(bounds)) * nz
    mask = p > 0
    if q.sum() <= 0:  # nothing left inside this range: it represents none of the distribution
        return float("inf")
    ps, qs = p[mask] / p.sum(), q[mask] / q.sum()
    qs = np.maximum(qs, 1e-12)
    return float((ps * np.log(ps / qs)).sum())


def qparams(lo: float, hi: float, dtype: str = "uint8", symmetric: bool = False) -> tuple[np.float32, int]:
    """Scale and zero point of an affine 8-bit quantizer covering [lo, hi] (which always contains 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        m = max(-lo, hi)
        lo, hi = -m, m
    qmin, qmax = (0, 255) if dtype == "uint8" else (-128, 127)
    scale = (hi - lo) / (qmax - qmin)
    if scale <= 0 or not np.isfinite(scale):
        scale = 1.0
        return np.float32(scale), (0 if dtype == "uint8" else 0)
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    if symmetric and dtype == "int8":
        zp = 0
    return np.float32(scale), zp


def weight_bits(cfg) -> int:
    """7 with ``reduce_range`` and uint8 activations (no int16 saturation on AVX2), else 8."""
    return 7 if getattr(cfg, "reduce_range", False) and getattr(cfg, "activations", "uint8") == "uint8" else 8


def per_channel_weight(w: np.ndarray, axis: int, bits: int = 8, per_channel: bool = True, half_scales: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 (or narrower) weights: (quantized int8 array, float32 scales).

    The scale is max|w| / qmax, unless the weights lie on an integer grid that fits the codes
    (see :func:`grid_scale`): then they are stored exactly. ``half_scales``: max|w| / qmax is
    rounded up to the next float16 value where that moves it by at most 2^-10 (float16's normal
    range), so the scales can be stored as float16 (:func:`emission.narrow_constants`).
    """
    qmax = 2 ** (bits - 1) - 1
    red = tuple(i for i in range(w.ndim) if i != axis) if per_channel else tuple(range(w.ndim))
    m = np.abs(w).max(axis=red) if red else np.abs(w)
    scale = np.where(m > 0, m / qmax, 1.0).astype(np.float32)
    if half_scales:
        scale = half_up(scale)
    if red:
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1) if per_channel else w.reshape(1, -1)
        grid = grid_scale(rows, qmax).reshape(scale.shape)
        scale = np.where(np.isnan(grid), scale, grid).astype(np.float32)
    return weight_codes(w, scale, axis, qmax), scale


def weight_codes(w: np.ndarray, scale: np.ndarray, axis: int, qmax: int) -> np.ndarray:
    """Symmetric int8 codes of ``w`` at ``scale`` (per channel along ``axis``, or one scalar)."""
    return np.clip(np.round(w / W.broadcast_along(scale, axis, w.ndim)), -qmax, qmax).astype(np.int8)


def half_up(scale: np.ndarray) -> np.ndarray:
    """Each float32 scale rounded up to a float16 value, where it lies in float16's normal range
    (relative step 2^-10 at most); the others unchanged. Up: the largest weight keeps its code."""
    h = scale.astype(np.float16)
    h = np.where(h.astype(np.float32) < scale, np.nextafter(h, np.float16(np.inf)), h)
    ok = (scale >= np.finfo(np.float16).tiny) & (scale <= np.finfo(np.float16).max / 2) & np.isfinite(h)
    return np.where(ok, h.astype(np.float32), scale).astype(np.float32)


def grid_scale(rows: np.ndarray, qmax: int, probe: int = 64) -> np.ndarray:
    """Per row of weights: a scale that stores every weight of the row exactly, or NaN.

    Weights that are integer multiples of their smallest non-zero magnitude, with at most ``qmax``
    steps, are a grid: YOLOv8's DFL conv holds 0, 1, ..., 15, which max/qmax rounds (15/63 per code
    at 7 bits) and which 1/4 per code stores exactly. The scale is the step divided by the largest
    whole factor that still fits ``qmax``, so the codes use the range as max/qmax would. Only the
    rows whose first ``probe`` weights are on their grid are checked whole (trained weights
    almost never are), so a large model costs one small pass.
    """
    out = np.full(rows.shape[0], np.nan)
    a = np.abs(rows)
    step = np.where(a > 0, a, np.inf).min(axis=1).astype(np.float64)
    live = np.flatnonzero(np.isfinite(step))

    def on_grid(x: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ratio = x.astype(np.float64) / s[:, None]
        steps = np.round(ratio)
        return (np.abs(ratio - steps) <= 1e-6 * np.maximum(steps, 1)).all(axis=1), steps.max(axis=1)

    exact, _ = on_grid(a[live, :probe], step[live])
    live = live[exact]
    if live.size:
        exact, top = on_grid(a[live], step[live])
        ok = exact & (top >= 1) & (top <= qmax)
        out[live[ok]] = step[live[ok]] / np.floor(qmax / top[ok])
    return out


def summarize(ranges: Mapping[str, tuple[float, float]]) -> dict[str, list[float]]:
    return {k: [round(v[0], 6), round(v[1], 6)] for k, v in ranges.items()}
