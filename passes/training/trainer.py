"""The distillation loop: a student graph trained to reproduce a teacher graph, both in torch.

The loss, per float output the two models share:

* classification-like outputs (logits ``[N, C]``, sequence logits ``[N, T, C]`` over the last axis,
  or a Softmax's input) — KL divergence between the
  teacher's and the student's distributions at temperature T, times T² (Hinton et al. 2015); a
  Softmax at the output is looked through to its logits, over the Softmax's own axis, so an OCR
  head ``[N, T, C]`` is matched position by position;
* any other output (a detection map, a regression) — the mean squared error over the teacher's
  variance;
* with labels, the first classification output also gets cross-entropy, weighted
  ``label_weight`` against the distillation term;
* with ``feature_loss``, the tensors both graphs compute under one name with one shape at the
  layers a previous pass changed (the outputs of the layers whose weights differ in shape, or that
  the teacher does not have: the least-squares refit's targets) are matched by normalized MSE.

A seeded held-out split of the data measures each epoch (accuracy with labels, else agreement
with the teacher and the distillation loss); the best epoch is kept, training stops early after
``patience`` epochs without improvement or at the wall-clock limit. When no epoch beats the
student as it came in by more than the held-out split's noise (paired per-chunk scores, two
standard errors: :func:`improves_beyond_noise`), the student is left as it was and the result says so.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import resource
import time
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F

from onnxcc.compiler.errors import BadInputError
from onnxcc.passes.training.bridge import WEIGHT_SLOTS, GraphModule


SCALE_LR = 0.01  # learning-rate factor of learned quantization scales
LR_FLOAT = 1e-3  # default learning rate (Adam) of float, binary/ternary and codebook students
# default for integer (QDQ, int8/int4 weight-only) students: Adam moves every weight by about the
# learning rate per step, and a code changes once its latent weight has moved half a scale step
LR_QAT = 1e-5


@dataclasses.dataclass
class TrainOptions:
    epochs: int = 1
    lr: float | None = None  # None: LR_FLOAT, or LR_QAT when the student has integer weights
    batch: int = 32
    temperature: float = 4.0
    label_weight: float = 0.5
    feature_loss: bool = False
    feature_weight: float = 1.0
    augment: Sequence[str] = ()
    seed: int = 0
    time_limit: float = 0.0
    val_fraction: float = 0.1
    patience: int = 2
    threads: int = 0
    learn_scales: bool = False
    optimizer: str = "adam"
    weight_decay: float = 0.0
    samples: int = 0


@dataclasses.dataclass
class TrainResult:
    history: list[dict[str, Any]]
    kept_input: bool
    reason: str
    baseline: dict[str, Any]
    best: dict[str, Any]
    seconds_per_epoch: float
    images_per_s: float
    peak_rss_mb: float  # resident memory, peak while training
    rss_before_mb: float  # resident memory when training started (models, data, teacher loaded)
    summary: dict[str, Any]
    features: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------ outputs and features
@dataclasses.dataclass
class _Head:
    """How one output is compared: the student/teacher values whose tensors enter the loss."""

    s_value: ir.Value
    t_value: ir.Value
    kind: str  # "kl" | "mse"
    axis: int = -1
    probs: bool = False


def _heads(student: ir.Model, teacher: ir.Model, s_out: list[torch.Tensor], t_out: list[torch.Tensor]) -> list[_Head]:
    heads = []
    for sv, tv, so, to in zip(student.graph.outputs, teacher.graph.outputs, s_out, t_out):
        if not to.is_floating_point():
            continue
        sp, tp = sv.producer(), tv.producer()
        if (sp is not None and tp is not None and sp.op_type == tp.op_type == "Softmax"
                and tuple(so.shape) == tuple(to.shape)):
            axis = sp.attributes["axis"].value if "axis" in sp.attributes else -1
            heads.append(_Head(sp.inputs[0], tp.inputs[0], "kl", axis))
        elif to.dim() == 2 and to.shape[1] > 1:
            heads.append(_Head(sv, tv, "kl", 1))
        elif to.dim() == 3 and to.shape[-1] > 1:  # sequence logits ([N, T, C] or [T, N, C]: CTC heads)
            heads.append(_Head(sv, tv, "kl", -1))
        else:
            heads.append(_Head(sv, tv, "mse"))
    return heads


def feature_pairs(student: ir.Model, teacher: ir.Model) -> list[tuple[ir.Value, ir.Value]]:
    """Tensors both graphs compute under one name and shape, at the outputs of the layers a pass
    changed: a weighted layer whose weight shape differs from the teacher's layer of that name, or
    that the teacher does not have (a factorized layer's last node), whose output the teacher
    has."""
    t_vals = {v.name: v for n in teacher.graph for v in n.outputs if v is not None}
    t_nodes = {n.name: n for n in teacher.graph}
    pairs = []
    for n in student.graph:
        if n.op_type not in WEIGHT_SLOTS or not n.outputs or n.outputs[0] is None:
            continue
        out = n.outputs[0]
        tv = t_vals.get(out.name)
        if tv is None or out.is_graph_output():
            continue
        tn = t_nodes.get(n.name)
        changed = tn is None or tn.op_type != n.op_type or any(
            (a.shape if a is not None else None) != (b.shape if b is not None else None)
            for a, b in zip(n.inputs[1:2], tn.inputs[1:2]))
        if changed:
            pairs.append((out, tv))
    return pairs


def _kl(s: torch.Tensor, t: torch.Tensor, axis: int, temp: float) -> torch.Tensor:
    ls = F.log_softmax(s / temp, dim=axis)
    lt = F.log_softmax(t / temp, dim=axis)
    kl = (lt.exp() * (lt - ls)).sum(axis)
    return kl.mean() * temp * temp


def _nmse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # population variance: one element (a [N] output at batch 1) has variance 0, not NaN
    return F.mse_loss(s, t) / (t.var(correction=0) + 1e-8)


#: an epoch replaces the student as given only when its held-out gain exceeds this many standard errors
NOISE_SE = 2.0


def improves_beyond_noise(base: np.ndarray, trained: np.ndarray) -> bool:
    """Whether a trained student's held-out improvement over the student as given is larger than
    the split's noise. ``base`` and ``trained`` hold, per chunk of the held-out split (the same
    chunks), the loss and the main metric (accuracy or top-1 agreement; NaN when there is none).
    The mean paired gain in the metric, or in the loss with the metric not lower, must exceed two
    standard errors of that gain (:data:`NOISE_SE`). On a small split, a student already at the
    teacher's level (a QAT start) otherwise takes a loss change of a few parts in ten thousand for an
    improvement, and is replaced by weights that score lower on data never seen. One standard error
    let digits MobileNetV3's QAT through on one training seed in three, one held-out image below PTQ."""

    def gain(d: np.ndarray) -> tuple[float, float]:
        return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))

    has_metric = not (np.isnan(base[:, 1]).any() or np.isnan(trained[:, 1]).any())
    metric_gain, metric_se = gain(trained[:, 1] - base[:, 1]) if has_metric else (0.0, 0.0)
    loss_gain, loss_se = gain(base[:, 0] - trained[:, 0])
    if metric_gain > 0 and metric_gain > NOISE_SE * metric_se:
        return True
    return metric_gain >= 0 and loss_gain > 0 and loss_gain > NOISE_SE * loss_se


