"""Storage compression: file size, zipped size, latency and accuracy at each stage of the compress pipeline.

    python -m benchmarks.storage [--no-trained] [--size small] [--json out.json]

Stages (each applied on top of the previous one): fp32 → sparsify 0.6 (2 steps,
masked least-squares refit) → 4-bit codebook, or → INT8 QDQ (activations too)
→ 4-bit codebook of the int8 weights; beside them INT8 weight-only,
and binary / ternary weights (no fine-tuning: the accuracy cost is reported as
measured). Models: the digits-trained ResNet-, VGG- and MobileNetV2-style
networks (accuracy on 500 held-out images; torch extra) and the builder
ResNet/VGG (random weights: top-1 agreement with fp32). Latency is one
``bench_models`` run per model (2 threads, batch 1), ratios to fp32.

Issue #7's target: ≥ 10× smaller zipped file than fp32 at ≤ 1 point top-1
drop on a trained model, latency no worse than fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run(args):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from onnxcc.compiler.analysis import format_table
    from onnxcc.compiler.bench import bench_models
    from onnxcc.compiler.calibration import CalibrationSet, input_specs, random_inputs
    from onnxcc.compiler.ir_utils import clone_model, load_model
    from onnxcc.compiler.pipeline import Pipeline
    from onnxcc.compiler.verify import compare_outputs, run_model
    from onnxcc.models.builders import build
    from onnxcc.passes.compression.common import storage_sizes

    models = []
    if not args.no_trained:
        from tests.trained import digits, trained

        x_tr, _, _, x_te, y_te = digits()
        for name in ("resnet", "vgg", "mobilenet_v2"):
            m = load_model(trained(name)[0])
            Pipeline(["fold"], verify=False).run(m)
            models.append((f"digits-{name}", m, CalibrationSet({"input": x_tr[:512]}), {"input": x_te}, y_te))
    for fam in ("resnet", "vgg"):
        m = build(fam, args.size, seed=0)
        Pipeline(["fold"], verify=False).run(m)
        models.append((f"{fam}-{args.size}", m, CalibrationSet(random_inputs(input_specs(m), batch=64, seed=1)[0]), random_inputs(input_specs(m), batch=64, seed=2)[0], None))

    rows, records = [], []
    for label, base, calib, evalx, labels in models:
        ref = run_model(base, [evalx])
        variants = [("fp32", base)]
        sp = clone_model(base)
        Pipeline([("sparsify", {"sparsity": 0.6, "reconstruct": True, "steps": 2, "min_size": 256})], verify=False).run(sp, calib)
        variants.append(("sparsify 0.6", sp))
        cb = clone_model(sp)
        Pipeline([("codebook", {"bits": 4, "min_size": 256})], verify=False).run(cb)
        variants.append(("+ codebook 4b", cb))
        qb = clone_model(sp)
        Pipeline([("quantize", {"bias_correction": True, "force_int8": True}), ("codebook", {"bits": 4, "min_size": 256})], verify=False).run(qb, calib)
        variants.append(("+ INT8 + codebook 4b", qb))
        for dtype in ("int8", "ternary", "binary"):
            w = clone_model(base)
            Pipeline([("weight-only", {"dtype": dtype, "min_size": 256})], verify=False).run(w)
            variants.append((f"weight-only {dtype}", w))
        res = bench_models(variants, threads=2, batch=1, rounds=args.rounds, block=10, measure_memory=False)
        lat = {e.label: e.ratio for e in res.entries}
        z0 = storage_sizes(base)["zipped_bytes"]
        for name, m in variants:
            sizes = storage_sizes(m)
            c = compare_outputs(ref, run_model(m, [evalx]), labels)
            q = f"{100 * c.accuracy_cand:.1f}%" if labels is not None else f"agree {100 * c.outputs[0].top1:.0f}%"
            rec = {"model": label, "variant": name, **sizes, "zipped_ratio": z0 / sizes["zipped_bytes"], "latency_ratio": lat[name], "quality": q}
            records.append(rec)
            rows.append([label, name, f"{sizes['bytes'] / 1e6:.2f}", f"{sizes['zipped_bytes'] / 1e6:.3f}", f"{rec['zipped_ratio']:.1f}x", f"{lat[name]:.2f}", q])
        print(f"done {label}", file=sys.stderr, flush=True)
    print(format_table(rows, ["model", "stage", "MB", "zipped MB", "smaller (zip)", "latency", "accuracy / agreement"]))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=["tiny", "small", "full"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-trained", action="store_true")
    ap.add_argument("--json")
    run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
