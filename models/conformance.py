"""ONNX's operator conformance suite (the backend node tests) as a corpus of inputs nobody here wrote.

The installed ``onnx`` package regenerates every node test case
(``onnx.backend.test.case.node.collect_testcases``): one small model per
operator and variant, with input and expected output tensors. Regenerating
takes ~15 s, so :func:`cases` writes each eligible case once, as
``NAME/model.onnx`` + ``NAME/data.npz``, under ``$ONNXCC_CONFORMANCE``
(default ``~/.cache/onnxcc/conformance/onnx-VERSION``) and later reads the
cache only.

Eligible: every input and output a plain tensor of a numeric or bool dtype
(no sequences, optionals, strings, bfloat16 or 8/4/2-bit floats), with one data set.

Each case runs in three variants (:func:`variant`): as shipped; with every
input but the first frozen to a constant (so passes see constant weights,
axes and shapes, as in exported models); with every input frozen (a
constant-only graph, which fold must reduce to its values).

:func:`classify` runs one onnxcc command on one variant through the real CLI
and sorts the outcome: ``ok`` (exit 0 and the written model reproduces the
expected outputs, or what onnxruntime computes on the original), ``wrong``
(exit 0 and it does not: a silent wrong graph), ``refused`` (exit 1 or 2 with
one line on stderr), ``crash`` (an internal error, a traceback, or several
lines), ``unrunnable`` (onnxruntime cannot run the original on its own data:
any clean outcome is fine). ``python -m benchmarks.conformance`` runs the
whole campaign and prints the counts per command and variant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

INDEX = "index-v2.json"  # a new name when what is cached changes
COMMANDS = ("fold", "quantize", "prune", "lossless")
VARIANTS = ("shipped", "first-input", "frozen")
_NUMERIC = {
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
    onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    folder: Path
    rtol: float
    atol: float

    @property
    def model_path(self) -> Path:
        return self.folder / "model.onnx"

    def data(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        with np.load(self.folder / "data.npz", allow_pickle=False) as z:
            ins = {k[3:]: z[k] for k in z.files if k.startswith("in:")}
            outs = {k[4:]: z[k] for k in z.files if k.startswith("out:")}
        return ins, outs

    @property
    def op_type(self) -> str:
        return json.loads((self.folder / "meta.json").read_text())["op_type"]


def cache_dir() -> Path:
    root = os.environ.get("ONNXCC_CONFORMANCE") or Path.home() / ".cache" / "onnxcc" / "conformance" / f"onnx-{onnx.__version__}"
    return Path(root)


def _eligible(model: onnx.ModelProto) -> bool:
    for v in (*model.graph.input, *model.graph.output):
        t = v.type
        if not t.HasField("tensor_type") or t.tensor_type.elem_type not in _NUMERIC:
            return False
    return bool(model.graph.output)


def cases() -> list[Case]:
    """Every eligible node test case, written to the cache on first use."""
    root = cache_dir()
    index = root / INDEX
    if not index.is_file():
        _write_cache(root)
    entries = json.loads(index.read_text())
    return [Case(e["name"], root / e["name"], e["rtol"], e["atol"]) for e in entries]


def _write_cache(root: Path) -> None:
    import warnings

    from onnx.backend.test.case.node import collect_testcases

    root.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        all_cases = collect_testcases(None)
    entries = []
    for tc in all_cases:
        model = tc.model
        if model is None or not tc.data_sets or not _eligible(model):
            continue
        ins, outs = tc.data_sets[0]
        names_in = [v.name for v in model.graph.input]
        names_out = [v.name for v in model.graph.output]
        if len(ins) != len(names_in) or len(outs) != len(names_out):
            continue
        arrays = {}
        try:
            for n, a in zip(names_in, ins):
                arrays["in:" + n] = np.asarray(a)
            for n, a in zip(names_out, outs):
                arrays["out:" + n] = np.asarray(a)
        except Exception:  # a data set that is not plain arrays
            continue
        if any(a.dtype.kind in "OV" for a in arrays.values()):  # objects; bfloat16 (no numpy dtype)
            continue
        folder = root / tc.name
        folder.mkdir(exist_ok=True)
        onnx.save(model, str(folder / "model.onnx"))
        np.savez(folder / "data.npz", **arrays)
        (folder / "meta.json").write_text(json.dumps({"op_type": model.graph.node[0].op_type if model.graph.node else ""}))
        entries.append({"name": tc.name, "rtol": float(tc.rtol), "atol": float(tc.atol)})
    tmp = root / (INDEX + ".tmp")
    tmp.write_text(json.dumps(entries))
    tmp.replace(root / INDEX)


def unary_float_ops() -> list[tuple[str, dict]]:
    """(op_type, attributes) of every single-node case that maps one float32 tensor to one of the
    same shape (activations, normalizations, softmaxes, rounding, ...): operators the pass fuzzer
    drops into its CNN graphs (tests/strategies.py), with the attributes their test uses."""
    out, seen = [], set()
    for case in cases():
        m = onnx.load(str(case.model_path))
        g = m.graph
        if len(g.node) != 1 or len(g.input) != 1 or len(g.output) != 1 or g.node[0].domain not in ("", "ai.onnx"):
            continue
        if g.node[0].op_type in ("Bernoulli", "OptionalGetElement"):  # random draws; not a tensor op
            continue
        ti, to = g.input[0].type.tensor_type, g.output[0].type.tensor_type
        if ti.elem_type != onnx.TensorProto.FLOAT or to.elem_type != onnx.TensorProto.FLOAT:
            continue
        if [d.dim_value for d in ti.shape.dim] != [d.dim_value for d in to.shape.dim] or len(g.node[0].output) != 1:
            continue
        attrs = {}
        for a in g.node[0].attribute:
            v = onnx.helper.get_attribute_value(a)
            if isinstance(v, bytes):
                v = v.decode()
            elif isinstance(v, (list, tuple)):
                v = [x.decode() if isinstance(x, bytes) else x for x in v]
            if isinstance(v, (int, float, str, list)):
                attrs[a.name] = v
        key = (g.node[0].op_type, json.dumps(attrs, sort_keys=True))
        if key not in seen:
            seen.add(key)
            out.append((g.node[0].op_type, attrs))
    return out


def variant(case: Case, kind: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The case's model and feeds in one of :data:`VARIANTS`: frozen inputs become initializers
    holding the case's own values."""
    model = onnx.load(str(case.model_path))
    ins, _ = case.data()
    if kind == "shipped":
        return model, ins
    keep = 1 if kind == "first-input" else 0
    names = [v.name for v in model.graph.input]
    frozen = names[keep:]
    for n in frozen:
        model.graph.initializer.append(onnx.numpy_helper.from_array(ins[n], n))
    if model.ir_version >= 4:  # below IR 4 every initializer is also listed as a graph input
        kept = [v for v in model.graph.input if v.name not in frozen]
        del model.graph.input[:]
        model.graph.input.extend(kept)
    return model, {n: ins[n] for n in names[:keep]}