# ------------------------------------------------------------------ data
def _augment(x: torch.Tensor, kinds: Sequence[str], gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip / random crop (pad 1/8 of the side, reflect, crop back) of an image
    batch, NCHW or NHWC (the channel axis is the one of size 1, 3 or 4 that is not the largest)."""
    if x.dim() != 4 or not x.is_floating_point():
        return x
    nhwc = x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4)
    if nhwc:
        x = x.permute(0, 3, 1, 2)
    n, _, h, w = x.shape
    if "flip" in kinds:
        flip = torch.rand(n, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    if "crop" in kinds:
        ph, pw = max(1, h // 8), max(1, w // 8)
        padded = F.pad(x, (pw, pw, ph, ph), mode="reflect" if ph < h and pw < w else "replicate")
        dy = torch.randint(0, 2 * ph + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pw + 1, (n,), generator=gen)
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return x.permute(0, 2, 3, 1) if nhwc else x


def _batches(arrays: Mapping[str, np.ndarray], idx: np.ndarray, batch: int):
    for k in range(0, len(idx), batch):
        sel = idx[k:k + batch]
        yield sel, {name: torch.from_numpy(np.array(a[sel])) for name, a in arrays.items()}


class PeakRss:
    """The process's resident memory sampled every 20 ms while training runs (Linux: /proc; elsewhere
    the lifetime peak from getrusage), so a run reports its own peak, not the process's."""

    def __init__(self):
        import threading

        self.peak = self.start = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _now() -> float:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, ValueError, IndexError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._now())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())


