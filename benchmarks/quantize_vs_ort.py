"""onnxcc quantize vs onnxruntime's quantize_static, side by side in one run.

    python -m benchmarks.quantize_vs_ort [--size full] [--families resnet,mobilenet_v2] [--method minmax]
                                          [--calib 64] [--torch] [--json out.json]

Same fp32 model (the builder family, folded), same calibration data, same
method for both: onnxruntime's ``quantize_static`` in QDQ format with
per-channel int8 weights and uint8 activations (its documented CPU setting),
and ``onnxcc quantize --force-int8`` with its other defaults (plain ``quantize`` keeps a model
that INT8 is predicted to slow down in float; here the quantizers are compared), plus ``--equalize
--bias-correction`` as a second onnxcc row and the ``int8-x86`` recipe
(those and ``--speed-guard``: INT8 kept only where it measures faster than
fp32 at batch 1 and 8) as a third. Each quantizer runs in a child
process so its wall time and peak memory (VmHWM, reset at the child's start) are its own.

Reported per model: latency of each INT8 model relative to fp32 (``onnxcc
bench`` blocks, 2 threads, batch 1 and 8), SQNR and top-1 agreement with fp32
on held-out inputs, file size relative to fp32, calibration time and peak
memory, and how many heavy layers onnxruntime left in float.

Targets (issue #5): onnxcc's INT8 latency ≤ onnxruntime's on every model and
never slower than fp32; file ≤ 0.27× of fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


#: detectors whose one output stacks box coordinates (pixels) and class scores (0-1) on axis 1:
#: the row where the scores start. The whole output's SQNR is the boxes'; the scores are reported apart.
SCORE_ROWS = {"nudenet_yolov8n": 4}


def _reset_peak() -> None:
    """Reset VmHWM: ru_maxrss survives exec on Linux and would report the parent's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def file_bytes(path) -> dict[str, int]:
    """Where an INT8 file's bytes are: int8/int4 weights, per-channel (1-D) float scales, int32
    biases, float weights left (2-D and up), scalars (activation scales, zero points), the graph
    (nodes and names), the rest (header, inputs, metadata). Serialized sizes, summing to the file."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    T = onnx.TensorProto
    parts = dict.fromkeys(("int_weights", "channel_scales", "int32_biases", "float_weights", "scalars", "graph", "rest"), 0)
    for t in m.graph.initializer:
        n = len(t.SerializeToString())
        if not t.dims:
            parts["scalars"] += n
        elif t.data_type in (T.INT8, T.UINT8, T.INT4, T.UINT4) and len(t.dims) > 1:
            parts["int_weights"] += n
        elif t.data_type == T.INT32:
            parts["int32_biases"] += n
        elif len(t.dims) == 1:
            parts["channel_scales"] += n
        else:
            parts["float_weights"] += n
    parts["graph"] = sum(len(n.SerializeToString()) for n in m.graph.node)
    parts["rest"] = os.path.getsize(path) - sum(parts.values())
    return parts

def ort_quantize_static(src, dst, data: np.ndarray, input_name: str, method: str = "minmax") -> None:
    """The baseline: onnxruntime's ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations), batches of 8."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    import onnx

    dim0 = onnx.load(str(src), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    step = 1 if dim0.HasField("dim_value") and dim0.dim_value == 1 else 8  # a model of fixed batch 1 takes one at a time

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(0, len(data), step))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {input_name: data[i:i + step]}

    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[method]
    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=cm)


