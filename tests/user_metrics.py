"""Score functions in the form ``--metric module:function`` / ``compile_model(metric=...)`` takes:
``fn(outputs, labels) -> float``, higher is better, a fraction in [0, 1].

``outputs`` is a dict output name → array over all verification samples; ``labels`` what
``--labels`` gave, or the original model's outputs (the same kind of dict) without labels.
Written as a user would, against the real corpus models' output layouts.
"""

from __future__ import annotations

import string

import numpy as np

CAPTCHA_ALPHABET = string.digits + string.ascii_uppercase


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def captcha_char_accuracy(outputs, labels) -> float:
    """OCR-style: character accuracy (1 − edit distance / label length, over all samples) of the
    captcha CRNN's CTC output ``logits`` [T, N, 37] (blank 36), greedy-decoded."""
    logits = outputs["logits"]
    texts = []
    for path in logits.argmax(-1).T:  # [N, T]
        seq, prev = [], None
        for k in path:
            if k != prev and k != 36:
                seq.append(CAPTCHA_ALPHABET[k])
            prev = k
        texts.append("".join(seq))
    labels = [str(t) for t in np.asarray(labels).reshape(-1)]
    errors = sum(_edit_distance(t, w) for t, w in zip(texts, labels))
    return 1.0 - errors / max(1, sum(len(w) for w in labels))


def _yolox_boxes(out: np.ndarray, size: int = 416, conf: float = 0.25) -> list[np.ndarray]:
    """ddddocr's detector (YOLOX head, [N, 3549, 6]: x, y, w, h, objectness, class) decoded as
    ddddocr does it (grids at strides 8/16/32), then greedy NMS at IoU 0.45: [k, 4] boxes per image."""
    grids, strides = [], []
    for s in (8, 16, 32):
        g = size // s
        yv, xv = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
        grids.append(np.stack((xv, yv), -1).reshape(-1, 2))
        strides.append(np.full((g * g, 1), s))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    result = []
    for pred in out.astype(np.float64):
        xy = (pred[:, :2] + grid) * stride
        wh = np.exp(np.clip(pred[:, 2:4], -10, 10)) * stride
        score = pred[:, 4] * pred[:, 5]
        keep = score > conf
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)[keep]
        order = np.argsort(-score[keep])
        chosen: list[int] = []
        for i in order:
            if all(_iou(boxes[i], boxes[j]) < 0.45 for j in chosen):
                chosen.append(i)
        result.append(boxes[chosen])
    return result


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detection_f1(outputs, truth) -> float:
    """Detection-style (mAP-like): F1 at IoU 0.5 of the boxes decoded from ``output`` against the
    reference boxes (the original model's own detections when no labels are given), over all
    images; 1.0 when neither has any box."""
    ref = truth["output"] if isinstance(truth, dict) else truth
    got, want = _yolox_boxes(outputs["output"]), _yolox_boxes(ref)
    tp = fp = fn = 0
    for g, w in zip(got, want):
        used: set[int] = set()
        for box in g:
            match = next((j for j in range(len(w)) if j not in used and _iou(box, w[j]) >= 0.5), None)
            if match is None:
                fp += 1
            else:
                used.add(match)
                tp += 1
        fn += len(w) - len(used)
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
