"""Pruning depth and speed against Torch-Pruning, side by side on the same networks.

    python -m benchmarks.prune_vs_torch_pruning [--names densenet,convnext] [--ratio 0.5] [--json out.json]

Each torch zoo network (tests/torch_zoo.py: ResNet, MobileNet, EfficientNet,
DenseNet, Inception, RegNet-style, ShuffleNet, ConvNeXt, VGG styles) is pruned
at one uniform channel ratio with the L1 criterion twice:

- by Torch-Pruning (``MagnitudePruner``, p=1, the classifier's output layer
  ignored) on the torch module, then exported;
- by ``onnxcc prune --ratio R`` on the module's ONNX export, from the legacy
  and from the dynamo exporter.

MACs and parameters of all of them are counted by the same counter
(``compiler.analysis.analyze`` on the folded ONNX graph), relative to the fp32
model, and the three are timed side by side with the fp32 model
(``compiler.bench.bench_models``: alternating blocks, 2 threads, batch 8).
Torch-Pruning is a benchmark-only dependency (``pip install torch-pruning``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(names, ratio, threads, batch, rounds):
    import torch
    import torch.nn as nn
    import torch_pruning as tp

    sys.path.insert(0, str(ROOT))
    from onnxcc.compiler.analysis import analyze, format_table
    from onnxcc.compiler.bench import bench_models
    from onnxcc.compiler.ir_utils import clone_model, load_model
    from onnxcc.compiler.pipeline import Pipeline
    from tests import torch_zoo as Z

    torch.set_num_threads(threads)
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="onnxcc-tp-") as tmpd:
        tmp = Path(tmpd)

        def folded(path):
            m = load_model(path)
            Pipeline(["fold"], verify=False).run(m)
            return m

        for name in names:
            module, hw = Z.make(name)
            base = folded(Z.export(module, hw, tmp / f"{name}.onnx", dynamo=False, optimize=False))
            b = analyze(base, stats=False)
            variants = [("fp32", base)]
            rec = {"model": name, "ratio": ratio}
            # Torch-Pruning on the module
            x = torch.randn(1, 3, hw, hw)
            ignored = [m for m in module.modules() if isinstance(m, nn.Linear) and m.out_features == 10]
            try:
                tp.pruner.MagnitudePruner(module, x, importance=tp.importance.MagnitudeImportance(p=1),
                                          pruning_ratio=ratio, ignored_layers=ignored).step()
                variants.append(("torch-pruning", folded(Z.export(module, hw, tmp / f"{name}_tp.onnx", dynamo=False, optimize=False))))
            except Exception as e:  # Torch-Pruning cannot trace channel shuffles (view + transpose)
                rec["torch-pruning"] = f"fails: {type(e).__name__}"
            # onnxcc on each exporter's graph
            for dynamo in (False, True):
                key = "onnxcc-dynamo" if dynamo else "onnxcc-legacy"
                m2, _ = Z.make(name)
                g = base if not dynamo else folded(Z.export(m2, hw, tmp / f"{name}_d.onnx", dynamo=True, optimize=False))
                g = clone_model(g)
                Pipeline([("prune", {"ratio": ratio})], verify=False).run(g)
                variants.append((key, g))
            lat = {e.label: e.median_ms for e in bench_models(variants, threads=threads, batch=batch, rounds=rounds, measure_memory=False).entries}
            row = [name]
            for label, m in variants[1:]:
                a = analyze(m, stats=False)
                rec[label] = {"macs_ratio": a.macs / b.macs, "params_ratio": a.params / b.params, "latency_ratio": lat[label] / lat["fp32"]}
            for key in ("torch-pruning", "onnxcc-legacy", "onnxcc-dynamo"):
                v = rec.get(key, "-")
                row.append(v if isinstance(v, str) else f"{v['macs_ratio']:.3f} / {v['params_ratio']:.3f} / {v['latency_ratio']:.2f}")
            rows.append(row)
            records.append(rec)
            print(f"# {name} done", flush=True)
    header = ["model", "Torch-Pruning MACs / params / latency", "onnxcc (legacy export)", "onnxcc (dynamo export)"]
    return format_table(rows, header), records


def main(argv=None) -> None:
    sys.path.insert(0, str(ROOT))
    from tests import torch_zoo as Z

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", default=",".join(Z.ZOO))
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    table, records = run([n for n in args.names.split(",") if n], args.ratio, args.threads, args.batch, args.rounds)
    print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
