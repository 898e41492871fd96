"""Calibration data and the activation collector.

``CalibrationSet`` holds N samples per model input, stacked on axis 0, read
once and shared by every pass. Sources:

* ``.npy``: one array for a single-input model;
* ``.npz``: one array per input name;
* a folder of images (``.png``/``.jpg``/``.npy``) with a declared size,
  layout and mean/std (:class:`ImagePreprocessing`; Pillow is needed for
  image files, the ``images`` extra);
* any object with onnxruntime's ``CalibrationDataReader`` interface
  (``get_next()`` returning a feed dict or None), so existing quantization
  code plugs in;
* a dict of arrays from Python.

:meth:`CalibrationSet.validate` checks names, dtypes, shapes and values
against the model's declared inputs and names the offending input.

``ActivationCollector`` runs one onnxruntime session on a copy of the model
with the requested intermediate tensors added as graph outputs, batch by
batch, and hands each batch to *reducers* (min/max, histograms, per-channel
statistics, sub-sampled rows for least squares). Only reducer state is kept,
so memory is bounded by the batch, not by the number of samples.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import onnx
import onnx_ir as ir

from onnxcc.compiler.errors import BadInputError, ModelRejectedError
from onnxcc.compiler.ir_utils import is_dynamic_dim, shape_hint
from onnxcc.compiler.sessions import first_line, make_session

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model inputs
@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # str/None for symbolic or unknown dims
    hint: tuple[int, ...] | None = None  # concrete shape for the dynamic dims (ir_utils.shape_hint)
    int_range: tuple[int, int, bool] | None = None  # integer inputs: valid values lo..hi-1, distinct? (index_ranges)

    @property
    def fixed_batch(self) -> int | None:
        if self.shape and isinstance(self.shape[0], int) and self.shape[0] >= 0:
            return self.shape[0]
        return None  # symbolic, unknown, or stored as -1 (some paddle2onnx exports): a dynamic batch

    def concrete(self, batch: int = 1, overrides: Mapping[str, Sequence[int]] | None = None) -> tuple[int, ...]:
        if overrides and self.name in overrides:
            return tuple(int(d) for d in overrides[self.name])
        if self.shape is None:
            raise BadInputError(f"input '{self.name}' has no declared shape; pass --input-shape {self.name}:DIMS")
        dims = []
        for i, d in enumerate(self.shape):
            if not is_dynamic_dim(d):  # a negative stored size means "dynamic"
                dims.append(d)
            elif i == 0:
                dims.append(batch)
            elif self.hint is not None and len(self.hint) == len(self.shape):
                dims.append(int(self.hint[i]))
            else:
                raise BadInputError(
                    f"input '{self.name}' has a dynamic dimension {i} ({d}); pass --input-shape "
                    f"{self.name}:{'x'.join(str(x) if isinstance(x, int) else 'N' for x in self.shape)} with numbers"
                )
        return tuple(dims)


def input_specs(model: ir.Model) -> list[InputSpec]:
    """Declared graph inputs that are not initializers."""
    specs = []
    hints = shape_hint(model)
    ranges = index_ranges(model)
    for v in model.graph.inputs:
        if v.is_initializer():
            continue
        dtype = v.dtype.numpy() if v.dtype is not None else np.dtype(np.float32)
        shape = None
        if v.shape is not None:
            shape = tuple(d if isinstance(d, int) else (d.value if hasattr(d, "value") else None) for d in v.shape.dims)
        specs.append(InputSpec(v.name, np.dtype(dtype), shape, hints.get(v.name), ranges.get(v.name)))
    return specs


def _dims(v: ir.Value | None) -> list[int] | None:
    if v is None or v.shape is None:
        return None
    return [-1 if is_dynamic_dim(d) else d for d in v.shape.dims]


def _valid_range(node: ir.Node, index: int) -> tuple[int, int, bool] | None:
    """Values an integer operand ``index`` of ``node`` may take, from its data input's declared
    shape: gather/scatter indices below the gathered axis's size, axes below the rank, Slice
    bounds within the sliced sizes, TopK's K within the axis, Tile repeats 1-2; axes are also
    distinct. None: no bound known (random 0..3 is used)."""
    op = node.op_type
    if (op, index) == ("Tile", 1):
        return (1, 3, False)
    data = _dims(node.inputs[0]) if node.inputs and node.inputs[0] is not None else None
    if data is None:
        return None
    rank = len(data)
    axis = node.attributes.get_int("axis", -1 if op == "TopK" else 0)
    known = [d for d in data if d > 0]
    if op in ("Gather", "GatherElements", "Scatter", "ScatterElements") and index == 1:
        if -rank <= axis < rank and data[axis] > 0:
            return (0, data[axis], False)
        return None
    if op in ("GatherND", "ScatterND") and index == 1 and known:
        return (0, min(known), False)
    if (op.startswith("Reduce") or op == "Squeeze") and index == 1 and rank:
        return (0, rank, True)
    if op == "CumSum" and index == 1 and rank:
        return (0, rank, False)
    if op == "Unsqueeze" and index == 1:
        return (0, rank + 1, True)
    if op == "Slice":
        if index in (1, 2) and known:
            return (0, min(known) + 1, False)
        if index == 3 and rank:
            return (0, rank, True)
        if index == 4:
            return (1, 3, False)
    if op == "TopK" and index == 1 and -rank <= axis < rank:
        return (1, data[axis] + 1, False) if data[axis] > 0 else None
    return None


def index_ranges(model: ir.Model) -> dict[str, tuple[int, int, bool]]:
    """For each integer graph input that feeds indices, axes or bounds: the range of values that
    is valid for every node using it (random values outside it make onnxruntime refuse the model,
    or compute nothing worth comparing)."""
    out: dict[str, tuple[int, int, bool]] = {}
    for v in model.graph.inputs:
        if v.is_initializer() or v.dtype is None or not np.issubdtype(v.dtype.numpy(), np.integer):
            continue
        lo, hi, distinct = None, None, False
        for node, index in v.uses():
            r = _valid_range(node, index)
            if r is None:
                continue
            lo = r[0] if lo is None else max(lo, r[0])
            hi = r[1] if hi is None else min(hi, r[1])
            distinct |= r[2]
        if lo is not None and hi is not None and hi > lo:
            out[v.name] = (lo, hi, distinct)
    return out


def parse_input_shapes(items: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """``name:1x3x224x224`` strings → dict."""
    out = {}
    for item in items:
        name, sep, dims = item.rpartition(":")
        if not sep or not name:
            raise BadInputError(f"--input-shape '{item}': expected NAME:D1xD2x...")
        try:
            out[name] = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError as e:
            raise BadInputError(f"--input-shape '{item}': dimensions must be integers") from e
    return out


MAX_RANDOM_INPUT_BYTES = 4 << 30  # seeded random inputs larger than this are refused, not allocated


def random_inputs(
    specs: Sequence[InputSpec],
    n: int = 1,
    seed: int = 0,
    batch: int = 1,
    overrides: Mapping[str, Sequence[int]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """``n`` seeded random feed dicts of the declared shapes (dynamic batch → ``batch``)."""
    rng = np.random.default_rng(seed)
    for s in specs:  # refuse up front, naming the input, what would not fit in memory
        shape = s.concrete(batch, overrides)
        size = int(np.prod([max(int(d), 0) for d in shape], dtype=object)) * np.dtype(s.dtype).itemsize * n
        if size > MAX_RANDOM_INPUT_BYTES:
            raise BadInputError(
                f"input '{s.name}' of shape {list(shape)} needs {size / 2**30:.1f} GiB of random data "
                f"(limit {MAX_RANDOM_INPUT_BYTES / 2**30:.0f} GiB): give --input-shape or real data (--calib)")
    feeds = []
    for _ in range(n):
        feed = {}
        for s in specs:
            shape = s.concrete(batch, overrides)
            if np.issubdtype(s.dtype, np.floating):
                feed[s.name] = rng.standard_normal(shape).astype(s.dtype)
            elif np.issubdtype(s.dtype, np.integer):
                lo, hi, distinct = s.int_range or (0, 4, False)
                n = int(np.prod(shape, dtype=np.int64))
                if distinct and n <= hi - lo:  # axes: no value twice
                    values = rng.permutation(np.arange(lo, hi))[:n].reshape(shape)
                else:
                    values = rng.integers(lo, hi, size=shape)
                feed[s.name] = values.astype(s.dtype)
            elif s.dtype == np.bool_:
                feed[s.name] = rng.integers(0, 2, size=shape).astype(bool)
            else:
                raise BadInputError(f"input '{s.name}': cannot make random data of dtype {s.dtype}")
        feeds.append(feed)
    return feeds


def feed_samples(feeds: Sequence[Mapping[str, np.ndarray]]) -> int:
    """How many samples a list of feeds holds: each feed's first input's batch (1 for a feed of
    scalars or no inputs)."""
    total = 0
    for f in feeds:
        first = next(iter(f.values()), None)
        total += int(np.shape(first)[0]) if first is not None and np.ndim(first) else 1
    return total


def verification_data(source: Any, model: ir.Model, *, limit: int | None = None,
                      images: "ImagePreprocessing | None" = None) -> list[dict[str, np.ndarray]]:
    """Real inputs to verify on (``--data``): feed dicts, by input name.

    ``source`` is an ``.npz`` (one array per input name), an ``.npy`` (single-input models), a
    dict of arrays or a list of such dicts. When every array has the model's declared rank and
    fixed dims, the file is **one feed, used as it is** (an operator test's tensors, a detector's
    image plus its size input, an index or axes input). Otherwise it is read like calibration
    data (samples stacked on axis 0) and fed in batches, at most ``limit`` samples. Unlike
    calibration data, NaN/Inf values are allowed: a model may be meant to handle them.
    """
    if isinstance(source, (list, tuple)):
        feeds = [dict(f) for f in source]
        for f in feeds:
            _check_feed(f, model, "data")
        return feeds
    label = "data"
    if isinstance(source, Mapping):
        arrays = {k: np.asarray(v) for k, v in source.items()}
    elif isinstance(source, np.ndarray):
        arrays = {"": source}
    elif isinstance(source, (str, os.PathLike)):
        path, label = Path(source), str(source)
        if path.is_dir():  # a folder of images: samples, like calibration data
            return CalibrationSet.load(path, model, images=images).feeds(model, limit)
        if not path.is_file():
            raise BadInputError(f"{label}: verification data not found (--data takes an .npz by input name, an .npy or an image folder)")
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
            elif path.suffix == ".npy":
                arrays = {"": np.load(path, allow_pickle=False)}
            else:
                raise BadInputError(f"{label}: verification data must be .npz (arrays by input name) or .npy")
        except (ValueError, OSError, EOFError) as e:
            raise BadInputError(f"{label}: cannot read verification data: {e}") from e
    else:
        raise BadInputError(f"cannot read verification data from {type(source).__name__}")
    specs = input_specs(model)
    if set(arrays) == {""}:
        if len(specs) != 1:
            raise BadInputError(f"{label}: one array given but the model has {len(specs)} inputs; use an .npz keyed by input name")
        arrays = {specs[0].name: arrays[""]}
    _check_names(arrays, [s.name for s in specs], label)
    if _fits_as_feed(arrays, specs):
        _check_feed(arrays, model, label)
        return [arrays]
    calib = CalibrationSet(arrays, label)
    calib.validate(model)
    return calib.feeds(model, limit)


def _shape_fits(shape: tuple[int, ...], declared: tuple[int | str | None, ...] | None) -> bool:
    """An array of ``shape`` is what an input declared ``declared`` takes: same rank, same fixed sizes."""
    return declared is None or (len(shape) == len(declared) and all(
        not (isinstance(d, int) and d >= 0) or d == n for d, n in zip(declared, shape)))


def _fits_as_feed(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> bool:
    return all(s.name in arrays and _shape_fits(np.shape(arrays[s.name]), s.shape) for s in specs)


def _check_names(feed: Mapping[str, Any], names: Sequence[str], label: str) -> None:
    missing = [n for n in names if n not in feed]
    extra = [n for n in feed if n not in names]
    if missing:
        raise BadInputError(f"{label}: no data for model input(s) {', '.join(missing)}")
    if extra:
        raise BadInputError(f"{label}: data for unknown input(s) {', '.join(extra)} (model inputs: {', '.join(names) or 'none'})")


def _check_feed(feed: dict[str, np.ndarray], model: ir.Model, label: str) -> None:
    specs = {s.name: s for s in input_specs(model)}
    _check_names(feed, list(specs), label)
    for name, s in specs.items():
        a = np.asarray(feed[name])
        if a.dtype != s.dtype:
            if np.issubdtype(a.dtype, np.floating) and np.issubdtype(s.dtype, np.floating):
                a = a.astype(s.dtype)
            else:
                raise BadInputError(f"{label}: input '{name}' has dtype {a.dtype}, the model expects {s.dtype}")
        if not _shape_fits(a.shape, s.shape):
            raise BadInputError(f"{label}: input '{name}' has shape {a.shape}, the model expects {_fmt_shape(s.shape)}")
        feed[name] = a


# --------------------------------------------------------------------------- calibration set
@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """How a folder of images becomes model input. Pillow decodes, converts and resizes.

    Every field left None comes from the model's (single) image input: ``size`` (height, width)
    and ``layout`` (``NCHW`` when axis 1 has 1 or 3 channels, ``NHWC`` when the last axis has)
    from its declared shape, ``channels`` from its channel count (1: ``L``, grayscale; 3: ``RGB``).
    ``resize`` first scales the shorter side to that many pixels, keeping the aspect, then
    crops the centre to ``size`` (torchvision's Resize + CenterCrop); without it the image is
    resized straight to ``size``. Pixels are multiplied by ``scale`` (1/255: [0, 1]), then
    ``(x - mean) / std`` per channel: ImageNet's statistics for 3 channels and 0 / 1 for one
    unless given (pass your model's own).
    """

    size: tuple[int, int] | None = None
    resize: int | None = None
    layout: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float = 1 / 255.0
    channels: str | None = None  # "RGB", "BGR" or "L"

    def __post_init__(self):
        if self.layout is not None and self.layout.upper() not in ("NCHW", "NHWC"):
            raise BadInputError(f"image layout must be NCHW or NHWC, not {self.layout!r}")
        if self.channels is not None and self.channels.upper() not in ("RGB", "BGR", "L"):
            raise BadInputError(f"image channels must be RGB, BGR or L, not {self.channels!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise BadInputError(f"image size must be HxW, got {self.size}")
        if self.std is not None and any(v == 0 for v in self.std):
            raise BadInputError("image std must not be 0")

    def resolved(self, model: ir.Model | None) -> "ImagePreprocessing":
        """Every field set: the given ones, the rest from ``model``'s image input."""
        spec = next(iter(input_specs(model)), None) if model is not None else None
        shape = (spec.hint or spec.shape) if spec is not None else None
        layout, size, channels = self.layout, self.size, self.channels
        if shape is not None and len(shape) == 4:
            if layout is None:
                layout = "NHWC" if shape[-1] in (1, 3) and shape[1] not in (1, 3) else "NCHW"
            h, w, c = (shape[2], shape[3], shape[1]) if layout.upper() == "NCHW" else (shape[1], shape[2], shape[3])
            if size is None and isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
                size = (h, w)
            if channels is None and c in (1, 3):
                channels = "L" if c == 1 else "RGB"
        if size is None:
            raise BadInputError("the model's image input has a dynamic height/width: give the image size (--image-size HxW)")
        channels = (channels or "RGB").upper()
        n = 1 if channels == "L" else 3
        mean = self.mean if self.mean is not None else ((0.0,) if n == 1 else (0.485, 0.456, 0.406))
        std = self.std if self.std is not None else ((1.0,) if n == 1 else (0.229, 0.224, 0.225))
        for what, v in (("mean", mean), ("std", std)):
            if len(v) not in (1, n):
                raise BadInputError(f"image {what} has {len(v)} values for {n} channel(s)")
        return dataclasses.replace(self, size=tuple(size), layout=(layout or "NCHW").upper(), channels=channels,
                                   mean=tuple(mean), std=tuple(std))


class CalibrationSet:
    """N samples per input (axis 0), validated against a model, fed in batches.

    Or, when the inputs share no sample axis (an image with its size vector, a tensor with its
    axes, an operator test's inputs), **one whole feed** (:meth:`one_feed`): one sample, fed as
    it is."""

    whole_feed = False

    def __init__(self, arrays: Mapping[str, np.ndarray], source: str = "data"):
        self.arrays = {k: v for k, v in arrays.items()}
        self.source = source
        if not self.arrays:
            raise BadInputError(f"{source}: no arrays in the calibration data")
        counts = {k: (v.shape[0] if v.ndim else 0) for k, v in self.arrays.items()}
        if len(set(counts.values())) != 1:
            raise BadInputError(f"{source}: inputs have different sample counts {counts}")
        self.n = next(iter(counts.values()))
        if self.n == 0:
            raise BadInputError(f"{source}: calibration data is empty (0 samples)")

    def __len__(self) -> int:
        return self.n

    @classmethod
    def one_feed(cls, feed: Mapping[str, np.ndarray], source: str = "data") -> "CalibrationSet":
        """One feed used as it is (the arrays are kept with a leading axis of one sample). An
        empty feed is the calibration set of a model without inputs: every activation is a
        constant, computed once."""
        if not feed:
            calib = cls.__new__(cls)
            calib.arrays, calib.source, calib.n = {}, source, 1
        else:
            calib = cls({k: np.asarray(v)[None] for k, v in feed.items()}, source)
        calib.whole_feed = True
        return calib

    @classmethod
    def _from_arrays(cls, arrays: Mapping[str, np.ndarray], source: str, model: ir.Model | None) -> "CalibrationSet":
        """Samples stacked on axis 0 when they are; else, when the arrays have exactly the model's
        declared input shapes, one whole feed."""
        try:
            return cls(arrays, source)
        except BadInputError:
            if model is not None and arrays and _fits_as_feed(arrays, input_specs(model)):
                return cls.one_feed(arrays, source)
            raise

    def __repr__(self) -> str:
        shapes = {k: v.shape for k, v in self.arrays.items()}
        return f"CalibrationSet({self.n} samples from {self.source}: {shapes})"

    # ---- constructors
    @classmethod
    def load(
        cls,
        source: Any,
        model: ir.Model | None = None,
        *,
        images: ImagePreprocessing | None = None,
        limit: int | None = None,
    ) -> "CalibrationSet":
        """Build from a path, a dict of arrays, a CalibrationDataReader or a CalibrationSet."""
        if isinstance(source, CalibrationSet):
            calib = source
        elif isinstance(source, Mapping):
            calib = cls._from_arrays({k: np.asarray(v) for k, v in source.items()}, "arrays", model)
        elif hasattr(source, "get_next"):
            calib = cls.from_reader(source)
        elif isinstance(source, np.ndarray):
            calib = cls._single(source, model, "array")
        elif isinstance(source, (str, os.PathLike)):
            calib = cls._from_path(Path(source), model, images)
        else:
            raise BadInputError(f"cannot read calibration data from {type(source).__name__}")
        if limit is not None and limit < calib.n:
            calib = calib.subset(limit)
        if model is not None:
            calib.validate(model)
        return calib

    @classmethod
    def _single(cls, arr: np.ndarray, model: ir.Model | None, label: str) -> "CalibrationSet":
        if model is None:
            return cls({"input": arr}, label)
        specs = input_specs(model)
        if len(specs) != 1:
            raise BadInputError(
                f"{label}: one array given but the model has {len(specs)} inputs "
                f"({', '.join(s.name for s in specs)}); use an .npz keyed by input name"
            )
        return cls({specs[0].name: arr}, label)

    @classmethod
    def _from_path(cls, path: Path, model: ir.Model | None, images: ImagePreprocessing | None) -> "CalibrationSet":
        label = str(path)
        if not path.exists():
            raise BadInputError(f"{label}: calibration data not found")
        if path.is_dir():
            return cls._from_folder(path, model, (images or ImagePreprocessing()).resolved(model))
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
                return cls._from_arrays(arrays, label, model)
            if path.suffix == ".npy":
                return cls._single(np.load(path, mmap_mode="r", allow_pickle=False), model, label)
        except (ValueError, OSError, EOFError) as e:
            raise BadInputError(f"{label}: cannot read calibration data: {e}") from e
        raise BadInputError(f"{label}: calibration data must be .npy, .npz or a folder of images")

    @classmethod
    def _from_folder(cls, folder: Path, model: ir.Model | None, prep: ImagePreprocessing) -> "CalibrationSet":
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".npy"))
        if not files:
            raise BadInputError(f"{folder}: no images (.png/.jpg/.jpeg/.bmp/.npy) in the folder")
        samples = [load_image(p, prep) for p in files]
        return cls._single(np.stack(samples), model, str(folder))

    @classmethod
    def from_reader(cls, reader: Any) -> "CalibrationSet":
        """Consume an onnxruntime ``CalibrationDataReader`` once, streaming: each feed is appended
        to a temporary file per input as it arrives, and the set reads memory-mapped arrays from
        those files, so a reader of more data than RAM works (onnxruntime's own quantizer holds it
        all in memory). The files live as long as the set."""
        import tempfile

        spool = tempfile.TemporaryDirectory(prefix="onnxcc-calib-")
        name = type(reader).__name__
        files: dict[str, Any] = {}
        meta: dict[str, list[Any]] = {}  # input -> [dtype, sample shape, count]
        try:
            while True:
                feed = reader.get_next()
                if feed is None:
                    break
                for k, v in feed.items():
                    a = np.ascontiguousarray(np.asarray(v))
                    a = a[None] if a.ndim == 0 else a  # readers give feeds that carry a batch axis
                    m = meta.setdefault(k, [a.dtype, a.shape[1:], 0])
                    if (a.dtype, a.shape[1:]) != (m[0], m[1]):
                        raise BadInputError(
                            f"{name}: input '{k}' changes between feeds: {m[1]} {m[0]}, then {a.shape[1:]} {a.dtype}"
                        )
                    if k not in files:
                        files[k] = open(Path(spool.name) / f"{len(files)}.bin", "wb")  # noqa: SIM115 (closed below)
                    files[k].write(a.tobytes())
                    m[2] += a.shape[0]
        finally:
            for f in files.values():
                f.close()
        if hasattr(reader, "rewind"):
            try:
                reader.rewind()
            except Exception:  # a reader that cannot rewind is still usable once
                pass
        if not meta or any(m[2] == 0 for m in meta.values()):
            spool.cleanup()
            raise BadInputError("calibration data reader returned no data")
        paths = {k: Path(spool.name) / f"{i}.bin" for i, k in enumerate(files)}
        arrays = {k: np.memmap(paths[k], dtype=m[0], mode="r", shape=(m[2], *m[1])) for k, m in meta.items()}
        calib = cls(arrays, name)
        calib._spool = spool
        return calib

    def chunks(self, name: str, size: int = 64) -> Iterator[np.ndarray]:
        """Input ``name`` in runs of ``size`` samples (a memory-mapped set is never read whole)."""
        arr = self.arrays[name]
        for start in range(0, max(1, arr.shape[0]) if arr.ndim else 1, size):
            yield np.asarray(arr[start:start + size]) if arr.ndim else np.asarray(arr)

    # ---- validation and feeding
    def validate(self, model: ir.Model) -> None:
        if self.whole_feed:
            feed = {k: v[0, ...] for k, v in self.arrays.items()}
            _check_feed(feed, model, self.source)
            self.arrays = {k: v[None] for k, v in feed.items()}
            bad = [k for k, v in feed.items() if np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v))]
            if bad:
                raise BadInputError(f"{self.source}: input '{bad[0]}' contains NaN or Inf")
            return
        specs = {s.name: s for s in input_specs(model)}
        _check_names(self.arrays, list(specs), self.source)
        for name, spec in specs.items():
            arr = self.arrays[name]
            if arr.dtype != spec.dtype:
                if np.issubdtype(arr.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating):
                    self.arrays[name] = arr.astype(spec.dtype)
                else:
                    raise BadInputError(f"{self.source}: input '{name}' has dtype {arr.dtype}, the model expects {spec.dtype}")
            if spec.shape is not None:
                sample_shape = arr.shape[1:]
                declared = spec.shape[1:]
                fixed_batch = spec.fixed_batch
                if len(arr.shape) != len(spec.shape):
                    raise BadInputError(
                        f"{self.source}: input '{name}' has shape {arr.shape} (N samples first), the model expects "
                        f"{_fmt_shape(spec.shape)}"
                    )
                bad = [i for i, (a, d) in enumerate(zip(sample_shape, declared)) if isinstance(d, int) and a != d]
                if bad:
                    raise BadInputError(
                        f"{self.source}: input '{name}' samples have shape {sample_shape}, the model expects "
                        f"{_fmt_shape(declared)} (after the batch axis)"
                    )
                if fixed_batch is not None and fixed_batch > 1 and self.n % fixed_batch:
                    raise BadInputError(
                        f"{self.source}: the model has a fixed batch of {fixed_batch} but {self.n} samples were given"
                    )
            if np.issubdtype(self.arrays[name].dtype, np.floating) and not all(np.all(np.isfinite(c)) for c in self.chunks(name)):
                raise BadInputError(f"{self.source}: input '{name}' contains NaN or Inf")

    def batch_size_for(self, model: ir.Model, preferred: int = 16) -> int:
        if self.whole_feed:
            return 1
        sizes = {s.fixed_batch for s in input_specs(model)}
        fixed = [s for s in sizes if s is not None]
        return fixed[0] if fixed else min(preferred, self.n)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        n = self.n if limit is None else min(limit, self.n)
        if self.whole_feed:
            if n:
                yield {k: v[0, ...] for k, v in self.arrays.items()}
            return
        for start in range(0, n, batch_size):
            yield {k: np.ascontiguousarray(v[start : min(start + batch_size, n)]) for k, v in self.arrays.items()}

    def feeds(self, model: ir.Model, limit: int | None = None) -> list[dict[str, np.ndarray]]:
        """The first ``limit`` samples as verification feeds, in the model's batch size (8 when dynamic)."""
        return list(self.batches(self.batch_size_for(model, preferred=8), limit=limit))

    def subset(self, n: int) -> "CalibrationSet":
        if self.whole_feed:
            return self
        sub = CalibrationSet({k: v[:n] for k, v in self.arrays.items()}, self.source)
        sub._spool = getattr(self, "_spool", None)  # a memory-mapped set's files outlive it
        return sub