def command_args(command: str, model: Path, out: Path, data: Path | None, report: Path) -> list[str]:
    """The CLI arguments for one conformance run: the case's own inputs are the verification data
    (and the calibration data for ``quantize``)."""
    d = ["--data", str(data)] if data is not None else []
    if command == "fold":
        return ["-q", "fold", str(model), "-o", str(out), "--report", str(report), *d]
    if command == "quantize":
        calib = ["--calib", str(data)] if data is not None else []
        return ["-q", "quantize", str(model), "-o", str(out), "--report", str(report), *calib, *d]
    if command == "prune":
        return ["-q", "prune", str(model), "-o", str(out), "--ratio", "0.5", "--report", str(report), *d]
    if command == "lossless":
        return ["-q", "compile", str(model), "-o", str(out), "--recipe", "lossless", "--no-latency", "--report", str(report), *d]
    raise ValueError(command)


@dataclasses.dataclass
class Outcome:
    case: str
    command: str
    variant: str
    kind: str  # ok, wrong, refused, crash, unrunnable
    detail: str = ""
    seconds: float = 0.0


def _ort_run(path_or_model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 4
    src = path_or_model if isinstance(path_or_model, (str, os.PathLike)) else path_or_model.SerializeToString()
    sess = ort.InferenceSession(str(src) if isinstance(src, os.PathLike) else src, so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, dict(feeds))))


