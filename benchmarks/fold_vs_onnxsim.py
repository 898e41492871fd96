"""onnxcc fold vs onnxsim: node counts and agreement on the benchmark model set, in one run.

    python -m benchmarks.fold_vs_onnxsim [--size small] [--no-torch]

Models: every builder family (with BatchNorm unfolded, as frameworks export
them) and, with the torch extra, every torch zoo network exported raw by both
exporters. For each: nodes in the input, after onnxsim, after onnxcc fold;
max relative error of each against the input in onnxruntime (random inputs,
batch 4); time of each tool. Target (issue #2): onnxcc's node count ≤ onnxsim's
on every model, and agreement at float rounding.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import onnx
import onnx_ir as ir

from onnxcc.compiler.analysis import format_table
from onnxcc.compiler.calibration import input_specs, random_inputs
from onnxcc.compiler.ir_utils import clone_model, load_model
from onnxcc.compiler.pipeline import Pipeline
from onnxcc.compiler.verify import compare_outputs, run_model


def model_set(size: str, use_torch: bool, tmp: Path):
    from onnxcc.models.builders import FAMILIES, build

    for fam in FAMILIES:
        yield f"builder/{fam}", build(fam, size)
    if not use_torch:
        return
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests import torch_zoo as Z
    except ImportError:
        print("torch not installed: torch exports skipped", file=sys.stderr)
        return
    for name in Z.ZOO:
        module, hw = Z.make(name)
        for dyn in (False, True):
            tag = "dynamo" if dyn else "legacy"
            p = Z.export(module, hw, tmp / f"{name}_{tag}.onnx", dynamo=dyn, optimize=False)
            yield f"torch-{tag}/{name}", load_model(p)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "full"])
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    import onnxsim

    rows, worse = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in model_set(args.size, not args.no_torch, Path(tmp)):
            feeds = random_inputs(input_specs(model), batch=4, seed=0)
            ref = run_model(model, feeds)
            n_in = sum(1 for _ in model.graph.all_nodes())

            t0 = time.perf_counter()
            sim_proto, ok = onnxsim.simplify(ir.to_proto(model))
            t_sim = time.perf_counter() - t0
            sim = ir.serde.deserialize_model(sim_proto)
            n_sim = sum(1 for _ in sim.graph.all_nodes())
            e_sim = compare_outputs(ref, run_model(sim, feeds)).max_rel

            ours = clone_model(model)
            t0 = time.perf_counter()
            Pipeline(["fold"], verify=False).run(ours)
            t_ours = time.perf_counter() - t0
            n_ours = sum(1 for _ in ours.graph.all_nodes())
            e_ours = compare_outputs(ref, run_model(ours, feeds)).max_rel
            onnx.checker.check_model(ir.to_proto(ours))
            worse += n_ours > n_sim
            rows.append([label, n_in, n_sim, n_ours, f"{e_sim:.1e}", f"{e_ours:.1e}", f"{t_sim:.2f}", f"{t_ours:.2f}",
                         "yes" if n_ours <= n_sim else "NO"])
    print(format_table(rows, ["model", "nodes in", "onnxsim", "onnxcc", "rel.err onnxsim", "rel.err onnxcc", "s onnxsim", "s onnxcc", "onnxcc<=onnxsim"]))
    print(f"\n{len(rows) - worse}/{len(rows)} models with onnxcc nodes <= onnxsim nodes")
    return 0 if worse == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
