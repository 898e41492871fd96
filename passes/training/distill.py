"""The ``distill`` pass: fine-tune the model on the graph itself against a teacher (the ``train`` extra).

The student is the model the pass receives: a pruned, factorized, sparsified or codebook model, an
INT8 QDQ model (quantization-aware training: every Q/DQ pair is fake quantization with a
straight-through estimator, weights re-quantized into their int8 initializers, the graph and its
fused kernels unchanged), a binary/ternary/int4 weight-only model (the latent float weights train
under the projection), or any network whose inputs and outputs match the teacher's. The teacher is
``teacher`` (a path) or, in a pipeline, the model the pipeline was given. The training data is the
calibration set (``--calib``; the ``distill`` command's ``--data``), with ``labels`` aligned to it
when given; a seeded held-out split of it drives early stopping and the keep-the-input guard.

torch is imported when the pass runs, never when it is listed.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.errors import BadInputError
from onnxcc.compiler.passbase import OnnxccPass, PassReport, Skipped

AUGMENTATIONS = ("flip", "crop")


def _torch():
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise BadInputError("distill needs torch: pip install 'onnxcc[train]'") from e


class DistillPass(OnnxccPass):
    name, exact = "distill", False
    summary = "fine-tune on the graph itself against a teacher (KD; QAT on QDQ models; binary/ternary/codebook training)"
    needs_calibration = True
    needs_original = True
    without_calibration = "the training inputs: the distill command's --data"

    @dataclasses.dataclass(frozen=True)
    class Config:
        teacher: str | None = dataclasses.field(default=None, metadata={"help": "teacher model (.onnx); default: the model the pipeline was given"})
        labels: str | None = dataclasses.field(default=None, metadata={"help": "labels of the training samples (.npy, one per sample): cross-entropy joins the distillation loss"})
        epochs: int = dataclasses.field(default=1, metadata={"help": "passes over the training split"})
        lr: float | None = dataclasses.field(default=None, metadata={"help": "learning rate, cosine decay to 0 (default: 1e-3; 1e-5 for a student with integer weights, QAT)"})
        batch: int = dataclasses.field(default=32, metadata={"help": "samples per step"})
        temperature: float = dataclasses.field(default=4.0, metadata={"help": "softmax temperature of the KL term"})
        label_weight: float = dataclasses.field(default=0.5, metadata={"help": "with labels: weight of cross-entropy against the distillation term"})
        feature_loss: bool = dataclasses.field(default=False, metadata={"help": "also match the teacher's tensors at the layers a previous pass changed"})
        feature_weight: float = dataclasses.field(default=1.0, metadata={"help": "weight of the feature term"})
        augment: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "image inputs: random 'flip' (horizontal) and/or 'crop' (pad 1/8, crop back)"})
        optimizer: Literal["adam", "sgd"] = dataclasses.field(default="adam", metadata={"help": "optimizer (sgd: Nesterov momentum 0.9)"})
        weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "weight decay (AdamW with adam)"})
        learn_scales: bool = dataclasses.field(default=False, metadata={"help": "QDQ models: learn the quantization scales too (LSQ)"})
        val_fraction: float = dataclasses.field(default=0.1, metadata={"help": "held-out fraction of the data for early stopping and the keep-the-input check"})
        patience: int = dataclasses.field(default=2, metadata={"help": "stop after this many epochs without held-out improvement (0: never)"})
        time_limit: float = dataclasses.field(default=0.0, metadata={"help": "wall-clock limit in seconds (0: none)"})
        threads: int = dataclasses.field(default=0, metadata={"help": "torch threads (0: one per core)"})
        samples: int = dataclasses.field(default=0, metadata={"help": "use at most this many training samples (0: all)"})

        def __post_init__(self):
            if self.epochs < 1:
                raise ValueError("epochs must be >= 1")
            if self.batch < 1:
                raise ValueError("batch must be >= 1")
            if self.lr is not None and not (self.lr > 0 and np.isfinite(self.lr)):
                raise ValueError("lr must be a positive number")
            if not self.temperature > 0:
                raise ValueError("temperature must be > 0")
            if not 0.0 <= self.label_weight <= 1.0:
                raise ValueError("label_weight must be in [0, 1]")
            if not 0.0 <= self.val_fraction < 1.0:
                raise ValueError("val_fraction must be in [0, 1)")
            if self.time_limit < 0 or self.threads < 0 or self.samples < 0 or self.patience < 0:
                raise ValueError("time_limit, threads, samples and patience must be >= 0")
            bad = [a for a in self.augment if a not in AUGMENTATIONS]
            if bad:
                raise ValueError(f"augment: unknown {bad} (choose from {', '.join(AUGMENTATIONS)})")

    @classmethod
    def milder(cls, config, strength: float):
        return None  # training only moves towards the teacher; nothing to weaken

    def call(self, model: ir.Model) -> PassReport:
        _torch()
        from onnxcc.compiler.ir_utils import load_model
        from onnxcc.compiler.progress import bar
        from onnxcc.passes.training.trainer import TrainOptions, distill

        cfg = self.config
        teacher = load_model(cfg.teacher) if cfg.teacher else getattr(self.context, "original", None)
        if teacher is None:
            raise BadInputError("distill: no teacher: give --teacher (outside a pipeline there is no original model)")
        calib = self.context.calibration
        if calib is None or calib.whole_feed or not calib.arrays:
            raise BadInputError("distill: needs training samples stacked on axis 0 (--data / --calib)")
        labels = None
        if cfg.labels:
            try:
                labels = np.load(cfg.labels, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise BadInputError(f"{cfg.labels}: cannot read labels: {e}") from e
            if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
                raise BadInputError(f"{cfg.labels}: labels must be a 1-D integer array, got {labels.shape} {labels.dtype}")
            if len(labels) != len(calib):
                raise BadInputError(f"{cfg.labels}: {len(labels)} labels for {len(calib)} training samples")
        opts = TrainOptions(
            epochs=cfg.epochs, lr=cfg.lr, batch=cfg.batch, temperature=cfg.temperature, label_weight=cfg.label_weight,
            feature_loss=cfg.feature_loss, feature_weight=cfg.feature_weight, augment=cfg.augment, seed=self.context.seed,
            time_limit=cfg.time_limit, val_fraction=cfg.val_fraction, patience=cfg.patience, threads=cfg.threads,
            learn_scales=cfg.learn_scales, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay, samples=cfg.samples,
        )
        res = distill(model, teacher, calib.arrays, labels, opts, progress=bar("distill"))
        stats = res.to_json()
        skipped = []
        if res.kept_input:
            skipped.append(Skipped("distill", res.reason))
        changed = [] if res.kept_input else [f"{res.summary['float']} float and {res.summary['quantized']} quantized weights, {res.summary['scales']} scales trained"]
        return PassReport(model, not res.kept_input, changed=changed, skipped=skipped, stats=stats)