def _dtype_tolerance(dtype: np.dtype, rtol: float, atol: float) -> tuple[float, float]:
    if dtype == np.float16:
        return max(rtol, 2e-3), max(atol, 2e-3)
    if dtype.name == "bfloat16":
        return max(rtol, 1.6e-2), max(atol, 1.6e-2)
    return max(rtol, 1e-4), max(atol, 1e-5)


def agrees(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray], rtol: float, atol: float) -> str | None:
    """None when every expected output is reproduced (NaN where NaN, dtype's tolerance), else why not."""
    for name, w in want.items():
        g = got.get(name)
        if g is None:
            return f"output '{name}' missing"
        w, g = np.asarray(w), np.asarray(g)
        if g.shape != w.shape:
            return f"output '{name}' shape {g.shape} vs {w.shape}"
        if g.dtype != w.dtype:
            return f"output '{name}' dtype {g.dtype} vs {w.dtype}"
        if np.issubdtype(w.dtype, np.floating) or w.dtype.name == "bfloat16":
            r, a = _dtype_tolerance(w.dtype, rtol, atol)
            if not np.allclose(g.astype(np.float64), w.astype(np.float64), rtol=r, atol=a, equal_nan=True):
                return f"output '{name}' values differ (max abs {np.nanmax(np.abs(g.astype(np.float64) - w.astype(np.float64))):.3g})"
        elif not np.array_equal(g, w):
            return f"output '{name}' values differ"
    return None


Runner = Callable[[Sequence[str]], tuple[int, str]]  # CLI args -> (exit code, stderr)


def classify(case: Case, command: str, kind: str, run_cli: Runner, *, with_data: bool = True) -> Outcome:
    """Run ``onnxcc COMMAND`` on one variant of ``case`` and sort the outcome (module docstring)."""
    import time

    t0 = time.perf_counter()
    o = _classify(case, command, kind, run_cli, with_data)
    o.seconds = round(time.perf_counter() - t0, 3)
    return o


def _classify(case: Case, command: str, kind: str, run_cli: Runner, with_data: bool) -> Outcome:
    model, feeds = variant(case, kind)
    _, expected = case.data()
    with tempfile.TemporaryDirectory(prefix="onnxcc-conf-") as tmp:
        t = Path(tmp)
        src, out, rep, data = t / "in.onnx", t / "out.onnx", t / "report.json", t / "data.npz"
        onnx.save(model, str(src))
        np.savez(data, **feeds)
        try:
            original = _ort_run(src, feeds)
        except Exception:
            original = None
        code, err = run_cli(command_args(command, src, out, data if (with_data and feeds) else None, rep))
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        o = Outcome(case.name, command, kind, "", lines[-1] if lines else "")
        if code == 3 or "Traceback" in err or (code != 0 and len(lines) != 1):
            o.kind = "crash"
            return o
        if code != 0:
            o.kind = "unrunnable" if original is None else "refused"
            return o
        if original is None:
            o.kind = "unrunnable"
            return o
        try:
            got = _ort_run(out, feeds)
        except Exception as e:  # exit 0 but the written model does not run on the data
            o.kind, o.detail = "wrong", f"written model does not run: {str(e).splitlines()[0][:200]}"
            return o
        why = agrees(got, expected, case.rtol, case.atol)
        if why is not None and agrees(got, original, case.rtol, case.atol) is None:
            why = None  # onnxruntime's own result (it departs from the reference here, not onnxcc)
        if why is not None and command in ("quantize", "prune"):
            why = _lossy_disclosed(rep, why)
        o.kind, o.detail = ("ok", "") if why is None else ("wrong", why)
        return o


def _lossy_disclosed(report: Path, why: str) -> str | None:
    """A lossy command may change values it reports having changed (a lossy step with changes and
    a measured error); a changed output shape or dtype, or an unreported change, stays wrong."""
    if "shape" in why or "dtype" in why or "missing" in why or "does not run" in why:
        return why
    try:
        rep = json.loads(report.read_text())
    except (OSError, ValueError):
        return why
    lossy = [p for p in rep.get("passes", []) if not p.get("exact") and p.get("changed")]
    return None if lossy and all(p.get("verify_vs_original") for p in lossy) else why
