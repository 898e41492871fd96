"""onnxruntime sessions: the one factory every onnxcc module uses (core layer).

Two kinds of session, one function:

* **checking** (``optimize=False``, the default): graph optimizations off, so
  verification and calibration see exactly the graph onnxcc wrote;
* **timing** (``timing=True``): ``ORT_ENABLE_ALL`` as a deployment would run it,
  sequential execution, ``threads`` intra-op threads and no spinning. Idle
  worker threads of one session spin and steal the cores from the next
  (measured here: the same model timed twice in one process came out 1.9×
  slower the second time, blocks or not); without spinning both agree.

A model onnxruntime cannot load or run is a :class:`ModelRejectedError` (a `BadInputError`) with onnxruntime's
first line; the pipeline turns it into the pass's own error when the model is
one onnxcc wrote. onnxruntime is imported on first use only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from onnxcc.compiler.errors import ModelRejectedError
from onnxcc.compiler.ir_utils import model_to_bytes, needs_file, save_model, saved_copy

if TYPE_CHECKING:
    import onnxruntime as ort


def first_line(e: BaseException) -> str:
    """An exception's first line, or its type when it has no text (onnxruntime's are long)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def make_session(
    model: ir.Model | onnx.ModelProto | bytes | str | Path,
    *,
    optimize: bool = False,
    threads: int | None = None,
    optimized_path: str | None = None,
    profile_prefix: str | None = None,
    timing: bool = False,
) -> "ort.InferenceSession":
    """An onnxruntime CPU session; see the module docstring for the two kinds."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if (optimize or timing) else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    so.log_severity_level = 4  # failures come back as exceptions, turned into one-line errors
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if timing:
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if isinstance(model, ir.Model):
        if needs_file(model):
            with saved_copy(model) as p:
                return _open(str(p), so)
        model = ir.to_proto(model).SerializeToString()
    elif isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    return _open(model, so)


def _open(src: Any, so: Any) -> "ort.InferenceSession":
    import onnxruntime as ort

    try:
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises several exception types here
        raise ModelRejectedError(f"onnxruntime cannot load the model: {first_line(e)}") from e


def run_session(session: "ort.InferenceSession", feeds: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Run every feed and concatenate outputs along axis 0 (or stack scalars)."""
    names = [o.name for o in session.get_outputs()]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    batch = next((np.shape(v)[0] for v in feeds[0].values() if np.ndim(v) > 0), None) if feeds else None
    for feed in feeds:
        try:
            outs = session.run(names, dict(feed))
        except Exception as e:
            raise ModelRejectedError(f"onnxruntime failed to run the model: {first_line(e)}") from e
        for n, o in zip(names, outs):
            parts[n].append(np.asarray(o))
    return {n: join_batches(v, batch) for n, v in parts.items()}


def batch_axis(arrs: list[np.ndarray], batch: int | None) -> int:
    """The axis the samples of one feed lie along in an output: 0, unless axis 0 is not the
    feed's batch size and exactly one other axis is (a sequence-first CTC output ``[T, N, C]``)."""
    if batch is None or not arrs or arrs[0].ndim == 0 or arrs[0].shape[0] == batch:
        return 0
    axes = [k for k in range(1, arrs[0].ndim) if all(a.ndim == arrs[0].ndim and a.shape[k] == batch for a in arrs)]
    return axes[0] if len(axes) == 1 else 0


def join_batches(arrs: list[np.ndarray], batch: int | None = None) -> np.ndarray:
    """One array from the outputs of several feeds: concatenated along the batch (axis 0, or the
    axis of size ``batch`` where axis 0 is not: :func:`batch_axis`), stacked when scalars;
    outputs whose shape depends on the data (TopK, Tile, Resize by sizes) differ between feeds
    and are joined flattened (the same way for both models compared)."""
    if len(arrs) == 1:
        return arrs[0]
    if all(a.ndim > 0 for a in arrs):
        try:
            return np.concatenate(arrs, axis=batch_axis(arrs, batch))
        except ValueError:
            pass
    if len({a.shape for a in arrs}) == 1:
        return np.stack(arrs)
    return np.concatenate([a.ravel() for a in arrs])


def run_model(model: ir.Model | bytes, feeds: Sequence[Mapping[str, np.ndarray]], *, optimize: bool = False) -> dict[str, np.ndarray]:
    return run_session(make_session(model, optimize=optimize), feeds)


def session_source(model: ir.Model) -> ir.Model | bytes:
    """``model`` serialized once for several sessions over it (a large model takes seconds to
    serialize); the model itself when it must go through a file (:func:`make_session` saves it)."""
    return model if needs_file(model) else model_to_bytes(model)


def optimized_graph(model: ir.Model) -> onnx.ModelProto:
    """The graph onnxruntime runs (``ORT_ENABLE_ALL``, the level ``onnxcc bench`` uses), as a proto."""
    with tempfile.TemporaryDirectory(prefix="onnxcc-fusion-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "opt.onnx"
        save_model(model, src)
        make_session(src, optimize=True, threads=1, optimized_path=str(dst))
        return onnx.load(str(dst))
