"""The ``prune`` pass: structured channel pruning with the channel graph.

A uniform ratio (with per-layer and per-space overrides) is one cut,
:func:`onnxcc.passes.pruning.cut.prune_once`; a MACs / parameter / latency
target or ``steps > 1`` goes through the automatic-ratio driver,
:func:`onnxcc.passes.pruning.auto.auto_prune`. See :mod:`onnxcc.passes.pruning.cut`
for the steps of one cut and what makes ``criterion=zero`` exact.
"""

from __future__ import annotations

import onnx_ir as ir

import dataclasses

from onnxcc.compiler.passbase import OnnxccPass, PassReport, scaled_overrides
from onnxcc.passes.pruning.auto import auto_prune
from onnxcc.passes.pruning.cut import PruneConfig, is_exact, prune_once


class PrunePass(OnnxccPass):
    name = "prune"
    exact = False
    summary = "structured channel pruning: removes whole channels (filters) with every coupled tensor"
    Config = PruneConfig

    def __init__(self, config=None, context=None):
        super().__init__(config, context)
        self.exact = is_exact(self.config)

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        if self.config.criterion in ("activation", "reconstruction") and self.context.calibration is None:
            raise ir.passes.PreconditionError(f"criterion '{self.config.criterion}' needs calibration data (--calib)")
        if self.config.reconstruct and self.context.calibration is None:
            raise ir.passes.PreconditionError("reconstruction needs calibration data (--calib)")
        if (self.config.target_macs or self.config.target_params or self.config.target_latency) and self.context.calibration is None:
            raise ir.passes.PreconditionError("automatic ratios need calibration data (--calib)")

    @classmethod
    def milder(cls, config: PruneConfig, strength: float) -> PruneConfig | None:
        """Every ratio × ``strength``; a target t of MACs/params/latency → 1 − (1 − t) × strength."""
        if is_exact(config):
            return None

        def target(t):
            return None if t is None else min(0.999, 1 - (1 - t) * strength)

        return dataclasses.replace(
            config, ratio=config.ratio * strength,
            layer_ratio=scaled_overrides(config.layer_ratio, lambda r: r * strength),
            space_ratio=scaled_overrides(config.space_ratio, lambda r: r * strength),
            target_macs=target(config.target_macs), target_params=target(config.target_params),
            target_latency=target(config.target_latency),
        )

    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        if cfg.target_macs is None and cfg.target_params is None and cfg.target_latency is None and cfg.steps == 1:
            return prune_once(model, cfg, self.context, cfg.ratio, cfg.space_ratio)
        return auto_prune(model, cfg, self.context)
