"""The torch bridge against onnx2torch on the graphs onnxcc handles (why the bridge is written by hand).

    python -m benchmarks.bridge_coverage [--json out.json]

For each graph — both torch exporters' output (legacy, dynamo) of a MobileNetV3-style network, the
tf2onnx sample, the quantize pass's QDQ output, and every real model of the corpus (paddle2onnx
opset 11/12 with Constant weights, torch 1.x CRNNs with LSTMs, YOLO, an already-int8 model) — it
reports for onnx2torch and for ``onnxcc.passes.training.bridge``: whether it converts, the largest
output difference to onnxruntime relative to the output's scale, and how many trainable tensors it
exposes that map back to a named initializer or Constant of the graph (what write-back needs).
onnx2torch is a benchmark-only dependency (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _graphs(tmp: Path):
    sys.path.insert(0, str(ROOT))
    from onnxcc.compiler.calibration import CalibrationSet
    from onnxcc.compiler.ir_utils import load_model, save_model
    from onnxcc.compiler.pipeline import Pipeline
    from onnxcc.models import corpus
    from onnxcc.models import corpus_data as cd
    from tests.torch_zoo import export, make

    for dynamo in (False, True):
        net, hw = make("mobilenet_v3")
        p = export(net.eval(), hw, tmp / f"mnv3_{dynamo}.onnx", dynamo=dynamo, optimize=False)
        yield f"torch {'dynamo' if dynamo else 'legacy'} MobileNetV3", p, {"input": np.random.default_rng(0).standard_normal((2, 3, hw, hw)).astype(np.float32)}
    yield "tf2onnx Keras MobileNetV3 (sample)", ROOT / "models" / "tf2onnx_mnv3_tiny.onnx", None
    m = load_model(ROOT / "models" / "sample_resnet.onnx")
    x = np.load(ROOT / "models" / "sample_calib.npy")
    Pipeline(["fold", ("quantize", {"force_int8": True})], verify=False).run(m, CalibrationSet({m.graph.inputs[0].name: x}))
    save_model(m, tmp / "qdq.onnx")
    yield "onnxcc QDQ (quantize pass)", tmp / "qdq.onnx", {m.graph.inputs[0].name: x[:2]}
    for e in corpus.ENTRIES:
        try:
            path = corpus.fetch(e.name)
        except corpus.CorpusUnavailable:
            continue
        data = cd.make(e.name, 2).inputs
        single = "det" in e.name or "dddd" in e.name
        yield f"{e.name} ({e.exporter})", path, {k: v[:1] if single else v for k, v in data.items()}


def _feeds(path, feeds):
    if feeds is not None:
        return feeds
    from onnxcc.compiler.calibration import input_specs, random_inputs
    from onnxcc.compiler.ir_utils import load_model

    return random_inputs(input_specs(load_model(path)), 1, seed=0, batch=2)[0]


def _import_onnx2torch():
    """onnx2torch's ``convert``. onnx2torch imports torchvision for its NonMaxSuppression and
    RoiAlign converters only; PyPI's torchvision cannot load beside the CPU torch build this
    machine installs ("operator torchvision::nms does not exist"), which would make every row
    fail for a reason that is not onnx2torch's. Then a stand-in torchvision whose ops raise is
    put in its place (no graph here has NMS or RoiAlign) and the table says so."""
    import importlib
    import sys
    import types

    try:
        import torchvision  # noqa: F401
        stand_in = False
    except Exception:  # noqa: BLE001 (any import failure of the compiled extension)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]

        def missing(*_a, **_k):
            raise NotImplementedError("torchvision is not importable here (stand-in)")

        tv = types.ModuleType("torchvision")
        tv.ops = types.ModuleType("torchvision.ops")
        tv.ops.nms = tv.ops.roi_align = tv.ops.box_convert = missing
        sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, tv.ops
        stand_in = True
    return importlib.import_module("onnx2torch").convert, stand_in


def _rel(out, ref) -> float:
    return max(float(np.abs(np.asarray(o, np.float64) - r).max()) / (float(np.abs(r).max()) or 1.0) for o, r in zip(out, ref))


def run():
    import onnx
    import torch

    torch.set_num_threads(2)
    from onnxcc.compiler.analysis import format_table
    from onnxcc.compiler.ir_utils import load_model
    from onnxcc.compiler.sessions import run_model
    from onnxcc.passes.training.bridge import GraphModule

    rows, records = [], []
    try:
        convert, stand_in = _import_onnx2torch()
    except ImportError as e:
        convert, stand_in = None, f"{e}"
    if stand_in:
        print("# torchvision does not import beside this torch build: onnx2torch runs with a stand-in torchvision "
              "(its NMS/RoiAlign converters would raise; no graph here has them)", flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxcc-bridge-") as d:
        for label, path, feeds in _graphs(Path(d)):
            feeds = _feeds(path, feeds)
            model = load_model(path)
            ref = list(run_model(model, [feeds]).values())
            rec = {"graph": label}
            try:
                if convert is None:
                    raise ImportError(stand_in)
                proto = onnx.load(str(path))
                tm = convert(proto).eval()
                with torch.no_grad():
                    out = tm(*[torch.from_numpy(feeds[i.name]) for i in proto.graph.input if i.name in feeds])
                out = out if isinstance(out, (list, tuple)) else [out]
                inits = {t.name for t in proto.graph.initializer}
                rec["onnx2torch"] = {"converts": True, "rel_error": _rel([o.numpy() for o in out], ref),
                                     "parameters": len(list(tm.parameters())), "named_like_the_graph": sum(
                                         1 for n, _ in tm.named_parameters() if n.split(".")[-1] in inits)}
            except Exception as e:  # noqa: BLE001 (the benchmark reports every failure)
                rec["onnx2torch"] = {"converts": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:90] if str(e) else ''}"}
            try:
                gm = GraphModule(model)
                with torch.no_grad():
                    out = gm(feeds)
                s = gm.trainable_summary()
                rec["onnxcc"] = {"converts": True, "rel_error": _rel([o.numpy() for o in out], ref),
                                 "parameters": s["float"] + s["quantized"], "named_like_the_graph": s["float"] + s["quantized"]}
            except Exception as e:  # noqa: BLE001
                rec["onnxcc"] = {"converts": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"}

            def cell(r):
                if not r["converts"]:
                    return "fails: " + r["error"][:60]
                return f"{r['rel_error']:.1e}, {r['parameters']} tensors ({r['named_like_the_graph']} write back)"

            rows.append([label, cell(rec["onnx2torch"]), cell(rec["onnxcc"])])
            records.append(rec)
            print(f"# {label} done", flush=True)
    return format_table(rows, ["graph", "onnx2torch: error vs ORT, trainable tensors", "onnxcc bridge"]), records


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    table, records = run()
    print(table)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