# ------------------------------------------------------------------ the loop
def check_compatible(student: ir.Model, teacher: ir.Model) -> None:
    """The student must take the teacher's inputs and give its outputs (count, names of inputs)."""
    s_in = [v.name for v in student.graph.inputs if not v.is_initializer()]
    t_in = [v.name for v in teacher.graph.inputs if not v.is_initializer()]
    if set(s_in) != set(t_in):
        raise BadInputError(f"distill: the student's inputs {s_in} are not the teacher's {t_in}")
    if len(student.graph.outputs) != len(teacher.graph.outputs):
        raise BadInputError(f"distill: the student has {len(student.graph.outputs)} outputs, the teacher {len(teacher.graph.outputs)}")


def distill(student: ir.Model, teacher: ir.Model, arrays: Mapping[str, np.ndarray], labels: np.ndarray | None,
            opts: TrainOptions, progress: Any = None) -> TrainResult:
    """Train ``student`` (in place: the trained values are written back into its graph) to match
    ``teacher`` on ``arrays`` (samples on axis 0, by input name)."""
    check_compatible(student, teacher)
    threads = opts.threads or os.cpu_count() or 1
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _distill(student, teacher, arrays, labels, opts, progress)
    finally:
        torch.set_num_threads(old_threads)


def _teacher_weights(teacher: ir.Model) -> dict[tuple[str, int], np.ndarray]:
    from onnxcc.compiler.ir_utils import const_array

    out = {}
    for n in teacher.graph:
        for i in WEIGHT_SLOTS.get(n.op_type, ()):
            if i < len(n.inputs):
                a = const_array(n.inputs[i])
                if a is not None and np.issubdtype(a.dtype, np.floating):
                    out[(n.name, i)] = a
    return out


