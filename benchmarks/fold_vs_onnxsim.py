"""onnxcc fold vs onnxsim and onnxslim: node counts and agreement, in one run.

    python -m benchmarks.fold_vs_onnxsim [--size small] [--no-torch] [--corpus] [--torchvision] [--no-builders]

Models: every builder family (with BatchNorm unfolded, as frameworks export
them); with the torch extra, every torch zoo network exported raw by both
exporters; with ``--corpus``, the real trained models of models/corpus.py
(PaddleOCR, ddddocr, YOLOv8n...) and Keras models through tf2onnx (the
committed sample and, once ``python -m onnxcc.models.make_tf2onnx apps`` has
cached them, Keras MobileNetV2/V3-Small, ResNet-50 and EfficientNet-B0); with ``--torchvision``,
torchvision's own ShuffleNetV2, MobileNetV3-Large, ConvNeXt-Tiny, LR-ASPP and DeepLabV3 (MobileNetV3)
and SSDlite320 (backbone and head), exported raw by both exporters (tests/torchvision_zoo.py; random
weights, no download). For each: nodes in the input, after onnxsim,
after onnxslim, after onnxcc fold; max relative error of each against the input
in onnxruntime (random inputs); time of each tool; and whether each kept the
input's dynamic axes. onnxsim and onnxslim get the concrete input shape (that
is how they are used on dynamic models, and onnxsim fixes those axes); onnxcc
keeps every dynamic axis dynamic. Target (issue #17): onnxcc's node count at
most the smaller of the two, with dynamic axes kept. The last column folds the model with the
same fixed input shapes written into it, like for like with onnxsim: a difference left there is
fold's, one that goes away there is what keeping the axes dynamic costs (YOLOv8n's anchor grid is
computed from the input's H and W).
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


def corpus_set():
    from onnxcc.models import corpus

    for entry in corpus.ENTRIES:
        try:
            path = corpus.fetch(entry.name)
        except corpus.CorpusUnavailable as e:
            print(f"{entry.name}: skipped ({e})", file=sys.stderr)
            continue
        model = load_model(path)
        yield f"corpus/{entry.name}", model, {model.graph.inputs[0].name: entry.shape}
    yield from tf2onnx_set()


def tf2onnx_set():
    """tf2onnx's output for Keras: the committed sample and the Keras applications exported into
    the cache by ``python -m onnxcc.models.make_tf2onnx apps`` (needs TensorFlow; none without it)."""
    from onnxcc.models import make_tf2onnx as tf

    for label, path, hw in [("sample", tf.SAMPLE, 32)] + [(n, p, 224) for n, p in tf.cached_apps().items()]:
        model = load_model(path)
        yield f"tf2onnx/{label}", model, {model.graph.inputs[0].name: (1, hw, hw, 3)}


def torchvision_set(tmp: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests import torchvision_zoo as TZ

    for name in TZ.NAMES:
        hw = TZ.make(name)[1]
        for dyn in (False, True):
            tag = "dynamo" if dyn else "legacy"
            model = load_model(TZ.export(name, tmp / f"tv_{name}_{tag}.onnx", dynamo=dyn))
            yield f"torchvision-{tag}/{name}", model, {model.graph.inputs[0].name: (1, 3, hw, hw)}


def _dynamic_axes(model: ir.Model) -> list[tuple[str, int]]:
    return [(v.name, i) for v in model.graph.inputs if v.shape is not None
            for i, d in enumerate(v.shape.dims) if not (isinstance(d, int) and d >= 0)]


def _count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def _tool(label: str, fn, model: ir.Model, feeds, ref):
    """(nodes, rel. error, seconds, dynamic axes kept) for one tool, or a failure line."""
    t0 = time.perf_counter()
    try:
        out = fn(model)
    except Exception as e:  # a baseline that fails on a model is a result too
        print(f"  {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}", file=sys.stderr)
        return None
    secs = time.perf_counter() - t0
    try:
        err = compare_outputs(ref, run_model(out, feeds)).max_rel
    except Exception as e:
        print(f"  {label}: onnxruntime cannot run its output: {str(e).splitlines()[0][:120]}", file=sys.stderr)
        err = float("nan")
    return _count(out), err, secs, _dynamic_axes(out) == _dynamic_axes(model)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "full"])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-builders", action="store_true", help="skip the builder and torch models")
    ap.add_argument("--corpus", action="store_true", help="also the real-model corpus (models/corpus.py)")
    ap.add_argument("--torchvision", action="store_true", help="also torchvision's architectures, both exporters (tests/torchvision_zoo.py)")
    args = ap.parse_args()
    if args.torchvision:
        import torch

        torch.set_num_threads(2)
    import onnxsim

    try:
        import onnxslim
    except ImportError:  # benchmark-only dependency (the bench extra)
        onnxslim = None
        print("onnxslim not installed: its column is empty", file=sys.stderr)

    def models(tmp: Path):
        if not args.no_builders:
            for label, model in model_set(args.size, not args.no_torch, tmp):
                yield label, model, {}
        if args.corpus:
            yield from corpus_set()
        if args.torchvision:
            yield from torchvision_set(tmp)

    rows, worse = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for label, model, shapes in models(Path(tmp)):
            feeds = random_inputs(input_specs(model), batch=1 if shapes else 4, seed=0, overrides=shapes)
            ref = run_model(model, feeds)

            def sim(m):
                proto, _ = onnxsim.simplify(ir.to_proto(m), overwrite_input_shapes=dict(shapes) or None)
                return ir.serde.deserialize_model(proto)

            def slim(m):
                if onnxslim is None:
                    raise RuntimeError("not installed")
                return ir.serde.deserialize_model(onnxslim.slim(ir.to_proto(m), input_shapes=[f"{k}:{','.join(map(str, v))}" for k, v in shapes.items()] or None))

            def fold(m):
                ours = clone_model(m)
                Pipeline(["fold"], verify=False).run(ours)
                onnx.checker.check_model(ir.to_proto(ours))
                return ours

            def fold_fixed(m):  # like for like: the input shapes onnxsim and onnxslim were given, written into the model
                fixed = clone_model(m)
                for v in fixed.graph.inputs:
                    if v.name in shapes:
                        v.shape = ir.Shape(list(shapes[v.name]))
                return fold(fixed)

            tools = (("onnxsim", sim), ("onnxslim", slim), ("onnxcc", fold)) + ((("cc fixed", fold_fixed),) if shapes else ())
            res = {name: _tool(name, fn, model, feeds, ref) for name, fn in tools}
            fixed_nodes = res.pop("cc fixed", None)
            best_peer = min((r[0] for k, r in res.items() if r is not None and k != "onnxcc"), default=None)
            ours = res["onnxcc"]
            ok = ours is not None and ours[3] and (best_peer is None or ours[0] <= best_peer)
            worse += not ok

            def cell(r, i, fmt="{}"):
                return "-" if r is None else fmt.format(r[i])

            rows.append([label, _count(model)] + [cell(res[k], 0) for k in res]
                        + [cell(res[k], 1, "{:.1e}") for k in res] + [cell(res[k], 2, "{:.2f}") for k in res]
                        + ["/".join("y" if r is not None and r[3] else "n" for r in res.values()), "yes" if ok else "NO",
                           cell(fixed_nodes, 0) if shapes else "-"])
    print(format_table(rows, ["model", "nodes in", "onnxsim", "onnxslim", "onnxcc", "err sim", "err slim", "err cc",
                              "s sim", "s slim", "s cc", "dyn kept sim/slim/cc", "onnxcc<=both", "cc at the fixed shape"]))
    print(f"\n{len(rows) - worse}/{len(rows)} models with onnxcc nodes <= the smaller of onnxsim and onnxslim, dynamic axes kept")
    return 0 if worse == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
