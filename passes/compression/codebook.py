"""The ``codebook`` pass: k-means weight sharing, stored as packed indices and rebuilt in-graph.

Each selected weight tensor is clustered into ``2^bits`` values (1-D k-means,
k-means++ initialisation from a seeded generator, Lloyd iterations over the
sorted weights). The file keeps the indices, as ``uint4`` (bits ≤ 4, opset 21)
or ``uint8``, and the float32 codebook; the graph rebuilds the weight as
``Gather(codebook, Cast(indices, int32))``. That subgraph has only constant
inputs, so onnxruntime folds it once at session start and runs the layer on a
plain float weight: inference speed is that of the float model. If the layer
is sparse (exact zeros), zero is kept as an exact centroid and the zeros stay
zeros. On an INT8 QDQ model the int8 weights feeding each DequantizeLinear
are clustered into 2^bits int8 levels the same way: onnxruntime folds the
Gather at session start and still fuses the layer into QLinearConv, so the
codebook combines with INT8 activations. Deep Compression (Han et al. 2016) does the same before Huffman
coding; here the zip of the file plays that part.
"""

from __future__ import annotations

import dataclasses
import fnmatch

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxcc.compiler.ir_utils import add_initializer, convert_opset, node_label, replace_contents
from onnxcc.compiler.passbase import OnnxccPass, PassReport, Skipped
from onnxcc.compiler.metrics import weight_sqnr
from onnxcc.passes.compression.common import storage_sizes, weights