def _child(argv: list[str]) -> None:
    tool, src, dst, calib, method = argv[:5]
    extra = argv[5:]
    _reset_peak()
    t0 = time.perf_counter()
    if tool == "ort":
        import onnx

        ort_quantize_static(src, dst, np.load(calib), onnx.load(src, load_external_data=False).graph.input[0].name, method)
    else:
        from onnxcc.compiler.calibration import CalibrationSet
        from onnxcc.compiler.ir_utils import load_model, save_model
        from onnxcc.compiler.pipeline import Pipeline

        model = load_model(src)
        specs = []
        if "equalize" in extra:
            specs.append("equalize")
        specs.append(("quantize", {"method": method, "bias_correction": "bias-correction" in extra, "check_fusion": False,
                                   "speed_guard": "speed-guard" in extra, "reduce_range": "no-reduce-range" not in extra, "narrow_constants": "narrow" in extra,
                                   # the quantizers are compared: a model predicted slower in INT8 is quantized too
                                   "force_int8": "speed-guard" not in extra}))
        Pipeline(specs, verify=False).run(model, CalibrationSet.load(calib, model))
        save_model(model, dst)
    seconds = time.perf_counter() - t0
    peak_mb = _peak_mb()
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def _run_child(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, "-m", "benchmarks.quantize_vs_ort", "--child", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def models(size: str, families: list[str], use_torch: bool, tmp: Path, trained_models: bool = False, corpus_models: bool = False,
           tf2onnx_models: bool = False, torchvision_names: list[str] | None = None, exporters: tuple[str, ...] = ("legacy",)):
    """(label, path of the folded fp32 model) for every model of the run."""
    from onnxcc.compiler.ir_utils import load_model, save_model
    from onnxcc.compiler.pipeline import Pipeline
    from onnxcc.models.builders import build

    def folded(m, stem: str) -> Path:
        Pipeline(["fold"], verify=False).run(m)
        p = tmp / f"{stem}.onnx"
        save_model(m, p)
        return p

    for fam in families:
        yield f"builder/{fam}", folded(build(fam, size, seed=0), fam)
    if trained_models or use_torch or torchvision_names:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    if trained_models:
        from tests.trained import trained

        for name in ("resnet", "mobilenet_v2", "mobilenet_v3"):
            yield f"digits/{name}", folded(load_model(trained(name)[0]), f"digits_{name}")
    if corpus_models:
        from onnxcc.models import corpus

        for entry in corpus.ENTRIES:
            if entry.name == "ddddocr_crnn_int8" or (isinstance(corpus_models, str) and entry.name not in corpus_models.split(",")):
                continue  # already int8: quantize refuses it; or not among the models asked for
            try:
                path = corpus.fetch(entry.name)
            except corpus.CorpusUnavailable as e:
                print(f"# {entry.name} skipped: {e}", flush=True)
                continue
            yield f"corpus/{entry.name}", folded(load_model(path), f"corpus_{entry.name}")
    if tf2onnx_models:  # Keras through tf2onnx: NHWC Transposes around every conv
        from onnxcc.models import make_tf2onnx as tf

        for name, path in [("sample", tf.SAMPLE)] + list(tf.cached_apps().items()):
            yield f"tf2onnx/{name}", folded(load_model(path), f"tf2onnx_{name}")
    if use_torch:
        from tests import torch_zoo as Z

        for name in Z.ZOO:
            module, hw = Z.make(name)
            raw = Z.export(module, hw, tmp / f"torch_{name}_raw.onnx", dynamo=False, optimize=False)
            yield f"torch/{name}", folded(load_model(raw), f"torch_{name}")
    if torchvision_names:  # torchvision's own architectures, legacy and/or dynamo export, random weights
        import torch

        from tests import torchvision_zoo as TZ

        torch.set_num_threads(2)
        for name in torchvision_names:
            for exporter in exporters:
                raw = TZ.export(name, tmp / f"tv_{name}_{exporter}_raw.onnx", dynamo=exporter == "dynamo")
                tag = "" if exporter == "legacy" else f"-{exporter}"
                yield f"torchvision{tag}/{name}", folded(load_model(raw), f"tv_{name}_{exporter}")


def run(args) -> tuple[str, list[dict]]:
    from onnxcc.compiler.analysis import format_table
    from onnxcc.compiler.bench import bench_models
    from onnxcc.compiler.calibration import input_specs
    from onnxcc.compiler.ir_utils import load_model
    from onnxcc.compiler.metrics import sqnr_db
    from onnxcc.compiler.verify import compare_outputs, run_model
    from onnxcc.passes.quantization.fusion import fusion_report

    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="onnxcc-qbench-") as tmpd:
        tmp = Path(tmpd)
        for label, src in models(args.size, [f for f in args.families.split(",") if f], args.torch, tmp, args.trained, args.corpus, args.tf2onnx,
                                 [n for n in args.torchvision.split(",") if n], tuple(args.exporters.split(","))):
            fp32 = load_model(src)
            if len(input_specs(fp32)) != 1:  # e.g. Keras 3's EfficientNet: tf2onnx made its Normalization constants inputs
                print(f"# {label} skipped: {len(input_specs(fp32))} graph inputs ({', '.join(s.name for s in input_specs(fp32))}); this benchmark feeds one", flush=True)
                continue
            spec = input_specs(fp32)[0]
            rng = np.random.default_rng(0)
            calib = tmp / "calib.npy"
            labels = None
            corpus_name = label.split("/", 1)[1] if label.startswith("corpus/") else None
            shapes = None
            if corpus_name:  # rendered data preprocessed as the application does; held-out from another seed
                from onnxcc.models import corpus
                from onnxcc.models import corpus_data as cd

                np.save(calib, cd.make(corpus_name, args.calib, seed=0).inputs[spec.name])
                held = cd.make(corpus_name, 64, seed=1)
                held_out, labels = held.inputs[spec.name], held.labels
                shapes = {spec.name: (1,) + held_out.shape[1:]}
                shape = held_out.shape[1:]
            else:
                shape = tuple(spec.concrete(1))[1:]
            if corpus_name:
                pass  # data made above
            elif label.startswith("digits/"):  # real images: calibrate on training digits, test on held-out ones
                from tests.trained import digits

                x_tr, _, _, held_out, labels = digits()
                np.save(calib, x_tr[: args.calib])
            else:
                np.save(calib, rng.standard_normal((args.calib,) + shape).astype(np.float32))
                held_out = rng.standard_normal((32,) + shape).astype(np.float32)
            variants = {"ort": ("ort", []), "onnxcc": ("onnxcc", []), "onnxcc+eq+bc": ("onnxcc", ["equalize", "bias-correction"]),
                        "int8-x86": ("onnxcc", ["equalize", "bias-correction", "speed-guard", "narrow"]),  # the recipe: + speed guard
                        "onnxcc-8bit": ("onnxcc", ["no-reduce-range"]),  # 8-bit weights, as onnxruntime's quantizer writes them
                        "onnxcc-narrow": ("onnxcc", ["narrow"])}  # float16 scales / int16 biases behind Casts onnxruntime folds
            variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
            out_paths, cost = {}, {}
            for key, (tool, extra) in variants.items():
                dst = tmp / f"{Path(src).stem}_{key}.onnx"
                try:
                    # onnxruntime's quantizer gets the model as shipped: at opset < 13 it writes per-channel
                    # DequantizeLinear(axis) that the checker refuses when given the folded copy
                    given = str(corpus.fetch(corpus_name)) if tool == "ort" and corpus_name else str(src)
                    cost[key] = _run_child(tool, given, str(dst), str(calib), args.method, *extra)
                    out_paths[key] = dst
                except RuntimeError as e:
                    print(f"# {label} {key}: {e}", flush=True)
            fixed_one = spec.fixed_batch == 1
            feeds = [{spec.name: held_out[i:i + 1]} for i in range(len(held_out))] if fixed_one else [{spec.name: held_out}]
            ref = run_model(fp32, feeds)

            def score(out):
                if labels is None:
                    return None
                if corpus_name:
                    y = out[next(iter(out))]  # one feed of the whole batch: decode reads the model's own layout
                    return cd.accuracy(corpus_name, y, labels, model_path=corpus.fetch(corpus_name))
                return float((out[next(iter(out))].argmax(1) == labels).mean())

            acc32 = score(ref)
            for key in list(out_paths):  # a quantizer whose output onnxruntime refuses is a result, not a crash
                try:
                    run_model(load_model(out_paths[key]), feeds[:1])
                except Exception as e:
                    print(f"# {label} {key}: onnxruntime refuses its output: {str(e).splitlines()[0][:160]}", flush=True)
                    del out_paths[key]
            bench_list = [("fp32", src)] + [(k, p) for k, p in out_paths.items()]
            lat = {}
            for b in args.batches:
                if fixed_one and b != 1:
                    continue
                res = bench_models(bench_list, threads=args.threads, batch=b, rounds=args.rounds, block=args.block,
                                   measure_memory=False, input_shapes={k: (b,) + tuple(v[1:]) for k, v in shapes.items()} if shapes else None)
                lat[b] = {e.label: e.median_ms for e in res.entries}
            size32 = os.path.getsize(src)
            for key, p in out_paths.items():
                q = load_model(p)
                fus = fusion_report(q)
                out_q = run_model(q, feeds, optimize=True)  # as deployed: the fused integer kernels
                comp = compare_outputs(ref, out_q)
                acc = score(out_q)
                rec = {
                    "model": label, "quantizer": key, "method": args.method, "accuracy": acc, "accuracy_fp32": acc32,
                    "sqnr_db": comp.min_sqnr, "top1_agreement": comp.top1,
                    "size_ratio": os.path.getsize(p) / size32,
                    "calib_seconds": cost[key]["seconds"], "calib_peak_mb": cost[key]["peak_mb"],
                    "float_heavy": len(fus["float_heavy"]), "leftover_qdq": fus["quantize_linear"] + fus["dequantize_linear"],
                }
                if corpus_name in SCORE_ROWS:  # a detector's class scores, apart from its box coordinates
                    first = SCORE_ROWS[corpus_name]
                    k = next(iter(ref))
                    rec["scores_sqnr_db"] = sqnr_db(ref[k][:, first:], out_q[k][:, first:])
                    print(f"# {label} {key}: class scores SQNR {rec['scores_sqnr_db']:.2f} dB (all outputs {comp.min_sqnr:.2f})", flush=True)
                if args.bytes:  # each part as a fraction of the fp32 file
                    rec["bytes"] = {k: v / size32 for k, v in file_bytes(p).items()}
                    print(f"# {label} {key} file / fp32: " + ", ".join(f"{k} {v:.4f}" for k, v in rec["bytes"].items()), flush=True)
                top1 = f"{comp.top1:.3f}" if comp.top1 is not None else "-"
                if acc is not None:
                    top1 = f"acc {100 * acc:.1f} ({100 * (acc - acc32):+.1f})"
                row = [label, key, f"{comp.min_sqnr:.1f}", top1, f"{rec['size_ratio']:.3f}"]
                for b in args.batches:
                    if b not in lat:
                        row.append("-")
                        continue
                    r = lat[b][key] / lat[b]["fp32"]
                    rec[f"latency_ratio_b{b}"] = r
                    rec[f"fp32_ms_b{b}"] = lat[b]["fp32"]
                    row.append(f"{r:.3f}")
                row += [f"{cost[key]['seconds']:.1f}", f"{cost[key]['peak_mb']:.0f}", str(rec["float_heavy"]), str(rec["leftover_qdq"])]
                rows.append(row)
                records.append(rec)
            print(f"# {label} done", flush=True)
    header = ["model", "quantizer", "SQNR dB", "top-1 agr / acc", "file"] + [f"lat b{b}" for b in args.batches] + ["calib s", "peak MB", "float layers", "Q/DQ left"]
    return format_table(rows, header), records


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":
        _child(argv[1:])
        return
    from onnxcc.models.builders import FAMILIES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", choices=["tiny", "small", "full"])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--method", default="minmax", choices=["minmax", "percentile", "entropy"])
    ap.add_argument("--calib", type=int, default=64, help="calibration samples")
    ap.add_argument("--torch", action="store_true", help="also the torch zoo networks (legacy export)")
    ap.add_argument("--trained", action="store_true", help="also the digits-trained CNNs (accuracy on 500 held-out images)")
    ap.add_argument("--variants", default="ort,onnxcc,onnxcc+eq+bc,int8-x86", help="which quantizers to run (also onnxcc-8bit: 8-bit weights; onnxcc-narrow: --narrow-constants)")
    ap.add_argument("--corpus", nargs="?", const=True, default=False,
                    help="also the real-model corpus (models/corpus.py; accuracy on 64 rendered held-out samples); NAMES: only these (comma-separated)")
    ap.add_argument("--tf2onnx", action="store_true", help="also Keras models through tf2onnx (the sample; the Keras applications once models/make_tf2onnx.py cached them)")
    ap.add_argument("--exporters", default="legacy", help="torch exporters for --torchvision: legacy, dynamo or legacy,dynamo")
    ap.add_argument("--torchvision", default="", help="also these torchvision architectures (tests/torchvision_zoo.py: ssdlite320, mobilenet_v3_large, ...; random weights)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--block", type=int, default=8)
    ap.add_argument("--bytes", action="store_true", help="also where each INT8 file's bytes are (weights, scales, biases, graph...)")
    ap.add_argument("--json", dest="json_path")
    a = ap.parse_args(argv)
    table, records = run(a)
    print(f"size={a.size}, method={a.method}, {a.calib} calibration samples, threads={a.threads}; latency and file are INT8/fp32; SQNR and top-1 agreement vs fp32 on 32 held-out inputs")
    print(table)
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
