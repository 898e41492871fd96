"""Training-free accuracy recovery after channel pruning, measured on trained networks.

    python -m benchmarks.recovery [--builders resnet,mobilenet_v2] [--size full] [--json out.json]

Models: the digits-trained ResNet- and MobileNetV2-style CNNs (scikit-learn's
8×8 digits, trained in seconds under the torch extra; metric: top-1 accuracy
on 500 held-out images) and, with ``--builders``, full-size builder models
(random weights; metric: top-1 agreement and SQNR against the unpruned model,
since their accuracy means nothing).

Variants, all at about half the MACs:

* ``l1``: uniform L1 pruning at ratio 0.3 (≈ 0.5× MACs), no recovery;
* ``l1+recon``: the same channels, then least-squares reconstruction;
* ``lsq-criterion+recon``: channels chosen by the ``reconstruction`` criterion (what least squares can
  best absorb), then reconstruction;
* ``auto+recon``: per-space ratios from sensitivity for ``--target-macs 0.5``, reconstruction;
* ``progressive``: ratio 0.3 reached in 3 steps, reconstructing after each.

Issue #4's targets: at 50% MACs, top-1 drop ≤ 1 point with reconstruction on
the trained models, and reconstruction halves plain pruning's drop at least.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {
    "l1": {"ratio": 0.3, "compensate": False},
    "l1+recon": {"ratio": 0.3, "reconstruct": True},
    "lsq-criterion+recon": {"ratio": 0.3, "criterion": "reconstruction", "reconstruct": True},
    "auto+recon": {"target_macs": 0.5, "reconstruct": True, "sensitivity_ratios": (0.2, 0.4, 0.6)},
    "progressive": {"ratio": 0.3, "steps": 3, "reconstruct": True},
}


def _top1(model, x):
    from onnxcc.compiler.verify import run_model

    out = run_model(model, [{"input": x}])
    logits = out[next(iter(out))] if isinstance(out, dict) else out[0]
    return logits


def run(args):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from onnxcc.compiler.analysis import analyze, format_table
    from onnxcc.compiler.calibration import CalibrationSet
    from onnxcc.compiler.ir_utils import clone_model, load_model
    from onnxcc.compiler.pipeline import Pipeline
    from onnxcc.compiler.verify import compare_outputs, run_model
    from onnxcc.models.builders import build

    rows, records = [], []

    def evaluate(label, model, calib, x_eval, y_eval, samples):
        base_macs = analyze(model, stats=False).macs
        ref_logits = _top1(model, x_eval)
        base_acc = float((ref_logits.argmax(1) == y_eval).mean()) if y_eval is not None else None
        for name, opts in VARIANTS.items():
            m = clone_model(model)
            t0 = time.perf_counter()
            Pipeline([("prune", {**opts, "calib_samples": samples})], verify=False).run(m, calib)
            secs = time.perf_counter() - t0
            logits = _top1(m, x_eval)
            macs = analyze(m, stats=False).macs / base_macs
            comp = compare_outputs({"y": ref_logits}, {"y": logits})
            rec = {"model": label, "variant": name, "macs_ratio": macs, "seconds": secs, "sqnr_db": comp.min_sqnr, "agreement": comp.top1}
            if y_eval is not None:
                acc = float((logits.argmax(1) == y_eval).mean())
                rec.update(accuracy=acc, base_accuracy=base_acc, drop_points=100 * (base_acc - acc))
                metric = f"{100 * acc:.1f}% ({100 * (base_acc - acc):+.1f})".replace("(+", "(-").replace("(--", "(+")
            else:
                metric = f"agree {100 * comp.top1:.1f}%, {comp.min_sqnr:.1f} dB"
            rows.append([label, name, f"{macs:.3f}", metric, f"{secs:.1f}"])
            records.append(rec)
            print(f"# {label} {name}: {metric} in {secs:.1f}s", flush=True)

    if not args.no_trained:
        from tests.trained import digits, trained

        x_tr, _, _, x_te, y_te = digits()
        calib = CalibrationSet({"input": x_tr[: args.samples]})
        for name in ("resnet", "mobilenet_v2"):
            path, _ = trained(name)
            model = load_model(path)
            Pipeline(["fold"], verify=False).run(model)
            base = float((_top1(model, x_te).argmax(1) == y_te).mean())
            rows.append([f"digits/{name}", "fp32", "1.000", f"{100 * base:.1f}%", "-"])
            evaluate(f"digits/{name}", model, calib, x_te, y_te, args.samples)
    for fam in filter(None, args.builders.split(",")):
        model = build(fam, args.size, seed=0)
        Pipeline(["fold"], verify=False).run(model)
        hw = model.graph.inputs[0].shape[2]
        rng = np.random.default_rng(0)
        calib = CalibrationSet({"input": rng.standard_normal((args.builder_samples, 3, hw, hw)).astype(np.float32)})
        x_eval = rng.standard_normal((32, 3, hw, hw)).astype(np.float32)
        evaluate(f"builder/{fam}", model, calib, x_eval, None, args.builder_samples)
    del run_model
    return format_table(rows, ["model", "variant", "MACs", "top-1 (drop, points)", "seconds"]), records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512, help="calibration samples (digits training split)")
    ap.add_argument("--builders", default="", help="comma-separated builder families to add (agreement metric)")
    ap.add_argument("--size", default="small", choices=["tiny", "small", "full"])
    ap.add_argument("--builder-samples", type=int, default=32)
    ap.add_argument("--no-trained", action="store_true")
    ap.add_argument("--json", dest="json_path")
    a = ap.parse_args(argv)
    table, records = run(a)
    print("metric: top-1 accuracy on 500 held-out digits (trained models), agreement/SQNR vs unpruned (builders)")
    print(table)
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
