"""Calibration data the way users have it: image folders with their model's preprocessing
(size from the model, resize + centre crop, layout, channel order, mean/std; Pillow decodes),
and onnxruntime ``CalibrationDataReader`` objects consumed streaming, never held whole in RAM."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from onnxcc.compiler.api import calibration_digest, compile_model
from onnxcc.compiler.calibration import CalibrationSet, ImagePreprocessing
from onnxcc.compiler.errors import BadInputError
from onnxcc.compiler.ir_utils import load_model
from tests.conftest import model_from_text

SAMPLE = "models/sample_resnet.onnx"


def test_the_sample_image_folder_reads_as_its_evaluation_inputs(cli, tmp_path):
    """32×32 grayscale PNGs: size and channel count from the model's input, the sample's own
    mean/std given as flags; equal to the evaluation arrays up to the PNG's 8-bit rounding."""
    cal = CalibrationSet.load("models/sample_images", load_model(SAMPLE), images=ImagePreprocessing(mean=(0.3,), std=(0.4,)))
    x = cal.arrays["image"]
    assert x.shape == (32, 1, 32, 32)
    np.testing.assert_allclose(x, np.load("models/sample_eval.npy")[:32], atol=0.6 / 255 / 0.4)
    r = cli("quantize", SAMPLE, "-o", tmp_path / "q.onnx", "--calib", "models/sample_images", "--mean", "0.3", "--std", "0.4",
            "--report", tmp_path / "r.json")
    assert r.code == 0, r.err


def _rgb_model(layout: str) -> object:
    shape = "[N, 3, 24, 24]" if layout == "NCHW" else "[N, 24, 24, 3]"
    return model_from_text(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float{shape} x) => (float{shape} y) {{ y = Relu(x) }}
    """)


@pytest.fixture
def photo(tmp_path):
    """A 60×40 RGB image with a distinct value per channel and a horizontal ramp."""
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, 60)[None, :]
    arr[..., 1] = 100
    arr[..., 2] = 200
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(arr).save(folder / "a.png")
    return folder, arr


def test_resize_then_centre_crop_layout_and_channel_order(photo):
    folder, arr = photo
    prep = ImagePreprocessing(resize=30, mean=(0.0,), std=(1.0,), scale=1.0, channels="BGR")
    x = CalibrationSet.load(folder, _rgb_model("NHWC"), images=prep).arrays["x"]
    assert x.shape == (1, 24, 24, 3)
    want = Image.fromarray(arr).resize((45, 30), Image.Resampling.BILINEAR)  # shorter side 40 -> 30
    want = np.asarray(want.crop((10, 3, 34, 27)), np.float32)[..., ::-1]  # centre 24x24, BGR
    np.testing.assert_allclose(x[0], want)
    y = CalibrationSet.load(folder, _rgb_model("NCHW"), images=ImagePreprocessing()).arrays["x"]
    assert y.shape == (1, 3, 24, 24)  # resized straight to the model's 24x24, ImageNet statistics
    assert y[0, 1].mean() == pytest.approx((100 / 255 - 0.456) / 0.224, abs=1e-4)


def test_image_preprocessing_errors_are_one_line_bad_input(photo, cli, tmp_path):
    folder, _ = photo
    dynamic = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3, H, W] x) => (float[N, 3, H, W] y) { y = Relu(x) }
    """)
    with pytest.raises(BadInputError, match="--image-size"):
        CalibrationSet.load(folder, dynamic)
    assert CalibrationSet.load(folder, dynamic, images=ImagePreprocessing(size=(16, 20))).arrays["x"].shape == (1, 3, 16, 20)
    with pytest.raises(BadInputError, match="mean has 2 values for 3"):
        CalibrationSet.load(folder, _rgb_model("NCHW"), images=ImagePreprocessing(mean=(0.1, 0.2)))
    r = cli("quantize", SAMPLE, "-o", tmp_path / "q.onnx", "--calib", "models/sample_images", "--mean", "a,b")
    assert r.code == 2 and "--mean: expected comma-separated numbers" in r.err
    r = cli("quantize", SAMPLE, "-o", tmp_path / "q.onnx", "--calib", "models/sample_images", "--image-size", "32")
    assert r.code == 2 and "--image-size: expected HxW" in r.err


class _Reader:
    """An onnxruntime-style CalibrationDataReader over batches it makes on the fly."""

    def __init__(self, batches: int, batch: int = 8, seed: int = 0):
        self.batches, self.batch, self.seed = batches, batch, seed
        self.rewind()

    def rewind(self):
        self.i, self.rng = 0, np.random.default_rng(self.seed)

    def get_next(self):
        if self.i == self.batches:
            return None
        self.i += 1
        return {"image": self.rng.standard_normal((self.batch, 1, 32, 32)).astype(np.float32)}


def test_a_calibration_data_reader_is_spooled_to_disk_not_held_in_ram():
    n_batches = 200  # 1600 samples of 4 KB: 6.5 MB through the reader
    tracemalloc.start()
    cal = CalibrationSet.from_reader(_Reader(n_batches))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    x = cal.arrays["image"]
    assert isinstance(x, np.memmap) and x.shape == (1600, 1, 32, 32)
    assert peak < 1_000_000, peak  # a few batches at a time, not the 6.5 MB
    ref = _Reader(n_batches)
    first = ref.get_next()["image"]
    np.testing.assert_array_equal(x[:8], first)
    cal.validate(load_model(SAMPLE))


def test_a_reader_gives_the_same_model_as_its_arrays():
    arrays = np.concatenate([b["image"] for b in iter(_Reader(4).get_next, None)])
    recipe = ["fold", ("quantize", {"bias_correction": True})]  # no speed guard: timing-free
    a = compile_model(SAMPLE, recipe, calibration=arrays, measure_latency=False)
    b = compile_model(SAMPLE, recipe, calibration=_Reader(4), measure_latency=False)
    assert a.report["provenance"]["calibration"]["sha256"] == b.report["provenance"]["calibration"]["sha256"]
    assert calibration_digest(CalibrationSet.from_reader(_Reader(4)))["samples"] == 32
    wa = {v.name: v.const_value.numpy().tobytes() for v in a.model.graph.initializers.values()}
    wb = {v.name: v.const_value.numpy().tobytes() for v in b.model.graph.initializers.values()}
    assert wa == wb


def test_a_reader_whose_feeds_change_shape_is_refused():
    class Bad(_Reader):
        def get_next(self):
            feed = super().get_next()
            return feed if feed is None or self.i == 1 else {"image": feed["image"][:, :, :16]}

    with pytest.raises(BadInputError, match="input 'image' changes between feeds"):
        CalibrationSet.from_reader(Bad(3))