def _distill(student, teacher, arrays, labels, opts: TrainOptions, progress) -> TrainResult:
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    n = len(next(iter(arrays.values())))
    if opts.samples and opts.samples < n:
        keep = np.sort(rng.permutation(n)[: opts.samples])
        arrays = {k: v[keep] for k, v in arrays.items()}
        labels = labels[keep] if labels is not None else None
        n = opts.samples
    if labels is not None:
        labels = np.asarray(labels)
        if len(labels) < n:
            raise BadInputError(f"distill: {len(labels)} labels for {n} training samples")
        labels = labels[:n]
    s_mod = GraphModule(student, learn_scales=opts.learn_scales, init_weights=_teacher_weights(teacher))
    t_mod = GraphModule(teacher, train_weights=False)
    scale_names = set(s_mod.scale_params.values())
    weights = [p for name, p in s_mod.named_parameters() if name not in scale_names]
    scales = [p for name, p in s_mod.named_parameters() if name in scale_names]
    params = weights + scales
    if not params:
        raise BadInputError("distill: the student has no weights the bridge can train")
    pairs = feature_pairs(student, teacher) if opts.feature_loss else []
    # outputs must match: shapes on one sample
    probe = {k: torch.from_numpy(np.array(v[:2])) for k, v in arrays.items()}
    with torch.no_grad():
        s_out, t_out = s_mod(probe), t_mod(probe)
    for i, (so, to) in enumerate(zip(s_out, t_out)):
        if tuple(so.shape) != tuple(to.shape) or so.dtype != to.dtype:
            raise BadInputError(f"distill: the student's output {i} ('{student.graph.outputs[i].name}') is {tuple(so.shape)} "
                                f"{so.dtype}, the teacher's is {tuple(to.shape)} {to.dtype}")
    if pairs:  # same name, same shape at run time (a cut layer's own output has fewer channels)
        with torch.no_grad():
            _, sc = s_mod(probe, capture=[p[0] for p in pairs])
            _, tc = t_mod(probe, capture=[p[1] for p in pairs])
        pairs = [p for p in pairs if tuple(sc[p[0]].shape) == tuple(tc[p[1]].shape) and sc[p[0]].is_floating_point()]
    heads = _heads(student, teacher, s_out, t_out)
    s_cap = [h.s_value for h in heads] + [p[0] for p in pairs]
    t_cap = [h.t_value for h in heads] + [p[1] for p in pairs]
    cls_head = next((h for h in heads if h.kind == "kl"), None)
    if labels is not None and cls_head is None:
        raise BadInputError("distill: labels given but the model has no classification output (logits [N, C] or a Softmax)")

    perm = rng.permutation(n)
    n_val = int(round(opts.val_fraction * n)) if n >= 10 and opts.val_fraction > 0 else 0
    val_idx, train_idx = np.sort(perm[:n_val]), perm[n_val:]
    if len(train_idx) == 0:
        raise BadInputError("distill: no training samples left after the held-out split")

    def losses(s_vals, t_vals, y):
        kd = torch.zeros(())
        for k, h in enumerate(heads):
            s, t = s_vals[k], t_vals[k]
            kd = kd + (_kl(s, t, h.axis, opts.temperature) if h.kind == "kl" else _nmse(s, t))
        kd = kd / max(len(heads), 1)
        total = kd
        if y is not None:
            logits = s_vals[heads.index(cls_head)]
            ax = cls_head.axis % logits.dim()
            ce = F.cross_entropy(logits.movedim(ax, 1) if logits.dim() > 2 else logits, y)
            total = (1 - opts.label_weight) * kd + opts.label_weight * ce
        if pairs:
            fl = sum(_nmse(s_vals[len(heads) + j], t_vals[len(heads) + j]) for j in range(len(pairs))) / len(pairs)
            total = total + opts.feature_weight * fl
        return total

    # the held-out split is scored in about 16 chunks: their paired differences tell an epoch's
    # improvement over the student as given from the noise of a small split (see beats_input)
    val_chunk = max(1, min(64, n_val // 16))
    chunk_scores: dict[int, np.ndarray] = {}  # epoch -> per-chunk (loss, main metric)

    def evaluate(epoch: int) -> dict[str, Any]:
        if not n_val:
            return {}
        s_mod.eval()
        tot, agree, correct, count, has_acc = 0.0, 0, 0, 0, False
        per_chunk = []
        with torch.no_grad():
            for sel, feeds in _batches(arrays, val_idx, val_chunk):
                _, sv = s_mod(feeds, capture=s_cap)
                _, tv = t_mod(feeds, capture=t_cap)
                s_vals, t_vals = [sv[v] for v in s_cap], [tv[v] for v in t_cap]
                y = torch.from_numpy(labels[sel]).long() if labels is not None else None
                loss = float(losses(s_vals, t_vals, y))
                tot += loss * len(sel)
                main = np.nan
                if cls_head is not None:
                    k = heads.index(cls_head)
                    pred = s_vals[k].argmax(cls_head.axis)
                    hits = int((pred == t_vals[k].argmax(cls_head.axis)).sum())
                    agree += hits
                    main = hits / pred.numel()
                    if y is not None and pred.dim() == 1:
                        ok = int((pred == y).sum())
                        correct += ok
                        main = ok / len(sel)
                        has_acc = True
                    count += pred.numel()
                per_chunk.append((loss, main))
        chunk_scores[epoch] = np.asarray(per_chunk, dtype=np.float64)
        out: dict[str, Any] = {"val_loss": tot / len(val_idx)}
        if count:
            out["val_agreement"] = agree / count
            if has_acc:
                out["val_accuracy"] = correct / len(val_idx)
        return out

    def beats_input(epoch: int) -> bool:
        # a best epoch already scores above the student as given; with one chunk there is no noise estimate
        return len(chunk_scores[0]) < 2 or improves_beyond_noise(chunk_scores[0], chunk_scores[epoch])

    def score(m: dict[str, Any]) -> tuple:
        if not m:
            return (0.0,)
        main = m.get("val_accuracy", m.get("val_agreement"))
        return ((main if main is not None else 0.0), -m["val_loss"])

    baseline = evaluate(0)
    best, best_state, best_epoch = baseline, copy.deepcopy(s_mod.state_dict()), 0
    lr = opts.lr if opts.lr is not None else (LR_QAT if any(q.kind == "int" for q in s_mod.quant_weights.values()) else LR_FLOAT)
    steps_per_epoch = -(-len(train_idx) // opts.batch)
    total_steps = max(1, steps_per_epoch * opts.epochs)
    # learned scales move at a hundredth of the weights' rate (LSQ's gradient is large next to a scale's size)
    groups = [{"params": weights}] + ([{"params": scales, "lr": lr * SCALE_LR, "weight_decay": 0.0}] if scales else [])
    if opts.optimizer == "sgd":
        optim = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=opts.weight_decay, nesterov=True)
    else:
        optim = torch.optim.AdamW(groups, lr=lr, weight_decay=opts.weight_decay) if opts.weight_decay else torch.optim.Adam(groups, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda k: 0.5 * (1 + np.cos(np.pi * min(k, total_steps) / total_steps)))
    history: list[dict[str, Any]] = []
    with PeakRss() as rss:
        t_start = time.perf_counter()
        seen, stale, stopped = 0, 0, ""
        step = 0
        for epoch in range(1, opts.epochs + 1):
            s_mod.train()
            t0, run_loss, nb = time.perf_counter(), 0.0, 0
            order = train_idx[rng.permutation(len(train_idx))]
            for sel, feeds in _batches(arrays, order, opts.batch):
                if opts.augment:
                    feeds = {k: _augment(v, opts.augment, gen) for k, v in feeds.items()}
                with torch.no_grad():
                    _, tv = t_mod(feeds, capture=t_cap)
                _, sv = s_mod(feeds, capture=s_cap)
                y = torch.from_numpy(labels[sel]).long() if labels is not None else None
                loss = losses([sv[v] for v in s_cap], [tv[v] for v in t_cap], y)
                if not torch.isfinite(loss):
                    stopped = f"the loss became {float(loss.detach())} at epoch {epoch}: training stopped"
                    break
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                sched.step()
                step += 1
                seen += len(sel)
                run_loss += float(loss.detach())
                nb += 1
                if progress is not None:
                    progress(step, total_steps, f"epoch {epoch}/{opts.epochs} loss {run_loss / nb:.4f}")
                if opts.time_limit and time.perf_counter() - t_start > opts.time_limit:
                    stopped = f"wall-clock limit of {opts.time_limit:g} s reached in epoch {epoch}"
                    break
            m = {"epoch": epoch, "train_loss": run_loss / max(nb, 1), "seconds": time.perf_counter() - t0, **evaluate(epoch)}
            history.append(m)
            if progress is not None:
                tail = ", ".join(f"{k} {v:.4f}" for k, v in m.items() if k.startswith("val_"))
                progress(step, total_steps, f"epoch {epoch}/{opts.epochs} loss {m['train_loss']:.4f}" + (f", {tail}" if tail else ""))
            if not n_val or score(m) > score(best):
                best, best_state, best_epoch, stale = m, copy.deepcopy(s_mod.state_dict()), epoch, 0
            else:
                stale += 1
            if stopped:
                break
            if n_val and opts.patience and stale >= opts.patience:
                stopped = f"no held-out improvement for {stale} epochs: stopped after epoch {epoch}"
                break
        if progress is not None:
            progress(total_steps, total_steps, "done")
        elapsed = time.perf_counter() - t_start
    kept = bool(n_val) and (best_epoch == 0 or not beats_input(best_epoch))
    if kept and best_epoch:
        reason = (f"the best held-out epoch ({best_epoch}) improved on the student as given by less than the "
                  "held-out split's noise: the student is kept unchanged")
        best, best_epoch = baseline, 0
    elif kept:
        reason = "no epoch improved the held-out metric over the student as given: the student is kept unchanged"
    else:
        s_mod.load_state_dict(best_state)
        s_mod.write_back()
        if stopped:
            reason = stopped
        else:
            reason = f"best held-out epoch {best_epoch}" if n_val else "trained on all samples (no held-out split)"
    epochs_run = max(len(history), 1)
    return TrainResult(
        history=history, kept_input=kept, reason=reason, baseline=baseline, best={**best, "epoch": best_epoch},
        seconds_per_epoch=elapsed / epochs_run, images_per_s=seen / elapsed if elapsed > 0 else 0.0,
        peak_rss_mb=rss.peak, rss_before_mb=rss.start, summary=s_mod.trainable_summary(), features=[p[0].name for p in pairs],
    )
