"""Latency, file size and peak memory of several models, measured side by side.

Latency is measured in one process in **alternating blocks**: for each round,
each model gets ``warmup`` untimed runs then ``block`` timed runs, and the
rounds repeat. The figure per model is the median over all its timed runs,
with the 10th/90th percentiles as spread, and the ratio to the first model.
Blocks rather than run-by-run interleaving: on a 2-core machine onnxruntime's
worker threads keep spinning after a run, so two sessions run back to back
slow each other (1.3–2.4× at batch 1 seen here); within a block only one
session works, and the rounds keep slow drift fair to every model.

Blocks alone were not enough here: the same model timed twice in one
process came out 1.9x slower the second time, because the idle session's
threads keep spinning. So sessions run with thread spinning off, and every
model gets one untimed block before the timed rounds. With both, the same
model timed twice agrees within 1%. Sessions use onnxruntime's full graph
optimisation (what a deployment gets) and a fixed ``intra_op_num_threads``,
which the report states.

Peak memory is measured per model in a child process (so one model's
allocations cannot hide another's): the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``) after imports, and the figure is the peak (VmHWM)
reached while creating the session and running it once, minus the RSS before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxcc.compiler.calibration import input_specs, random_inputs
from onnxcc.compiler.files import file_size
from onnxcc.compiler.ir_utils import load_model, save_model
from onnxcc.compiler.sessions import make_session


@dataclasses.dataclass
class BenchEntry:
    label: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int
    ratio: float = 1.0
    file_size: int | None = None
    peak_mem_mb: float | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BenchResult:
    entries: list[BenchEntry]
    threads: int
    batch: int
    rounds: int
    block: int

    def to_json(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "batch": self.batch,
            "rounds": self.rounds,
            "block": self.block,
            "models": [e.to_json() for e in self.entries],
        }

    def table(self) -> str:
        from onnxcc.compiler.analysis import format_table, human

        rows = [
            [
                e.label,
                f"{e.median_ms:.3f}",
                f"{e.p10_ms:.3f}-{e.p90_ms:.3f}",
                f"{e.ratio:.3f}x",
                human(e.file_size, "B") if e.file_size is not None else "-",
                f"{e.peak_mem_mb:.1f}" if e.peak_mem_mb is not None else "-",
            ]
            for e in self.entries
        ]
        head = f"batch {self.batch}, {self.threads} threads, {self.rounds} rounds x {self.block} runs per model"
        return head + "\n" + format_table(rows, ["model", "median ms", "p10-p90 ms", "vs first", "file", "peak MB"])


def bench_models(
    models: Sequence[tuple[str, str | os.PathLike | ir.Model]],
    *,
    threads: int = 2,
    batch: int = 1,
    rounds: int = 5,
    block: int = 15,
    warmup: int = 3,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    measure_memory: bool = True,
    seed: int = 0,
) -> BenchResult:
    with tempfile.TemporaryDirectory(prefix="onnxcc-bench-") as tmp:
        paths: list[tuple[str, Path]] = []
        sessions, feeds = [], []
        for i, (label, m) in enumerate(models):
            if isinstance(m, ir.Model):
                p = Path(tmp) / f"m{i}.onnx"
                save_model(m, p)
            else:
                p = Path(m)
                m = load_model(p, check=False)  # one-line error for a bad file
            paths.append((label, p))
            specs = input_specs(m)
            feeds.append(random_inputs(specs, n=1, seed=seed, batch=batch, overrides=input_shapes)[0])
            sessions.append(make_session(p, timing=True, threads=threads))
        times: list[list[float]] = [[] for _ in sessions]
        for s, feed in zip(sessions, feeds):  # one untimed block each: first-run allocations, caches
            for _ in range(block):
                s.run(None, feed)
        for _ in range(rounds):
            for i, (s, feed) in enumerate(zip(sessions, feeds)):
                for _ in range(warmup):
                    s.run(None, feed)
                for _ in range(block):
                    t0 = time.perf_counter()
                    s.run(None, feed)
                    times[i].append((time.perf_counter() - t0) * 1e3)
        del sessions
        entries = []
        for (label, p), ts in zip(paths, times):
            entries.append(
                BenchEntry(
                    label=label,
                    median_ms=statistics.median(ts),
                    p10_ms=float(np.percentile(ts, 10)),
                    p90_ms=float(np.percentile(ts, 90)),
                    runs=len(ts),
                    file_size=file_size(p),
                    peak_mem_mb=peak_memory_mb(p, threads, batch, input_shapes) if measure_memory else None,
                )
            )
    base = entries[0].median_ms
    for e in entries:
        e.ratio = e.median_ms / base if base > 0 else float("nan")
    return BenchResult(entries, threads, batch, rounds, block)


def peak_memory_mb(path: str | os.PathLike, threads: int, batch: int, input_shapes: Mapping[str, Sequence[int]] | None = None) -> float | None:
    """Peak RSS growth (MB) of creating a session on ``path`` and running it once, in a child process."""
    args = [sys.executable, "-m", "onnxcc.compiler.bench", "--memprobe", str(path), str(threads), str(batch), json.dumps(dict(input_shapes or {}))]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        return None
    if out.returncode != 0:
        return None
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _memprobe(path: str, threads: int, batch: int, shapes_json: str) -> None:
    import onnxruntime  # noqa: F401  (count the import in the baseline)

    from onnxcc.compiler.calibration import InputSpec

    base = _reset_peak_rss()
    s = make_session(path, timing=True, threads=threads)
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
              "tensor(int8)": np.int8, "tensor(bool)": np.bool_}
    specs = [InputSpec(i.name, np.dtype(dtypes.get(i.type, np.float32)), tuple(i.shape)) for i in s.get_inputs()]
    feed = random_inputs(specs, n=1, batch=batch, overrides=json.loads(shapes_json) or None)[0]
    s.run(None, feed)
    print((_status_kib("VmHWM") - base) / 1024.0)


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return it (KiB)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--memprobe":
        _memprobe(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])


_TOKEN = re.compile(r"(_token_\d+|_nchwc|_kernel_time)+$")


def layer_name(node_name: str) -> str:
    """The graph node a profiled onnxruntime kernel came from.

    onnxruntime renames the nodes it fuses or converts (``conv_12`` becomes
    ``conv_12_token_4`` after a QDQ fusion, ``..._nchwc`` after the NCHWc layout
    transform); the original name is what is left after those suffixes.
    """
    return _TOKEN.sub("", node_name)


def profile_nodes(
    model: str | os.PathLike | ir.Model,
    *,
    threads: int = 2,
    batch: int = 1,
    runs: int = 20,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Median time of every kernel onnxruntime runs, by original node name: ``{name: {"op", "us"}}``.

    Uses onnxruntime's own profiler (``enable_profiling``) on the session that
    ``bench_models`` would build; kernels that onnxruntime derived from one node
    (a fused Conv+Relu, a QLinearConv from a QDQ unit) are summed under that
    node's name. Times include the profiler's small per-kernel overhead.
    """
    with tempfile.TemporaryDirectory(prefix="onnxcc-profile-") as tmp:
        if isinstance(model, ir.Model):
            p = Path(tmp) / "m.onnx"
            save_model(model, p)
            m = model
        else:
            p = Path(model)
            m = load_model(p, check=False)
        feed = random_inputs(input_specs(m), n=1, seed=seed, batch=batch, overrides=input_shapes)[0]
        sess = make_session(p, timing=True, threads=threads, profile_prefix=str(Path(tmp) / "prof"))
        for _ in range(3):
            sess.run(None, feed)
        for _ in range(runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        kernel = e["name"][: -len("_kernel_time")]
        counts[kernel] = counts.get(kernel, 0) + 1
        if counts[kernel] <= 3:  # the three warm-up runs inside the profiled session
            continue
        per.setdefault(kernel, {"op": e.get("args", {}).get("op_name", "?"), "t": []})["t"].append(float(e["dur"]))
    out: dict[str, dict[str, Any]] = {}
    for kernel, d in per.items():
        name = layer_name(kernel)
        entry = out.setdefault(name, {"op": d["op"], "us": 0.0, "kernels": []})
        entry["us"] += statistics.median(d["t"])
        entry["kernels"].append(d["op"])
    for entry in out.values():
        entry["us"] = round(entry["us"], 2)
    return out


# BatchNormalization too: onnxruntime folds it into the conv before, and names the kernel after
# its output, so an unfolded model's conv times are charged to the conv (paired with the folded model's)
_FUSED_INTO_PRODUCER = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "Add", "Sum", "QuantizeLinear",
                        "DequantizeLinear", "BatchNormalization"}


def layer_times(model: ir.Model, profile: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Profiled kernel times attributed to the nodes of ``model`` (µs by node name).

    onnxruntime names a kernel after the node it came from, or (NCHWc convs)
    after the tensor it writes, which may be the output of an activation or
    residual Add it fused into the conv: such a time goes to the conv that
    produced the fused chain. Kernels with no counterpart (layout reorders) are
    left out.
    """
    by_name = {n.name: n for n in model.graph if n.name}
    by_output = {v.name: n for n in model.graph for v in n.outputs if v.name}
    out: dict[str, float] = {}
    for key, entry in profile.items():
        node = by_name.get(key) or by_output.get(key)
        while node is not None and node.op_type in _FUSED_INTO_PRODUCER and node.inputs and node.inputs[0] is not None:
            prev = node.inputs[0].producer()
            if prev is None:
                break
            node = prev
        if node is not None and node.name:
            out[node.name] = out.get(node.name, 0.0) + float(entry["us"])
    return out
