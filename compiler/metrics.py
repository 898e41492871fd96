"""Error measures shared by verification and by the passes' per-layer reports (core layer)."""

from __future__ import annotations

import math

import numpy as np


def sqnr_db(ref: np.ndarray, approx: np.ndarray, *, cap: float | None = None, digits: int | None = None) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σref² / Σ(ref−approx)²)`` in dB, in float64.

    Identical arrays give ``inf`` and a zero reference with any error ``-inf``; ``cap`` clips the
    result to ``[-cap, cap]`` where differences of two SQNRs are taken (an error contribution), and
    ``digits`` rounds it for a report.
    """
    r = np.asarray(ref, dtype=np.float64)
    noise = float(np.sum((r - np.asarray(approx, dtype=np.float64)) ** 2))
    signal = float(np.sum(r * r))
    if noise == 0:
        value = math.inf
    elif signal == 0:
        value = -math.inf
    else:
        value = 10 * math.log10(signal / noise)
    if cap is not None:
        value = min(max(value, -cap), cap)
    return round(value, digits) if digits is not None and math.isfinite(value) else value


def weight_sqnr(ref: np.ndarray, stored: np.ndarray) -> float:
    """A stored (quantized, clustered, fp16) weight's SQNR against its float original, as the
    per-layer reports show it: two decimals."""
    return sqnr_db(ref, stored, digits=2)
