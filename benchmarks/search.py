"""`onnxcc search` against today's greedy allocation and the shipped recipes, at one target.

    python -m benchmarks.search [--models sample,resnet,mobilenet_v2,mobilenet_v3,vgg] [--target macs=0.3]
                                [--budget 1] [--trials 8] [--workers 1,2] [--ray-nodes 2]
                                [--full-trials 64] [--json out.json]

Networks: the bundled trained sample (400 held-out labelled digits) and the digits-trained ResNet,
MobileNetV2, MobileNetV3 and VGG styles (``tests/trained.py``: 500 held-out digits; these need the
``torch`` extra to train and export). Metric: top-1 accuracy on the held-out images. Rows per
network, all at the same MACs target and budget:

* ``greedy``: ``prune --target-macs T --reconstruct`` (per-space ratios from one sensitivity
  sweep, cheapest loss per MAC first), under the budget;
* ``recipe:<name>``: every shipped recipe, under the budget (only ``faster-2x`` cuts MACs: the
  others say what a user who picks a recipe by hand gets);
* ``search (K workers)``: ``onnxcc search --target macs=T`` with N trials (the greedy allocation
  is its first trial), K local worker processes, 1 onnxruntime thread each;
* ``search (ray, 2 nodes)``: the same search on a two-node Ray cluster simulated on this machine
  (``ray.cluster_utils.Cluster``: a head and a second node, each its own raylet and object store
  with 1 CPU, on loopback), with trials per hour.

A last row runs a ``--full-trials`` search on the ResNet-18-size builder graph (11.7 M parameters,
224×224, random calibration images, metric: top-1 agreement with the unpruned graph) and gives its
wall time. Reported: the MACs ratio reached, the accuracy drop, the wall time and, for the
searches, finished trials per hour. A deeper cut at the same drop, or a lower drop at the same
cut, is the search's claim.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLE, CALIB, EVAL, LABELS = (str(ROOT / p) for p in ("models/sample_resnet.onnx", "models/sample_calib.npy",
                                                        "models/sample_eval.npy", "models/sample_labels.npy"))


def _row(model: str, name: str, report: dict, seconds: float, **extra) -> dict:
    b, a = report["before"], report["after"]
    return {"model": model, "variant": name, "macs_ratio": round(a["macs"] / b["macs"], 4), "drop": report["metric"]["drop_points"],
            "accuracy": report["metric"]["accuracy_after"], "seconds": round(seconds, 1), **extra}


def _networks(names, tmp: Path):
    """(name, model path, calibration .npy, eval .npy, labels .npy)."""
    for name in names:
        if name == "sample":
            yield name, SAMPLE, CALIB, EVAL, LABELS
            continue
        import torch

        torch.set_num_threads(2)
        sys.path.insert(0, str(ROOT))
        from tests.trained import digits, trained

        path, _ = trained(name)
        x_tr, _, x_cal, x_te, y_te = digits()
        files = [tmp / f"{name}_{k}.npy" for k in ("calib", "eval", "labels")]
        for f, a in zip(files, (x_cal, x_te, y_te)):
            np.save(f, a)
        yield name, str(path), *map(str, files)


def _ray_cluster(nodes: int):
    """A ``nodes``-node Ray cluster on this machine (1 CPU each), every node on loopback; returns
    (cluster, address)."""
    import os

    from onnxcc.compiler.search import RAY_LOOPBACK_ENV

    os.environ.setdefault(RAY_LOOPBACK_ENV, "0")  # before Ray is imported: nodes bind and dial 127.0.0.1
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster, cluster.address


def _search_row(model, label, path, target, trials, common, **kw):
    from onnxcc.compiler.search import search

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = search(path, target, trials=trials, study=Path(tmp) / "s.db", factorize=("svd", "spatial-svd"), **common, **kw)
        wall = time.perf_counter() - t0
    s = res.report["search"]
    done = sum(t["state"] == "COMPLETE" for t in s["trials"])
    return _row(model, label, res.report, wall, trials=done, trials_per_hour=round(3600 * done / s["seconds"], 1),
                reached=s["reached"], executor=s.get("executor"))


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="sample,resnet,mobilenet_v2,mobilenet_v3,vgg")
    ap.add_argument("--target", default="macs=0.3")
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--ray-nodes", type=int, default=2, help="simulated Ray nodes (0: no Ray row)")
    ap.add_argument("--full-trials", type=int, default=64, help="trials on the ResNet-18-size builder (0: skip)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from onnxcc.compiler.api import compile_model, shipped_recipes
    from onnxcc.compiler.errors import OnnxccError
    from onnxcc.compiler.search import parse_target

    target = parse_target(args.target)
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="onnxcc-search-bench-"))
    cluster = address = None
    if args.ray_nodes > 1:
        cluster, address = _ray_cluster(args.ray_nodes)
    try:
        for model, path, calib, data, labels in _networks([n for n in args.models.split(",") if n], tmp):
            common = dict(calibration=calib, data=data, labels=labels, budget=args.budget)
            t0 = time.perf_counter()
            greedy = compile_model(path, ["fold", ("prune", {"target_macs": target.value, "reconstruct": True}), "fold"],
                                   measure_latency=False, **common)
            rows.append(_row(model, "greedy --target-macs", greedy.report, time.perf_counter() - t0))
            print(f"# {model}: fp32 {100 * greedy.report['metric']['accuracy_before']:.2f}%", flush=True)
            for name, recipe in shipped_recipes().items():
                t0 = time.perf_counter()
                try:
                    res = compile_model(path, recipe, measure_latency=False, **common)
                    rows.append(_row(model, f"recipe:{name}", res.report, time.perf_counter() - t0))
                except OnnxccError as e:
                    rows.append({"model": model, "variant": f"recipe:{name}", "error": str(e).splitlines()[0][:90]})
            for k in (int(w) for w in args.workers.split(",") if w):
                rows.append(_search_row(model, f"search ({k} worker{'s' if k > 1 else ''})", path, target, args.trials, common, workers=k,
                                        threads=1))
            if address:
                rows.append(_search_row(model, f"search (ray, {args.ray_nodes} nodes)", path, target, args.trials, common, ray=address,
                                         workers=args.ray_nodes))
            print(f"# {model}: " + "; ".join(f"{r['variant']} {r.get('macs_ratio', '-')} / {r.get('drop', '-')}" for r in rows if r["model"] == model), flush=True)
        if args.full_trials:
            from onnxcc.compiler.ir_utils import save_model
            from onnxcc.models.builders import build

            big = tmp / "resnet18.onnx"
            save_model(build("resnet", "full", seed=0), big)
            x = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)
            np.save(tmp / "big_calib.npy", x[:8])
            np.save(tmp / "big_eval.npy", x[8:])
            common = dict(calibration=str(tmp / "big_calib.npy"), data=str(tmp / "big_eval.npy"), budget=None)
            k = int(([w for w in args.workers.split(",") if w] or ["2"])[-1])
            rows.append(_search_row("resnet18-size builder", f"search {args.full_trials} trials ({k} workers)", str(big), target,
                                    args.full_trials, common, workers=k))
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"target {args.target}, budget {args.budget} points")
    print(f"{'model':<22} {'variant':<26} {'MACs':>7} {'drop':>6} {'acc %':>7} {'s':>7} {'trials/h':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<22} {r['variant']:<26} {r['error']}")
            continue
        print(f"{r['model']:<22} {r['variant']:<26} {r['macs_ratio']:>7.3f} {r['drop']:>6.2f} {_pct(r['accuracy']):>7} {r['seconds']:>7.1f} "
              f"{r.get('trials_per_hour', ''):>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
