"""Does structured pruning make models faster? MACs cut vs latency cut, measured side by side.

    python -m benchmarks.prune_speed [--size full] [--families resnet,vgg] [--ratios 0.3,0.5] [--json out.json]

For each builder family (full size: 224×224, torchvision widths) the folded
fp32 model and its pruned versions (criterion l1, uniform ratio per channel
space, kept channel counts rounded to a multiple of 16, the NCHWc block size of onnxruntime's CPU kernels on AVX-512) are timed in one process with :func:`compiler.bench.bench_models`
(alternating blocks, 2 threads, batch 1 and batch 8). Reported per ratio:
MACs, parameters and file size relative to the fp32 model, the latency ratio,
and the *realisation* ``(1 − latency ratio) / (1 − MACs ratio)``: the share of
the MACs cut that shows up as time saved.

Issue #3's targets: realisation ≥ 0.9 on ResNet- and VGG-style models and
≥ 0.7 on every family.
"""

from __future__ import annotations

import argparse
import json
import time

from onnxcc.compiler.analysis import analyze, format_table
from onnxcc.compiler.bench import bench_models
from onnxcc.compiler.ir_utils import clone_model, model_nbytes
from onnxcc.compiler.pipeline import Pipeline


def run(families, ratios, size, threads, batches, rounds, block, round_to=16):
    from onnxcc.models.builders import build

    rows, records = [], []
    for fam in families:
        t0 = time.perf_counter()
        base = build(fam, size, seed=0)
        Pipeline(["fold"], verify=False).run(base)
        variants = [("fp32", base)]
        for r in ratios:
            m = clone_model(base)
            Pipeline([("prune", {"ratio": r, "round_to": round_to})], verify=False).run(m)
            variants.append((f"prune {r}", m))
        stats = {label: analyze(m, stats=False) for label, m in variants}
        sizes = {label: model_nbytes(m) for label, m in variants}
        lat = {}
        for b in batches:
            res = bench_models(variants, threads=threads, batch=b, rounds=rounds, block=block, measure_memory=False)
            lat[b] = {e.label: e for e in res.entries}
        for label, _ in variants[1:]:
            macs = stats[label].macs / stats["fp32"].macs
            rec = {
                "family": fam, "variant": label, "macs_ratio": macs,
                "params_ratio": stats[label].params / stats["fp32"].params,
                "size_ratio": sizes[label] / sizes["fp32"],
            }
            row = [fam, label, f"{macs:.3f}", f"{rec['params_ratio']:.3f}", f"{rec['size_ratio']:.3f}"]
            for b in batches:
                lr = lat[b][label].median_ms / lat[b]["fp32"].median_ms
                real = (1 - lr) / (1 - macs) if macs < 1 else float("nan")
                rec[f"latency_ratio_b{b}"] = lr
                rec[f"realisation_b{b}"] = real
                rec[f"fp32_ms_b{b}"] = lat[b]["fp32"].median_ms
                row += [f"{lat[b]['fp32'].median_ms:.1f}", f"{lr:.3f}", f"{real:.2f}"]
            rows.append(row)
            records.append(rec)
        print(f"# {fam}: {time.perf_counter() - t0:.0f}s", flush=True)
    header = ["family", "variant", "MACs", "params", "file"]
    for b in batches:
        header += [f"fp32 ms b{b}", f"latency b{b}", f"realised b{b}"]
    return format_table(rows, header), records


def main(argv=None) -> None:
    from onnxcc.models.builders import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="full", choices=["tiny", "small", "full"])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--round-to", type=int, default=16, help="kept channel counts a multiple of this (MLAS NCHWc block: 16 with AVX-512, 8 with AVX2)")
    ap.add_argument("--json", dest="json_path")
    a = ap.parse_args(argv)
    table, records = run(
        a.families.split(","), [float(r) for r in a.ratios.split(",")], a.size, a.threads,
        [int(b) for b in a.batches.split(",")], a.rounds, a.block, a.round_to,
    )
    print(f"size={a.size}, threads={a.threads}, criterion=l1, round_to={a.round_to}, ratios are pruned/fp32; realised = (1 - latency ratio) / (1 - MACs ratio)")
    print(table)
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
