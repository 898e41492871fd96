"""`onnxcc search` against today's greedy allocation and the shipped recipes, at one target.

    python -m benchmarks.search [--target macs=0.3] [--budget 1] [--trials 8] [--workers 1,2] [--json out.json]

On the bundled trained sample (400 held-out labelled digits; metric: top-1 accuracy), each row
at the same MACs target and budget:

* ``greedy``: ``prune --target-macs T --reconstruct`` (per-space ratios from one sensitivity
  sweep, cheapest loss per MAC first), under the budget;
* ``recipe:<name>``: each shipped recipe that cuts MACs, under the budget;
* ``search (K workers)``: ``onnxcc search --target macs=T`` with N trials (the greedy allocation
  is its first trial), K local worker processes (1 onnxruntime thread each when K > 1).

Reported: the MACs ratio reached, the accuracy drop, the wall time and, for the searches,
finished trials per hour. A deeper cut at the same drop, or a lower drop at the same cut, is
the search's claim. Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

SAMPLE, CALIB, EVAL, LABELS = ("models/sample_resnet.onnx", "models/sample_calib.npy", "models/sample_eval.npy",
                               "models/sample_labels.npy")


def _row(name: str, report: dict, seconds: float, **extra) -> dict:
    b, a = report["before"], report["after"]
    return {"variant": name, "macs_ratio": round(a["macs"] / b["macs"], 4), "drop": report["metric"]["drop_points"],
            "accuracy": report["metric"]["accuracy_after"], "seconds": round(seconds, 1), **extra}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="macs=0.3")
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from onnxcc.compiler.api import compile_model, shipped_recipes
    from onnxcc.compiler.errors import OnnxccError
    from onnxcc.compiler.search import parse_target, search

    target = parse_target(args.target)
    common = dict(calibration=CALIB, data=EVAL, labels=LABELS, budget=args.budget)
    rows = []
    t0 = time.perf_counter()
    greedy = compile_model(SAMPLE, ["fold", ("prune", {"target_macs": target.value, "reconstruct": True}), "fold"],
                           measure_latency=False, **common)
    rows.append(_row("greedy --target-macs", greedy.report, time.perf_counter() - t0))
    for name in ("faster-2x",):
        t0 = time.perf_counter()
        try:
            res = compile_model(SAMPLE, shipped_recipes()[name], measure_latency=False, **common)
            rows.append(_row(f"recipe:{name}", res.report, time.perf_counter() - t0))
        except OnnxccError as e:
            rows.append({"variant": f"recipe:{name}", "error": str(e)})
    for k in (int(w) for w in args.workers.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = search(SAMPLE, target, trials=args.trials, workers=k, study=Path(tmp) / "s.db", factorize=("svd", "spatial-svd"), **common)
            wall = time.perf_counter() - t0
            s = res.report["search"]
            done = sum(t["state"] == "COMPLETE" for t in s["trials"])
            rows.append(_row(f"search ({k} worker{'s' if k > 1 else ''})", res.report, wall, trials=done,
                             trials_per_hour=round(3600 * done / s["seconds"], 1), reached=s["reached"]))
    print(f"target {args.target}, budget {args.budget} points, sample (fp32 {100 * greedy.report['metric']['accuracy_before']:.2f}%)")
    print(f"{'variant':<24} {'MACs':>7} {'drop':>6} {'acc %':>7} {'s':>7} {'trials/h':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<24} {r['error']}")
            continue
        print(f"{r['variant']:<24} {r['macs_ratio']:>7.3f} {r['drop']:>6.2f} {100 * r['accuracy']:>7.2f} {r['seconds']:>7.1f} "
              f"{r.get('trials_per_hour', ''):>9}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
