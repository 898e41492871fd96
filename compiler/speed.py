"""Keep a rewrite only where onnxruntime measures it faster: the one timing guard (core layer).

Passes that trade structure for speed (``quantize --speed-guard``,
``factorize --keep-if-faster``) ask two questions, answered here the same way:

* **per layer**: both models are profiled by onnxruntime's kernel profiler
  (batch 1, :data:`THREADS` threads) twice, interleaved; a layer's time is the
  smaller of its two medians (:func:`layer_profiles`). A rewritten layer is
  *slower* when it takes more than ``ratio × before + slack`` (:func:`is_slower`);
* **whole model**: the candidates are timed side by side in alternating blocks
  (:func:`median_ms`, the ``onnxcc bench`` protocol) at each batch size of the
  policy, and the worst ratio to the first candidate decides (:func:`worst_ratio`).

The thresholds live in :data:`INT8` and :data:`FACTORIZED`, one place for both:

* INT8 keeps a layer unless it is clearly slower (×1.15 + 3 µs per layer, and
  no slower overall at batch 1 and 8): moving a layer back to float adds Q/DQ
  boundaries, so a marginal layer is better left integer; a model that wins at
  one batch and loses at the other (small feature maps) must not pass;
* a factorization costs accuracy, so it must be clearly faster (5% per layer and
  for the whole model at batch 1): on sub-millisecond models run-to-run noise is
  of that order.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import numpy as np
import onnx_ir as ir

THREADS = 2


@dataclasses.dataclass(frozen=True)
class Policy:
    layer_ratio: float  # a layer is slower when after > layer_ratio · before + layer_slack_us
    layer_slack_us: float
    model_ratio: float  # the rewritten model is kept when its worst ratio to the original is ≤ this
    batches: tuple[int, ...]
    rounds: int
    block: int


INT8 = Policy(layer_ratio=1.15, layer_slack_us=3.0, model_ratio=1.0, batches=(1, 8), rounds=3, block=8)

#: Below this many dense MACs per activation element (:func:`onnxcc.compiler.analysis.dense_intensity`)
#: INT8 is predicted slower than fp32 on x86 without measuring. Measured with onnxruntime 1.32, 2
#: threads: faster from 16.3 up (EfficientNet-style 0.83x, MobileNetV3-style 0.92x, PP-OCRv4 det
#: 0.53x at 19.4), slower at 6.2 and below (PaddleOCR's direction classifier 1.07-1.6x, the tiny
#: builders).
INT8_MIN_INTENSITY = 10.0
FACTORIZED = Policy(layer_ratio=0.95, layer_slack_us=0.0, model_ratio=0.95, batches=(1,), rounds=5, block=10)
# ``prune --target-latency`` times one model per step: the same protocol, no comparison thresholds
LATENCY_TARGET = Policy(layer_ratio=1.0, layer_slack_us=0.0, model_ratio=1.0, batches=(1,), rounds=3, block=10)


def layer_profiles(before: ir.Model, after: ir.Model, *, runs: int = 20) -> tuple[dict[str, float], dict[str, float]]:
    """Per-node kernel times (µs) of both models, profiled twice interleaved; the smaller median each."""
    from onnxcc.compiler.bench import layer_times, profile_nodes

    def times(m: ir.Model) -> dict[str, float]:
        return layer_times(m, profile_nodes(m, threads=THREADS, batch=1, runs=runs))

    runs_ = [times(before), times(after), times(before), times(after)]

    def best(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: min(a.get(k, np.inf), b.get(k, np.inf)) for k in a}

    return best(runs_[0], runs_[2]), best(runs_[1], runs_[3])


def is_slower(before_us: float, after_us: float, policy: Policy) -> bool:
    return after_us > policy.layer_ratio * before_us + policy.layer_slack_us


def median_ms(candidates: Sequence[tuple[str, ir.Model]], policy: Policy) -> dict[int, list[float]]:
    """Median latency of each candidate at each of the policy's batch sizes, timed side by side."""
    from onnxcc.compiler.bench import bench_models

    out = {}
    for batch in policy.batches:
        res = bench_models(candidates, threads=THREADS, batch=batch, rounds=policy.rounds, block=policy.block, measure_memory=False)
        out[batch] = [e.median_ms for e in res.entries]
    return out


def worst_ratio(ms: Mapping[int, Sequence[float]], i: int) -> float:
    """Candidate ``i``'s worst latency ratio to candidate 0 over the batch sizes."""
    return max(v[i] / v[0] for v in ms.values())