def kmeans_1d(values: np.ndarray, k: int, seed: int = 0, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """(sorted centroids, index of each value). k-means++ init on a sample, Lloyd on all values."""
    x = np.asarray(values, np.float64).reshape(-1)
    uniq = np.unique(x)
    if uniq.size <= k:
        return uniq, np.searchsorted(uniq, x)
    rng = np.random.default_rng(seed)
    sample = x if x.size <= 20000 else rng.choice(x, 20000, replace=False)
    centers = [sample[rng.integers(sample.size)]]
    d2 = (sample - centers[0]) ** 2
    for _ in range(1, k):
        total = d2.sum()
        c = sample[rng.choice(sample.size, p=d2 / total)] if total > 0 else sample[rng.integers(sample.size)]
        centers.append(c)
        d2 = np.minimum(d2, (sample - c) ** 2)
    c = np.unique(np.asarray(centers))
    xs = np.sort(x)
    csum = np.concatenate([[0.0], np.cumsum(xs)])
    for _ in range(iters):
        bounds = np.searchsorted(xs, (c[:-1] + c[1:]) / 2)  # 1-D: nearest centroid = between midpoints
        edges = np.concatenate([[0], bounds, [xs.size]])
        counts = np.diff(edges)
        sums = csum[edges[1:]] - csum[edges[:-1]]
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        new = np.unique(new)
        if new.size == c.size and np.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = new
    idx = np.clip(np.searchsorted((c[:-1] + c[1:]) / 2, x), 0, c.size - 1)
    return c, idx


def cluster(w: np.ndarray, bits: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(codebook float32 [≤ 2^bits], indices shaped like ``w``); zero is an exact centroid when ``w`` has zeros."""
    k = 2**bits
    flat = w.reshape(-1)
    zero = flat == 0
    if zero.any():
        c, idx = kmeans_1d(flat[~zero], k - 1, seed)
        codebook = np.concatenate([[0.0], c]).astype(np.float32)
        full = np.zeros(flat.size, np.int64)
        full[~zero] = idx + 1
        return codebook, full.reshape(w.shape)
    c, idx = kmeans_1d(flat, k, seed)
    return c.astype(np.float32), idx.reshape(w.shape)


def _gather(graph: ir.Graph, before: ir.Node, base: str, book: np.ndarray, idx: np.ndarray, dtype: ir.DataType) -> ir.Value:
    """``Gather(book, Cast(idx, int32))`` inserted before ``before``: the shared weight, shaped like ``idx``."""
    iv = add_initializer(graph, f"{base}_idx", idx)
    cv = add_initializer(graph, f"{base}_codebook", book)
    cast = ir.node("Cast", [iv], attributes={"to": ir.DataType.INT32}, name=f"{before.name}_idx_cast")
    gather = ir.node("Gather", [cv, cast.outputs[0]], attributes={"axis": 0}, name=f"{before.name}_codebook")
    cast.outputs[0].name = f"{base}_idx_i32"
    gather.outputs[0].name = f"{base}_shared"
    gather.outputs[0].dtype = dtype
    gather.outputs[0].shape = ir.Shape(idx.shape)
    graph.insert_before(before, [cast, gather])
    return gather.outputs[0]


def _int8_weights(model: ir.Model, cfg) -> list[tuple[ir.Node, ir.Node, np.ndarray]]:
    """(DequantizeLinear, weighted consumer, int8 weights) of an INT8 QDQ model's Conv/Gemm/MatMul weights."""
    out = []
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        dq = node.inputs[1].producer()
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        t = dq.inputs[0].const_value
        if t is None or t.dtype != ir.DataType.INT8 or dq.inputs[0].is_graph_input() or len(dq.inputs[0].uses()) > 1:
            continue
        q = t.numpy()
        name = node.name or ""
        if q.size < cfg.min_size or (cfg.layers and not any(fnmatch.fnmatchcase(name, p) for p in cfg.layers)) or any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude):
            continue
        out.append((dq, node, q))
    return out


class CodebookPass(OnnxccPass):
    name = "codebook"
    exact = False
    summary = "k-means weight sharing: 2^bits shared values per layer, packed indices rebuilt in-graph (folded at session start)"

    @dataclasses.dataclass(frozen=True)
    class Config:
        bits: int = dataclasses.field(default=4, metadata={"help": "index bits (2..8): 2^bits shared values per layer"})
        layers: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "node-name patterns to compress (default: all)"})
        exclude: tuple[str, ...] = dataclasses.field(default=(), metadata={"help": "node-name patterns left alone"})
        min_size: int = dataclasses.field(default=1024, metadata={"help": "leave smaller weights alone"})

        def __post_init__(self):
            if not 2 <= self.bits <= 8:
                raise ValueError("bits must be in 2..8")

    @classmethod
    def milder(cls, config, strength: float):
        """More index bits, up to 8, as ``strength`` falls."""
        bits = min(8, config.bits + round((1 - strength) * (8 - config.bits)))
        return None if config.bits >= 8 else dataclasses.replace(config, bits=bits)

    def call(self, model: ir.Model) -> PassReport:
        cfg = self.config
        skipped: list[Skipped] = []
        before = storage_sizes(model)
        targets = weights(model, min_size=cfg.min_size, include=cfg.layers, exclude=cfg.exclude, skipped=skipped)
        int8 = _int8_weights(model, cfg)
        if not targets and not int8:
            return PassReport(model, False, skipped=skipped)
        packed = cfg.bits <= 4
        if packed and model.opset_imports.get("", 0) < 21:
            replace_contents(model, convert_opset(model, 21))
            targets = weights(model, min_size=cfg.min_size, include=cfg.layers, exclude=cfg.exclude)
            int8 = _int8_weights(model, cfg)
        graph = model.graph
        layers, changed = {}, []
        index_type = ml_dtypes.uint4 if packed else np.uint8
        for node, w in targets:
            codebook, idx = cluster(w, cfg.bits, seed=self.context.seed)
            shared = _gather(graph, node, node.inputs[1].name or f"{node.name}_W", codebook, idx.astype(index_type), ir.DataType.FLOAT)
            node.replace_input_with(1, shared)
            layers[node_label(node)] = {"centroids": int(codebook.size), "zero_centroid": bool((w == 0).any()), "sqnr_db": weight_sqnr(w, codebook[idx])}
            changed.append(node_label(node))
        for dq, consumer, q in int8:  # INT8 QDQ weights: shared int8 levels, still fused by onnxruntime
            codebook, idx = cluster(q.astype(np.float32), cfg.bits, seed=self.context.seed)
            book = np.clip(np.round(codebook), -127, 127).astype(np.int8)
            shared = _gather(graph, dq, dq.inputs[0].name or f"{dq.name}_q", book, idx.astype(index_type), ir.DataType.INT8)
            dq.replace_input_with(0, shared)
            layers[node_label(consumer)] = {"centroids": int(np.unique(book).size), "int8": True, "zero_centroid": bool((q == 0).any()),
                                            "sqnr_db": weight_sqnr(q.astype(np.float32), book[idx].astype(np.float32))}
            changed.append(node_label(consumer))
        common.RemoveUnusedNodesPass()(model)
        stats = {"bits": cfg.bits, "index_type": "uint4" if packed else "uint8", "layers": layers, "size_before": before, "size_after": storage_sizes(model)}
        return PassReport(model, True, changed=changed, skipped=skipped, stats=stats)
