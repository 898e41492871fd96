"""The ``sparsify`` pass: unstructured magnitude sparsity, per layer or with one global threshold.

The smallest-magnitude weights of each Conv / Gemm / MatMul are set to zero
(``sparsity`` of them per layer, or of all eligible weights together with
``global_threshold``; no layer loses more than ``max_layer_sparsity``). Dense
ONNX tensors do not shrink on disk by themselves, so the report gives the
zipped size, which does. ``steps`` reaches the target in increments; with
calibration data and ``reconstruct`` each step refits the remaining weights
of every group-1 layer by least squares on calibration data, each output on
its own non-zero support, so the sparsity pattern is kept exactly
(:func:`passes.refit.reconstruct` with masks).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.ir_utils import clone_model, infer_shapes, node_label
from onnxcc.compiler.passbase import OnnxccPass, PassReport, Skipped
from onnxcc.compiler import weights as W
from onnxcc.passes.compression.common import storage_sizes, weights
from onnxcc.compiler.ir_utils import set_input_const


def _prune_smallest(w: np.ndarray, fraction: float) -> np.ndarray:
    k = int(round(fraction * w.size))
    if k <= 0:
        return w
    flat = w.reshape(-1).copy()
    order = np.argsort(np.abs(flat), kind="stable")  # deterministic on ties
    flat[order[:k]] = 0.0
    return flat.reshape(w.shape)


class SparsifyPass(OnnxccPass):
    name = "sparsify"
    exact = False
    summary = "unstructured magnitude sparsity (per layer or global), optional masked least-squares refit; report zipped size"

    @dataclasses.dataclass(frozen=True)
    class Config:
        sparsity: float = dataclasses.field(default=0.5, metadata={"help": "fraction of weights set to zero"})
        global_threshold: bool = dataclasses.field(default=False, metadata={"help": "one magnitude threshold over all layers instead of the same fraction per layer"})
        max_layer_sparsity: float = dataclasses.field(default=0.98, metadata={"help": "global: cap per layer"})
        steps: int = dataclasses.field(default=1, metadata={"help": "reach the sparsity in this many increments"})
        reconstruct: bool = dataclasses.field(default=False, metadata={"help": "with calibration data: refit the kept weights after each step"})
        calib_samples: int = dataclasses.field(default=64, metadata={"help": "reconstruct: calibration samples"})
        min_size: int = dataclasses.field(default=1024, metadata={"help": "leave smaller weights dense"})
        exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "node-name patterns left dense"})

        def __post_init__(self):
            if not 0.0 < self.sparsity < 1.0:
                raise ValueError("sparsity must be in (0, 1)")
            if self.steps < 1:
                raise ValueError("steps must be >= 1")

    @classmethod
    def milder(cls, config, strength: float):
        return dataclasses.replace(config, sparsity=config.sparsity * strength)

    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        skipped: list[Skipped] = []
        before = storage_sizes(model)
        original = clone_model(model) if cfg.reconstruct and self.context.calibration is not None else None
        targets = weights(model, min_size=cfg.min_size, exclude=cfg.exclude, skipped=skipped)
        if not targets:
            return PassReport(model, False, skipped=skipped)
        names = [node_label(n) for n, _ in targets]
        refit_stats = []
        for step in range(1, cfg.steps + 1):
            s = cfg.sparsity * step / cfg.steps
            current = weights(model, min_size=cfg.min_size, exclude=cfg.exclude)
            fractions = self._fractions(current, s)
            for node, w in current:
                set_input_const(model.graph, node, 1, _prune_smallest(w, fractions[node_label(node)]))
            if original is not None:
                refit_stats.append(self._refit(original, model))
        layers = {}
        total = zeros = 0
        for node, w in weights(model, min_size=cfg.min_size, exclude=cfg.exclude):
            if node_label(node) in names:
                z = int(np.sum(w == 0))
                layers[node_label(node)] = {"sparsity": round(z / w.size, 4), "weights": int(w.size)}
                total, zeros = total + w.size, zeros + z
        after = storage_sizes(model)
        stats = {"sparsity": round(zeros / max(total, 1), 4), "layers": layers, "size_before": before, "size_after": after}
        if refit_stats:
            stats["refit"] = refit_stats
        return PassReport(model, True, changed=names, skipped=skipped, stats=stats)

    def _fractions(self, targets, s: float) -> dict[str, float]:
        cfg = self.config
        if not cfg.global_threshold:
            return {node_label(n): s for n, _ in targets}
        mags = np.concatenate([np.abs(w).reshape(-1) for _, w in targets])
        k = int(round(s * mags.size))
        thr = np.partition(mags, k - 1)[k - 1] if k > 0 else -1.0
        out = {}
        for n, w in targets:
            out[node_label(n)] = min(cfg.max_layer_sparsity, float(np.mean(np.abs(w) <= thr)))
        return out

    def _refit(self, original: ir.Model, model: ir.Model) -> dict:
        from onnxcc.passes.refit import ReconstructOptions, reconstruct

        infer_shapes(model)
        masks, layers = {}, {}
        for node, _ in weights(model, min_size=self.config.min_size, exclude=self.config.exclude):
            if node.op_type == "ConvTranspose" or not node.name:
                continue
            w_mat, _ = W.as_matrix(node)
            masks[node.name] = w_mat != 0
            layers[node.name] = None
        opts = ReconstructOptions(samples=self.config.calib_samples, seed=self.context.seed)
        changed, skipped, _ = reconstruct(original, model, self.context.calibration, layers, opts, masks=masks)
        return {"refit": len(changed), "not_refit": [f"{s.layer}: {s.reason}" for s in skipped]}