def _fmt_shape(shape: Sequence[Any]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + ")"


def load_image(path: Path, prep: ImagePreprocessing) -> np.ndarray:
    """One sample from an image file (or an ``.npy`` array, taken as it is), with ``prep`` resolved."""
    if path.suffix.lower() == ".npy":
        return np.ascontiguousarray(np.load(path, allow_pickle=False), dtype=np.float32)
    try:
        from PIL import Image
    except ImportError as e:
        raise BadInputError("reading image files needs Pillow: pip install 'onnxcc[images]'") from e
    h, w = prep.size
    try:
        with Image.open(path) as im:
            im = im.convert("L" if prep.channels == "L" else "RGB")
            if prep.resize:  # shorter side to `resize`, then the centre crop
                k = prep.resize / min(im.size)
                im = im.resize((max(w, round(im.size[0] * k)), max(h, round(im.size[1] * k))), Image.Resampling.BILINEAR)
                left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
                im = im.crop((left, top, left + w, top + h))
            else:
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read image: {e}") from e
    if arr.ndim == 2:
        arr = arr[..., None]
    if prep.channels == "BGR":
        arr = arr[..., ::-1]
    arr = (arr * prep.scale - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    if prep.layout == "NCHW":
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32)


# --------------------------------------------------------------------------- reducers
class Reducer:
    """Streaming statistic over batches of one tensor."""

    def update(self, x: np.ndarray) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class MinMax(Reducer):
    def __init__(self) -> None:
        self.min = np.inf
        self.max = -np.inf
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        if x.size:
            self.min = min(self.min, float(x.min()))
            self.max = max(self.max, float(x.max()))
            self.count += x.size


class Histogram(Reducer):
    """Fixed-range histogram; the range comes from a previous :class:`MinMax` pass."""

    def __init__(self, lo: float, hi: float, bins: int = 2048):
        if not hi > lo:
            hi = lo + 1e-6
        self.edges = np.linspace(lo, hi, bins + 1)
        self.counts = np.zeros(bins, dtype=np.int64)

    def update(self, x: np.ndarray) -> None:
        c, _ = np.histogram(np.clip(x, self.edges[0], self.edges[-1]), bins=self.edges)
        self.counts += c


class ChannelStats(Reducer):
    """Per-channel mean, mean |x|, mean x², min, max and zero fraction over every other axis."""

    def __init__(self, axis: int = 1):
        self.axis = axis
        self.n = 0
        self.sum = self.abs_sum = self.sq_sum = self.zeros = self.min = self.max = None

    def update(self, x: np.ndarray) -> None:
        x = np.moveaxis(x, self.axis, 0).reshape(x.shape[self.axis], -1).astype(np.float64)
        s, a, q, z = x.sum(1), np.abs(x).sum(1), (x * x).sum(1), (x == 0).sum(1)
        lo, hi = x.min(1), x.max(1)
        if self.sum is None:
            self.sum, self.abs_sum, self.sq_sum, self.zeros = s, a, q, z.astype(np.float64)
            self.min, self.max = lo, hi
        else:
            self.sum += s
            self.abs_sum += a
            self.sq_sum += q
            self.zeros += z
            self.min = np.minimum(self.min, lo)
            self.max = np.maximum(self.max, hi)
        self.n += x.shape[1]

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.n, 1)

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.n, 1)

    @property
    def mean_sq(self) -> np.ndarray:
        return self.sq_sum / max(self.n, 1)

    @property
    def zero_fraction(self) -> np.ndarray:
        return self.zeros / max(self.n, 1)


