"""Every shipped recipe on full-size builder models and trained models: size, speed, accuracy, compile cost.

    python -m benchmarks.compile [--families resnet_bottleneck,mobilenet_v2] [--size full] [--no-trained]
                                 [--recipes lossless,int8-x86,faster-2x,smallest] [--json out.json]

Each compile runs in its own process (``compiler.compile_model``, 64
calibration samples) so its wall time and peak resident memory (``ru_maxrss``)
are its own. Then every model's outputs are timed side by side with its fp32
model in one ``bench_models`` run (2 threads, batch 1 and 8) and evaluated:
accuracy on 500 held-out digits for the trained networks, top-1 agreement and
SQNR against fp32 for the builders (random weights).

Issue #8's targets: the ``faster-2x`` recipe reaches ≥ 2× measured speedup at
≤ 1 point drop on a trained model; compiling a ResNet-50-size model with 64
calibration samples takes < 2 min and < 4 GB on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def child(model: str, recipe: str, calib: str, out: str) -> None:
    """Compile in this process and print seconds and peak RSS (MB) as JSON."""
    sys.path.insert(0, str(ROOT))
    from onnxcc import compile_model

    t0 = time.perf_counter()
    res = compile_model(model, recipe, calibration=calib, measure_latency=False)
    res.save(out)
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "params": res.report["after"]["params"],
                      "macs": res.report["after"]["macs"], "params0": res.report["before"]["params"], "macs0": res.report["before"]["macs"]}))


def run(args):
    sys.path.insert(0, str(ROOT))
    from onnxcc.compiler.analysis import format_table
    from onnxcc.compiler.bench import bench_models
    from onnxcc.compiler.calibration import input_specs, random_inputs
    from onnxcc.compiler.ir_utils import load_model, save_model
    from onnxcc.compiler.verify import compare_outputs, run_model
    from onnxcc.models.builders import build

    tmp = Path(tempfile.mkdtemp(prefix="onnxcc-compile-bench-"))
    models = []  # (label, path, calib path, eval feeds, labels)
    if not args.no_trained:
        from tests.trained import digits, trained

        x_tr, _, _, x_te, y_te = digits()
        np.save(tmp / "digits.npy", x_tr[:64])
        for name in ("vgg", "resnet", "mobilenet_v2"):
            models.append((f"digits-{name}", trained(name)[0], tmp / "digits.npy", {"input": x_te}, y_te))
    for fam in args.families:
        m = build(fam, args.size, seed=0)
        p = tmp / f"{fam}.onnx"
        save_model(m, p)
        specs = input_specs(m)
        np.save(tmp / f"{fam}.npy", random_inputs(specs, batch=64, seed=1)[0][specs[0].name])
        models.append((f"{fam}-{args.size}", p, tmp / f"{fam}.npy", random_inputs(specs, batch=16, seed=2)[0], None))

    rows, records = [], []
    for label, path, calib, evalx, labels in models:
        outs = [("fp32", Path(path), None)]
        for recipe in args.recipes:
            out = tmp / f"{label}.{recipe}.onnx"
            r = subprocess.run([sys.executable, "-m", "benchmarks.compile", "--child", str(path), recipe, str(calib), str(out)],
                               cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                err = (r.stderr.strip().splitlines() or ["?"])[-1]
                rows.append([label, recipe, "-", "-", "-", "-", "-", f"failed: {err[:60]}", "-", "-"])
                continue
            outs.append((recipe, out, json.loads(r.stdout.strip().splitlines()[-1])))
        timed = {}
        for batch in (1, 8):
            res = bench_models([(n, p) for n, p, _ in outs], threads=2, batch=batch, rounds=args.rounds, block=10, measure_memory=False)
            timed[batch] = {e.label: e for e in res.entries}
        base = load_model(outs[0][1], check=False)
        ref = run_model(base, [evalx])
        for name, p, info in outs:
            c = compare_outputs(ref, run_model(load_model(p, check=False), [evalx]), labels)
            q = f"{100 * c.accuracy_cand:.1f}%" if labels is not None else f"agree {100 * c.outputs[0].top1:.0f}% / {c.min_sqnr:.0f} dB"
            e1, e8 = timed[1][name], timed[8][name]
            rec = {"model": label, "recipe": name, "latency_ratio_b1": e1.ratio, "latency_ratio_b8": e8.ratio, "file_bytes": e1.file_size, "quality": q, **(info or {})}
            records.append(rec)
            params = f"{info['params'] / info['params0']:.2f}" if info else "1.00"
            macs = f"{info['macs'] / info['macs0']:.2f}" if info else "1.00"
            rows.append([label, name, params, macs, f"{e1.file_size / 1e6:.2f}", f"{e1.ratio:.2f}", f"{e8.ratio:.2f}", q,
                         f"{info['seconds']:.1f}" if info else "-", f"{info['peak_mb']:.0f}" if info else "-"])
        print(f"done {label}", file=sys.stderr, flush=True)
    print("ratios vs fp32; latency: onnxcc bench, 2 threads; compile: own process, 64 calibration samples")
    print(format_table(rows, ["model", "recipe", "params", "MACs", "file MB", "lat b1", "lat b8", "accuracy / agreement", "compile s", "peak MB"]))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        return child(*argv[1:5])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default="resnet_bottleneck,mobilenet_v2")
    ap.add_argument("--size", default="full", choices=["tiny", "small", "full"])
    ap.add_argument("--recipes", default="lossless,int8-x86,faster-2x,smallest")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-trained", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    args.recipes = [r for r in args.recipes.split(",") if r]
    run(args)


if __name__ == "__main__":
    main()
