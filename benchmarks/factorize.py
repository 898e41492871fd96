"""Factorization: MACs, measured latency and accuracy per method, with and without the least-squares refit.

    python -m benchmarks.factorize [--rank 0.25] [--size small] [--methods spatial-svd,tucker,...] [--models digits-vgg,...]
                                   [--no-trained] [--keep-if-faster] [--json out.json]
    python -m benchmarks.factorize --cost [--rank 0.5]   # wall time and memory per method, full-size models

Models: the digits-trained VGG-, ResNet- and MobileNetV2-style networks
(accuracy on 500 held-out images; needs the torch extra) and the VGG- and
ResNet-style builder models (random weights: top-1 agreement and SQNR
against fp32 instead of accuracy). Every factorized variant of one model is
timed in one ``bench_models`` run with its fp32 model (interleaved rounds,
2 threads, batch 1 and 8). ``--keep-if-faster`` adds the variant the pass
keeps after measuring each layer and the whole model.

Issue #6's targets: on a VGG-style trained model ≥ 1.5× measured speedup at
≤ 1 point top-1 drop with refit; ``--keep-if-faster`` never slower than fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


METHODS = ["spatial-svd", "tucker", "depthwise", "cp"]


def run(args):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from onnxcc.compiler.analysis import analyze, format_table
    from onnxcc.compiler.bench import bench_models
    from onnxcc.compiler.calibration import CalibrationSet, input_specs, random_inputs
    from onnxcc.compiler.ir_utils import clone_model, load_model
    from onnxcc.compiler.pipeline import Pipeline
    from onnxcc.compiler.verify import compare_outputs, run_model
    from onnxcc.models.builders import build

    models = []  # (label, model, calib, eval inputs, labels or None)
    if not args.no_trained:
        from tests.trained import digits, trained

        x_tr, _, _, x_te, y_te = digits()
        for name in ("vgg", "resnet", "mobilenet_v2"):
            path, _ = trained(name)
            m = load_model(path)
            Pipeline(["fold"], verify=False).run(m)
            models.append((f"digits-{name}", m, CalibrationSet({"input": x_tr[:256]}), {"input": x_te}, y_te))
    for fam in ("vgg", "resnet"):
        m = build(fam, args.size, seed=0)
        Pipeline(["fold"], verify=False).run(m)
        feeds = random_inputs(input_specs(m), batch=64, seed=1)[0]
        evalx = random_inputs(input_specs(m), batch=64, seed=2)[0]
        models.append((f"{fam}-{args.size}", m, CalibrationSet(feeds), evalx, None))

    if args.models:
        models = [m for m in models if any(k in m[0] for k in args.models.split(","))]
    rows, records = [], []
    for label, base, calib, evalx, labels in models:
        ref = run_model(base, [evalx])
        macs0 = analyze(base).macs

        def quality(m):
            c = compare_outputs(ref, run_model(m, [evalx]), labels)
            if labels is not None:
                return f"{100 * c.accuracy_cand:.1f}%", c.accuracy_cand
            return f"agree {100 * c.outputs[0].top1:.0f}% / {c.outputs[0].sqnr_db:.1f} dB", c.outputs[0].top1

        variants = [("fp32", base, 0.0)]
        for method in args.methods:
            for refit in (False, True):
                m = clone_model(base)
                t0 = time.perf_counter()
                opts = {"method": method, "rank": args.rank, "refit": refit}
                Pipeline([("factorize", opts)], verify=False).run(m, calib if refit else None)
                variants.append((f"{method}{'+refit' if refit else ''}", m, time.perf_counter() - t0))
            if args.keep_if_faster:
                m = clone_model(base)
                t0 = time.perf_counter()
                Pipeline([("factorize", {"method": method, "rank": args.rank, "keep_if_faster": True})], verify=False).run(m, calib)
                variants.append((f"{method}+refit+keep-if-faster", m, time.perf_counter() - t0))
        timed = {}
        for batch in (1, 8):
            res = bench_models([(v[0], v[1]) for v in variants], threads=2, batch=batch, rounds=args.rounds, block=10, measure_memory=False)
            timed[batch] = {e.label: e.ratio for e in res.entries}
        base_q = quality(base)
        for name, m, secs in variants:
            q, qv = quality(m)
            rec = {
                "model": label, "variant": name, "macs_ratio": analyze(m).macs / macs0,
                "latency_ratio_b1": timed[1][name], "latency_ratio_b8": timed[8][name], "quality": q, "quality_value": qv,
                "fp32_quality": base_q[1], "seconds": secs,
            }
            records.append(rec)
            rows.append([label, name, f"{rec['macs_ratio']:.2f}", f"{timed[1][name]:.2f}", f"{timed[8][name]:.2f}", q, f"{secs:.1f}"])
        print(f"done {label}", file=sys.stderr, flush=True)
    print(f"rank {args.rank} (fraction of each layer's MACs kept); latency = onnxcc bench ratio vs fp32, 2 threads")
    print(format_table(rows, ["model", "variant", "MACs", "lat b1", "lat b8", "accuracy / agreement", "time s"]))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


def cost(args):
    """``onnxcc factorize IN --method M --rank R --keep-if-faster`` on the full-size VGG-11- and
    ResNet-18-style builders (224², random weights), each in its own process as a user runs it:
    wall time and peak memory per method (issue #17: every method under 2 minutes on 2 cores)."""
    import os
    import subprocess
    import tempfile

    from onnxcc.compiler.analysis import format_table

    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="onnxcc-fact-cost-") as tmp:
        for fam, label in (("vgg", "VGG-11-style (133 M params)"), ("resnet", "ResNet-18-style (11.7 M params)")):
            src = Path(tmp) / f"{fam}.onnx"
            # built in a child process: a child forked from a parent holding the model would count
            # the parent's pages in its peak memory
            subprocess.run([sys.executable, "-c", "import sys; from onnxcc.models.builders import build; "
                            "from onnxcc.compiler.ir_utils import save_model; save_model(build(sys.argv[1], 'full', seed=0), sys.argv[2])",
                            fam, str(src)], check=True)
            for method in args.methods:
                cmd = [sys.executable, "-m", "onnxcc.compiler.cli", "factorize", str(src), "-o", str(Path(tmp) / "out.onnx"),
                       "--method", method, "--rank", str(args.rank), "--keep-if-faster", "-q"]
                t0 = time.perf_counter()
                proc = subprocess.Popen(cmd)
                _, status, usage = os.wait4(proc.pid, 0)
                wall = time.perf_counter() - t0
                rec = {"model": label, "method": method, "rank": args.rank, "seconds": round(wall, 1),
                       "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 2), "exit": os.waitstatus_to_exitcode(status)}
                records.append(rec)
                rows.append([label, method, f"{wall:.1f}", f"{rec['peak_rss_gb']:.2f}", str(rec["exit"])])
                print(f"done {label} {method}", file=sys.stderr, flush=True)
    print(f"onnxcc factorize --rank {args.rank} --keep-if-faster, one process each, {os.cpu_count()} cores")
    print(format_table(rows, ["model", "method", "wall s", "peak GB", "exit"]))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=float, default=0.25)
    ap.add_argument("--size", default="small", choices=["tiny", "small", "full"])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-trained", action="store_true")
    ap.add_argument("--models", default="", help="comma-separated substrings of the model labels to run (default: all)")
    ap.add_argument("--keep-if-faster", action="store_true")
    ap.add_argument("--cost", action="store_true", help="only the wall time and memory of each method on the full-size builders")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    cost(args) if args.cost else run(args)


if __name__ == "__main__":
    main()