class RowSampler(Reducer):
    """Keep at most ``per_batch`` rows of ``fn(x)`` per batch, up to ``max_rows`` in all.

    ``fn`` turns a batch into a 2-D array of rows (for example im2col patches of
    a conv input); rows are picked with a seeded generator so runs repeat.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], per_batch: int, max_rows: int, seed: int = 0):
        self.fn = fn
        self.per_batch = per_batch
        self.max_rows = max_rows
        self.rng = np.random.default_rng(seed)
        self.rows: list[np.ndarray] = []
        self.count = 0

    def update(self, x: np.ndarray) -> None:
        if self.count >= self.max_rows:
            return
        rows = self.fn(x)
        take = min(self.per_batch, rows.shape[0], self.max_rows - self.count)
        idx = np.sort(self.rng.choice(rows.shape[0], size=take, replace=False))
        self.rows.append(np.ascontiguousarray(rows[idx]))
        self.count += take

    def result(self) -> np.ndarray:
        return np.concatenate(self.rows, axis=0) if self.rows else np.zeros((0, 0), np.float32)


# --------------------------------------------------------------------------- declared statistics
R = TypeVar("R", bound=Reducer)


class Statistics:
    """Activation statistics a pass declares up front, gathered in one run over the data.

    A pass that needs several kinds (activation ranges, per-channel means, Gram matrices) adds a
    reducer per tensor with :meth:`add`, then calls :meth:`collect` once: one onnxruntime session,
    one pass over the calibration data, every reducer fed from it (NNCF's statistic points). What
    needs a second look at the data by its nature (a histogram needs the range first, Gram
    matrices beyond a memory budget) runs after, on its own.
    """

    def __init__(self, model: ir.Model, calibration: CalibrationSet, *, batch_size: int = 8, limit: int | None = None):
        self.model, self.calibration, self.batch_size, self.limit = model, calibration, batch_size, limit
        self.reducers: dict[str, list[Reducer]] = {}
        self.runs = 0

    def add(self, tensor: str, reducer: R) -> R:
        self.reducers.setdefault(tensor, []).append(reducer)
        return reducer

    def collect(self) -> None:
        if self.reducers and self.runs == 0:
            ActivationCollector(self.model, self.calibration, batch_size=self.batch_size).collect(self.reducers, limit=self.limit)
            self.runs = 1


# --------------------------------------------------------------------------- collector
class ActivationCollector:
    """Runs a model with intermediate tensors exposed and feeds them to reducers."""

    def __init__(self, model: ir.Model, calibration: CalibrationSet, *, batch_size: int = 16, threads: int | None = None):
        self.model = model
        self.calibration = calibration
        self.batch_size = calibration.batch_size_for(model, batch_size)
        self.threads = threads

    def collect(
        self,
        reducers: Mapping[str, Sequence[Reducer]],
        *,
        limit: int | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        graph_inputs = {v.name for v in self.model.graph.inputs}
        direct = [k for k in reducers if k in graph_inputs]  # read from the data, no session needed
        names = [k for k in reducers if k not in graph_inputs]
        session = self._session(names) if names else None
        n = len(self.calibration) if limit is None else min(limit, len(self.calibration))
        if any(sp.fixed_batch is not None for sp in input_specs(self.model)):  # whole batches only
            n = min(len(self.calibration), -(-n // self.batch_size) * self.batch_size)
        if progress is None:
            from onnxcc.compiler.progress import bar

            progress = bar("calibration")
        done = 0
        for feed in self.calibration.batches(self.batch_size, n):
            try:
                outs = session.run(names, feed) if session is not None else []
            except Exception as e:  # onnxruntime's several exception types: one onnxcc error
                raise ModelRejectedError(f"onnxruntime failed to run the model on the calibration data: {first_line(e)}") from e
            for name, arr in [*zip(names, outs), *((k, feed[k]) for k in direct)]:
                for r in reducers[name]:
                    r.update(arr)
            done += 1 if self.calibration.whole_feed else next(iter(feed.values())).shape[0]
            if progress:
                progress(done, n)

    def _session(self, names: Sequence[str]):
        from onnxcc.compiler.ir_utils import needs_file

        types = _value_types(self.model)
        for name in names:
            if name not in types:
                raise BadInputError(f"tensor '{name}' is not in the model")

        def restrict(proto: onnx.ModelProto) -> onnx.ModelProto:
            # The requested tensors become the only outputs and nodes they do not depend on are
            # dropped, so collecting an early layer does not pay for the rest of the network.
            del proto.graph.output[:]
            proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in names)
            _keep_needed_nodes(proto.graph, names)
            return proto

        if needs_file(self.model):  # weights stay on disk: rewrite only the graph next to the data file
            from onnxcc.compiler.ir_utils import saved_copy

            with saved_copy(self.model) as p:
                proto = restrict(onnx.load(p, load_external_data=False))
                q = Path(p).with_name("collect.onnx")
                onnx.save(proto, str(q))
                return make_session(str(q), optimize=False, threads=self.threads)
        return make_session(restrict(ir.to_proto(self.model)), optimize=False, threads=self.threads)


class SegmentRunner:
    """Activations for a layer-by-layer refit, one forward pass in all instead of one per layer.

    A sequential refit (:func:`passes.refit.reconstruct`) needs each layer's input
    in the model as refit so far. Recomputing it from the graph inputs costs a forward pass per
    layer (about 50 of them on a ResNet-50). Each ``collect(reducers, before=node)`` (or
    ``after=node``) runs only the nodes between the previous stop and this one, on the tensors
    cached at the previous stop, hands the requested tensors to the reducers, and caches the
    tensors alive at this stop (produced before it, read by a later node). Between calls only
    the stop node and later nodes may change: a refit layer's weights, nodes inserted after it.
    Stops must come in graph order.

    Only the requested and the live tensors leave onnxruntime, so collecting every layer's output
    this way holds one at a time, where one session exposing all of them holds them all (2.6 GB
    on ResNet-50 at 224², batch 16). Memory: the tensors alive at a cut for every sample, a few
    activations on a CNN. Models whose weights stay on disk fall back to
    :class:`ActivationCollector` per call.
    """

    def __init__(self, model: ir.Model, calibration: CalibrationSet, *, limit: int | None = None, batch_size: int = 16,
                 threads: int | None = None):
        self.model, self.calibration, self.threads = model, calibration, threads
        self.limit = len(calibration) if limit is None else min(limit, len(calibration))
        self.batch_size = calibration.batch_size_for(model, batch_size)
        self.cache: list[dict[str, np.ndarray]] | None = None
        self.start: ir.Node | object | None = None  # where the cache was taken: a node, _END, or None (graph inputs)
        self.sessions = 0

    def collect(self, reducers: Mapping[str, Sequence[Reducer]], *, before: ir.Node | None = None, after: ir.Node | None = None) -> None:
        """Feed ``reducers`` the tensors computed by the nodes before ``before`` (or up to and with
        ``after``; neither: the whole graph)."""
        from onnxcc.compiler.ir_utils import needs_file

        if needs_file(self.model):
            ActivationCollector(self.model, self.calibration, batch_size=self.batch_size, threads=self.threads).collect(reducers, limit=self.limit, progress=None)
            return
        if self.cache is None:
            self.cache = list(self.calibration.batches(self.batch_size, self.limit))
        order = list(self.model.graph)
        i_stop = order.index(before) if before is not None else order.index(after) + 1 if after is not None else len(order)
        i_start = 0 if self.start is None else len(order) if self.start is _END else order.index(self.start)
        if i_start > i_stop:
            raise ValueError("SegmentRunner: stops must come in graph order")
        graph = self.model.graph
        consts = set(graph.initializers)
        # Nodes computing from constants only (a DequantizeLinear of int8 weights, a Constant) are
        # rerun in every segment that reads them, never cached: a refit may change their inputs.
        rerun = []  # constant-only nodes before the segment
        produced = {v.name for v in graph.inputs}  # by the stop: graph inputs and earlier nodes' outputs
        for i, n in enumerate(order[:i_stop]):
            outs = {o.name for o in n.outputs if o.name}
            produced |= outs
            if not any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in n.attributes.values()) and _reads(n) <= consts:
                consts |= outs
                if i < i_start:
                    rerun.append(n)
        later = {o.name for o in graph.outputs}
        for n in order[i_stop:]:
            later |= _reads(n)
        live = (produced & later) - consts
        seg = rerun + order[i_start:i_stop]
        made = {o.name for n in seg for o in n.outputs if o.name}
        wanted = list(reducers)
        outputs = sorted((live | set(wanted)) & made)
        missing = [w for w in wanted if w not in made and w not in self.cache[0]]
        if missing:
            raise BadInputError(f"tensor '{missing[0]}' is not available at this point of the model")
        session = None
        if outputs:
            # Only the segment is serialized: its nodes and the initializers they read.
            types = _value_types(self.model)
            g = onnx.GraphProto(name="segment")
            g.node.extend(ir.serde.serialize_node(n) for n in seg)
            _keep_needed_nodes(g, outputs)
            reads = set().union(*(_node_inputs(n) for n in g.node)) - made
            stored = sorted(reads & set(graph.initializers))
            g.initializer.extend(ir.serde.serialize_tensor(graph.initializers[k].const_value) for k in stored)
            for t, k in zip(g.initializer, stored):
                t.name = k
            g.input.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in sorted((reads & produced) - consts))  # outer-scope names
            g.output.extend(onnx.helper.make_tensor_value_info(n, types[n], None) for n in outputs)
            proto = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in self.model.opset_imports.items()],
                                           ir_version=self.model.ir_version)
            proto.functions.extend(ir.serde.serialize_function(f) for f in self.model.functions.values())
            session = make_session(proto, optimize=False, threads=self.threads)
            self.sessions += 1
            feeds = [i.name for i in session.get_inputs()]
        for b, cached in enumerate(self.cache):
            vals = dict(zip(outputs, session.run(outputs, {k: cached[k] for k in feeds}))) if session is not None else {}
            for name in wanted:
                arr = vals[name] if name in vals else cached[name]
                for r in reducers[name]:
                    r.update(arr)
            self.cache[b] = {k: vals[k] if k in vals else cached[k] for k in live}
        self.start = order[i_stop] if i_stop < len(order) else _END


_END = object()  # SegmentRunner: the whole graph has run


def _reads(node: ir.Node) -> set[str]:
    """The names a node reads, with the outer-scope names its subgraphs read."""
    names = {v.name for v in node.inputs if v is not None and v.name}
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else attr.value if attr.type == ir.AttributeType.GRAPHS else []
        for g in graphs:
            for inner in g:
                names |= _reads(inner)
    return names


def _node_inputs(node: onnx.NodeProto) -> set[str]:
    """A node's input names, with the outer-scope names its subgraphs read."""
    ins = set(i for i in node.input if i)
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in g.node:
                ins |= _node_inputs(inner)
    return ins


def _keep_needed_nodes(graph: onnx.GraphProto, names: Sequence[str]) -> None:
    """Remove the nodes no requested tensor depends on (subgraph inputs count as dependencies)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output}
    needed, stack = set(), list(names)
    while stack:
        t = stack.pop()
        i = producer.get(t)
        if i is None or i in needed:
            continue
        needed.add(i)
        stack.extend(_node_inputs(graph.node[i]))
    kept = [n for i, n in enumerate(graph.node) if i in needed]
    del graph.node[:]
    graph.node.extend(kept)


def _value_types(model: ir.Model) -> dict[str, int]:
    out = {}
    for v in model.graph.inputs:
        out[v.name] = int(v.dtype) if v.dtype is not None else onnx.TensorProto.FLOAT
    for node in model.graph.all_nodes():
        for v in node.outputs:
            if v.name:
                out[v.name] = int(v.dtype) if v.dtype is not None else onnx.TensorProto.FLOAT
    for v in model.graph.initializers.values():
        out[v.name] = int(v.dtype) if v.dtype is not None else onnx.TensorProto.FLOAT
    return out


def tensor_fingerprints(model: ir.Model) -> dict[str, str]:
    """A content hash of what computes each tensor: its op, attributes, constants and inputs, recursively.

    Two tensors with the same fingerprint hold the same values for the same model inputs, in this
    model or in a rewritten copy: statistics collected for one hold for the other. A pass that
    changes a layer changes the fingerprints of that layer's outputs and of everything after it,
    and of nothing before it, so the pipeline recomputes activations only where a pass changed the
    graph before them.
    """
    import hashlib

    fp: dict[ir.Value, str] = {}
    const_fp: dict[int, str] = {}

    def of_value(v: ir.Value | None) -> str:
        if v is None:
            return "-"
        if v in fp:
            return fp[v]
        t = v.const_value
        if t is not None and not v.is_graph_input():
            key = id(t)
            if key not in const_fp:
                const_fp[key] = "c" + hashlib.sha1(t.tobytes() + str(t.dtype).encode() + str(tuple(t.shape)).encode()).hexdigest()
            fp[v] = const_fp[key]
        else:  # a graph input (or a subgraph's outer value): its name and type
            fp[v] = "i" + hashlib.sha1(f"{v.name}|{v.dtype}|{v.shape}".encode()).hexdigest()
        return fp[v]

    for node in model.graph:  # topological order
        attrs = sorted((k, repr(a.value) if a.type != ir.AttributeType.GRAPH else f"graph:{id(a.value)}") for k, a in node.attributes.items())
        h = hashlib.sha1(f"{node.domain}|{node.op_type}|{attrs}|{[of_value(i) for i in node.inputs]}".encode()).hexdigest()
        for i, out in enumerate(node.outputs):
            fp[out] = f"{h}:{i}"
    return {v.name: f for v, f in fp.items() if v.name}
