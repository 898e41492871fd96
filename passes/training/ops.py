"""ONNX operators as torch functions, for the graph-to-torch bridge (:mod:`.bridge`).

One function per operator, ``fn(node, inputs) -> list of outputs``: ``inputs`` are torch tensors
(None for an omitted optional input), attributes are read from the ``onnx_ir`` node. The table
covers what onnxcc's passes handle and what the exporters it is tested on emit: both torch
exporters, tf2onnx (NHWC Transposes, Pads, auto_pad), paddle2onnx at opset 11/12 (Constant
weights, attribute forms of Squeeze/Unsqueeze/Split/Reduce*), QDQ graphs. The ONNX semantics that
torch does not share are written out: asymmetric pads, ``auto_pad``, ceil-mode pooling with
ONNX's last-window rule, Resize's coordinate modes, Gemm's transposes, Reshape's 0 and -1.
Shape arithmetic runs on int64 tensors, eagerly, so dynamic axes stay dynamic.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F

OPS: dict[str, Callable[[ir.Node, list], list]] = {}


def op(*names: str):
    def deco(fn):
        for n in names:
            OPS[n] = fn
        return fn

    return deco


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    if a is None:
        return default
    v = a.value
    if isinstance(v, bytes):
        return v.decode()
    return v


def ints(t) -> list[int]:
    """An int64 tensor (or list) as Python ints."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def torch_dtype(onnx_type: int) -> torch.dtype:
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(onnx_type)
    return torch.from_numpy(np.zeros(1, np_dtype)).dtype


def arg(inputs: list, i: int):
    return inputs[i] if i < len(inputs) else None


# ------------------------------------------------------------------ elementwise
_BINARY = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "Equal": torch.eq, "Less": torch.lt,
           "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge, "And": torch.logical_and,
           "Or": torch.logical_or, "Xor": torch.logical_xor}


@op("Add", "Sub", "Mul", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor")
def _binary(node, x):
    return [_BINARY[node.op_type](x[0], x[1])]


@op("Pow")
def _pow(node, x):
    y = torch.pow(x[0], x[1].to(x[0].dtype) if x[1].is_floating_point() == x[0].is_floating_point() else x[1])
    return [y.to(x[0].dtype)]


@op("Div")
def _div(node, x):
    a, b = x
    if not a.is_floating_point():
        return [torch.div(a, b, rounding_mode="trunc")]
    return [a / b]


@op("Mod")
def _mod(node, x):
    return [torch.fmod(x[0], x[1]) if attr(node, "fmod", 0) else torch.remainder(x[0], x[1])]


_UNARY = {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp, "Log": torch.log,
          "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg, "Reciprocal": torch.reciprocal, "Erf": torch.erf,
          "Floor": torch.floor, "Ceil": torch.ceil, "Round": torch.round, "Sign": torch.sign, "Not": torch.logical_not,
          "Sin": torch.sin, "Cos": torch.cos, "Softplus": F.softplus, "Softsign": F.softsign, "Mish": F.mish,
          "IsNaN": torch.isnan, "Identity": lambda t: t, "Dropout": lambda t: t}


@op(*_UNARY)
def _unary(node, x):
    out = [_UNARY[node.op_type](x[0])]
    if node.op_type == "Dropout" and len(node.outputs) > 1:
        out.append(torch.ones_like(x[0], dtype=torch.bool))
    return out


@op("IsInf")
def _isinf(node, x):
    t = x[0]
    pos, neg = attr(node, "detect_positive", 1), attr(node, "detect_negative", 1)
    return [(torch.isposinf(t) & bool(pos)) | (torch.isneginf(t) & bool(neg))]


@op("LeakyRelu")
def _leaky(node, x):
    return [F.leaky_relu(x[0], attr(node, "alpha", 0.01))]


@op("Elu")
def _elu(node, x):
    return [F.elu(x[0], attr(node, "alpha", 1.0))]


@op("Selu")
def _selu(node, x):
    a, g = attr(node, "alpha", 1.67326319217681884765625), attr(node, "gamma", 1.05070102214813232421875)
    return [g * torch.where(x[0] > 0, x[0], a * (torch.exp(x[0]) - 1))]


@op("Celu")
def _celu(node, x):
    return [F.celu(x[0], attr(node, "alpha", 1.0))]


@op("ThresholdedRelu")
def _trelu(node, x):
    return [torch.where(x[0] > attr(node, "alpha", 1.0), x[0], torch.zeros_like(x[0]))]


@op("PRelu")
def _prelu(node, x):
    return [torch.where(x[0] >= 0, x[0], x[0] * x[1])]


@op("HardSigmoid")
def _hsig(node, x):
    return [torch.clamp(attr(node, "alpha", 0.2) * x[0] + attr(node, "beta", 0.5), 0, 1)]


@op("HardSwish")
def _hswish(node, x):
    return [x[0] * torch.clamp(x[0] / 6 + 0.5, 0, 1)]


@op("Gelu")
def _gelu(node, x):
    return [F.gelu(x[0], approximate="tanh" if attr(node, "approximate", "none") == "tanh" else "none")]


@op("Clip")
def _clip(node, x):
    lo, hi = arg(x, 1), arg(x, 2)
    if not node.inputs[1:] and ("min" in node.attributes or "max" in node.attributes):  # opset < 11
        lo, hi = attr(node, "min", None), attr(node, "max", None)
    y = x[0]
    if lo is not None:
        y = torch.maximum(y, lo.to(y.dtype) if isinstance(lo, torch.Tensor) else torch.tensor(lo, dtype=y.dtype))
    if hi is not None:
        y = torch.minimum(y, hi.to(y.dtype) if isinstance(hi, torch.Tensor) else torch.tensor(hi, dtype=y.dtype))
    return [y]


@op("Where")
def _where(node, x):
    return [torch.where(x[0], x[1], x[2])]


@op("Max", "Min", "Sum", "Mean")
def _variadic(node, x):
    y = x[0]
    for t in x[1:]:
        y = {"Max": torch.maximum, "Min": torch.minimum}.get(node.op_type, torch.add)(y, t)
    if node.op_type == "Mean":
        y = y / len(x)
    return [y]


@op("Cast")
def _cast(node, x):
    return [x[0].to(torch_dtype(attr(node, "to")))]


@op("CastLike")
def _castlike(node, x):
    return [x[0].to(x[1].dtype)]


@op("Softmax", "LogSoftmax")
def _softmax(node, x):
    t = x[0]
    old = node.meta.get("opset", 13) < 13
    axis = attr(node, "axis", 1 if old else -1)
    fn = torch.softmax if node.op_type == "Softmax" else torch.log_softmax
    if old:  # coerced to 2-D at axis
        axis = axis % t.dim()
        shape = t.shape
        flat = t.reshape(int(np.prod(shape[:axis])) if axis else 1, -1)
        return [fn(flat, 1).reshape(shape)]
    return [fn(t, axis)]


# ------------------------------------------------------------------ linear layers
def _pads_for(node, x, kernel, strides, dilations):
    """ONNX pads as (begin..., end...) for the spatial axes, resolving ``auto_pad``."""
    n = len(kernel)
    auto = attr(node, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads_b, pads_e = [], []
        for i in range(n):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max(0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size)
            small, big = total // 2, total - total // 2
            pads_b.append(small if auto == "SAME_UPPER" else big)
            pads_e.append(big if auto == "SAME_UPPER" else small)
        return pads_b + pads_e
    if auto == "VALID":
        return [0] * (2 * n)
    return list(attr(node, "pads", [0] * (2 * n)))


def _pad_input(x, pads, value=0.0):
    """Apply ONNX-style (begin..., end...) spatial pads; returns (x, symmetric pads for torch)."""
    n = len(pads) // 2
    b, e = pads[:n], pads[n:]
    if b == e:
        return x, b
    torch_pads = []
    for i in reversed(range(n)):
        torch_pads += [b[i], e[i]]
    return F.pad(x, torch_pads, value=value), [0] * n


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@op("Conv")
def _conv(node, x):
    w, b = x[1], arg(x, 2)
    n = w.dim() - 2
    kernel = list(attr(node, "kernel_shape", w.shape[2:]))
    strides = list(attr(node, "strides", [1] * n))
    dil = list(attr(node, "dilations", [1] * n))
    inp, pads = _pad_input(x[0], _pads_for(node, x[0], kernel, strides, dil))
    return [_CONV[n](inp, w, b, strides, pads, dil, attr(node, "group", 1))]


@op("ConvTranspose")
def _convt(node, x):
    w, b = x[1], arg(x, 2)
    n = w.dim() - 2
    strides = list(attr(node, "strides", [1] * n))
    dil = list(attr(node, "dilations", [1] * n))
    groups = attr(node, "group", 1)
    outpad = list(attr(node, "output_padding", [0] * n))
    kernel = list(attr(node, "kernel_shape", w.shape[2:]))
    pads = list(attr(node, "pads", [0] * (2 * n)))
    out_shape = attr(node, "output_shape", None)
    auto = attr(node, "auto_pad", "NOTSET")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        sizes = list(out_shape)[-n:] if out_shape is not None else [x[0].shape[2 + i] * strides[i] for i in range(n)]
        pads = [0] * (2 * n)
        for i in range(n):
            total = strides[i] * (x[0].shape[2 + i] - 1) + outpad[i] + ((kernel[i] - 1) * dil[i] + 1) - sizes[i]
            total = max(total, 0)
            if auto == "SAME_UPPER" or (out_shape is not None and auto != "SAME_LOWER"):
                pads[i], pads[i + n] = total // 2, total - total // 2
            else:
                pads[i], pads[i + n] = total - total // 2, total // 2
    y = _CONVT[n](x[0], w, b, strides, 0, outpad, groups, dil)
    # crop the pads (torch's symmetric padding would not cover asymmetric ones)
    idx = [slice(None), slice(None)] + [slice(pads[i], y.shape[2 + i] - pads[i + n]) for i in range(n)]
    return [y[tuple(idx)]]


@op("Gemm")
def _gemm(node, x):
    a, b, c = x[0], x[1], arg(x, 2)
    if attr(node, "transA", 0):
        a = a.t()
    if attr(node, "transB", 0):
        b = b.t()
    y = attr(node, "alpha", 1.0) * (a @ b)
    if c is not None:
        y = y + attr(node, "beta", 1.0) * c
    return [y]


@op("MatMul")
def _matmul(node, x):
    return [torch.matmul(x[0], x[1])]


@op("Einsum")
def _einsum(node, x):
    return [torch.einsum(attr(node, "equation"), *x)]


# ------------------------------------------------------------------ normalization
@op("BatchNormalization")
def _bn(node, x):
    t, scale, bias, mean, var = x[:5]
    return [F.batch_norm(t, mean, var, scale, bias, False, 0.0, attr(node, "epsilon", 1e-5))]


@op("InstanceNormalization")
def _instnorm(node, x):
    return [F.instance_norm(x[0], weight=x[1], bias=x[2], eps=attr(node, "epsilon", 1e-5))]


@op("LayerNormalization")
def _layernorm(node, x):
    t, scale, bias = x[0], x[1], arg(x, 2)
    axis = attr(node, "axis", -1) % t.dim()
    eps = attr(node, "epsilon", 1e-5)
    dims = tuple(range(axis, t.dim()))
    mean = t.mean(dims, keepdim=True)
    var = ((t - mean) ** 2).mean(dims, keepdim=True)
    inv = torch.rsqrt(var + eps)
    y = (t - mean) * inv * scale
    if bias is not None:
        y = y + bias
    out = [y]
    if len(node.outputs) > 1:
        out += [mean, inv]
    return out


@op("LpNormalization")
def _lpnorm(node, x):
    return [F.normalize(x[0], p=attr(node, "p", 2), dim=attr(node, "axis", -1))]


# ------------------------------------------------------------------ pooling
def _pool_geometry(node, t):
    kernel = list(attr(node, "kernel_shape"))
    n = len(kernel)
    strides = list(attr(node, "strides", [1] * n))
    dil = list(attr(node, "dilations", [1] * n))
    pads = _pads_for(node, t, kernel, strides, dil)
    ceil = bool(attr(node, "ceil_mode", 0))
    if ceil:  # ONNX drops a last window that starts inside the end padding (as torch does on symmetric pads)
        for i in range(n):
            size = t.shape[2 + i] + pads[i] + pads[i + n]
            eff = (kernel[i] - 1) * dil[i] + 1
            out = -(-(size - eff) // strides[i]) + 1
            if (out - 1) * strides[i] >= t.shape[2 + i] + pads[i]:
                out -= 1
            need = (out - 1) * strides[i] + eff - size
            pads[i + n] += max(need, 0)
    return kernel, strides, dil, pads


@op("MaxPool")
def _maxpool(node, x):
    t = x[0]
    kernel, strides, dil, pads = _pool_geometry(node, t)
    t, sym = _pad_input(t, pads, value=float("-inf"))
    fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    return [fn(t, kernel, strides, sym, dil, ceil_mode=False)]


@op("AveragePool")
def _avgpool(node, x):
    t = x[0]
    kernel, strides, dil, pads = _pool_geometry(node, t)
    n = len(kernel)
    include = bool(attr(node, "count_include_pad", 0))
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[n]
    orig = list(_pads_for(node, t, kernel, strides, dil))
    if not any(pads):
        return [fn(t, kernel, strides, 0)]
    ones = torch.ones((1, 1) + tuple(t.shape[2:]), dtype=t.dtype)
    if include:  # the user's pads count, the extra ceil-mode end padding does not
        ones = _pad_input(ones, orig, 1.0)[0]
        ones = _pad_input(ones, [0] * n + [p - o for p, o in zip(pads[n:], orig[n:])], 0.0)[0]
    else:
        ones = _pad_input(ones, pads, 0.0)[0]
    t = _pad_input(t, pads, 0.0)[0]
    s = fn(t, kernel, strides, 0) * float(np.prod(kernel))
    c = fn(ones, kernel, strides, 0) * float(np.prod(kernel))
    return [s / c]


@op("GlobalAveragePool")
def _gap(node, x):
    return [x[0].mean(tuple(range(2, x[0].dim())), keepdim=True)]


@op("GlobalMaxPool")
def _gmp(node, x):
    return [x[0].amax(tuple(range(2, x[0].dim())), keepdim=True)]


# ------------------------------------------------------------------ reductions
def _axes(node, x, idx=1):
    if idx < len(x) and x[idx] is not None:
        return ints(x[idx])
    a = attr(node, "axes", None)
    return list(a) if a is not None else None


_REDUCE = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax, "ReduceMin": torch.amin}


@op(*_REDUCE, "ReduceProd", "ReduceL2", "ReduceL1", "ReduceSumSquare", "ReduceLogSumExp")
def _reduce(node, x):
    t = x[0]
    axes = _axes(node, x)
    keep = bool(attr(node, "keepdims", 1))
    if not axes:
        if attr(node, "noop_with_empty_axes", 0) and axes is not None:
            return [t]
        axes = list(range(t.dim()))
    axes = [a % t.dim() for a in axes]
    kind = node.op_type
    if kind in _REDUCE:
        return [_REDUCE[kind](t, axes, keepdim=keep)]
    if kind == "ReduceL2":
        return [torch.sqrt((t * t).sum(axes, keepdim=keep))]
    if kind == "ReduceL1":
        return [t.abs().sum(axes, keepdim=keep)]
    if kind == "ReduceSumSquare":
        return [(t * t).sum(axes, keepdim=keep)]
    if kind == "ReduceLogSumExp":
        return [torch.logsumexp(t, axes, keepdim=keep)]
    y = t
    for a in sorted(axes, reverse=True):
        y = y.prod(a, keepdim=keep)
    return [y]


@op("ArgMax", "ArgMin")
def _argmax(node, x):
    axis, keep = attr(node, "axis", 0), bool(attr(node, "keepdims", 1))
    t = x[0]
    if attr(node, "select_last_index", 0):
        t = t.flip(axis)
        r = (torch.argmax if node.op_type == "ArgMax" else torch.argmin)(t, axis, keepdim=keep)
        return [t.shape[axis] - 1 - r]
    return [(torch.argmax if node.op_type == "ArgMax" else torch.argmin)(t, axis, keepdim=keep)]


# ------------------------------------------------------------------ shape and data movement
@op("Shape")
def _shape(node, x):
    s = list(x[0].shape)
    start, end = attr(node, "start", 0), attr(node, "end", None)
    return [torch.tensor(s[start:end], dtype=torch.int64)]


@op("Size")
def _size(node, x):
    return [torch.tensor(x[0].numel(), dtype=torch.int64)]


@op("Reshape")
def _reshape(node, x):
    shape = ints(x[1])
    if not attr(node, "allowzero", 0):
        shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x[0].reshape(shape)]


@op("Flatten")
def _flatten(node, x):
    axis = attr(node, "axis", 1) % (x[0].dim() or 1) if x[0].dim() else 0
    lead = int(np.prod(x[0].shape[:axis])) if axis else 1
    return [x[0].reshape(lead, -1)]


@op("Transpose")
def _transpose(node, x):
    perm = attr(node, "perm", None)
    return [x[0].permute(list(perm) if perm is not None else list(reversed(range(x[0].dim()))))]


@op("Squeeze")
def _squeeze(node, x):
    axes = _axes(node, x)
    t = x[0]
    if not axes:
        return [t.squeeze()]
    for a in sorted((a % t.dim() for a in axes), reverse=True):
        t = t.squeeze(a)
    return [t]


@op("Unsqueeze")
def _unsqueeze(node, x):
    axes = _axes(node, x)
    t = x[0]
    out_rank = t.dim() + len(axes)
    for a in sorted(a % out_rank for a in axes):
        t = t.unsqueeze(a)
    return [t]


@op("Concat")
def _concat(node, x):
    parts = [t for t in x if t is not None and not (t.dim() == 1 and t.numel() == 0 and any(u.dim() > 1 for u in x if u is not None))]
    return [torch.cat(parts, attr(node, "axis"))]


@op("Split")
def _split(node, x):
    t, axis = x[0], attr(node, "axis", 0)
    split = ints(arg(x, 1)) if arg(x, 1) is not None else list(attr(node, "split", []) or [])
    if not split:
        n = attr(node, "num_outputs", len(node.outputs))
        size = t.shape[axis]
        chunk = -(-size // n)
        split = [chunk] * (size // chunk) + ([size % chunk] if size % chunk else [])
    return list(torch.split(t, split, axis))


@op("Slice")
def _slice(node, x):
    t = x[0]
    if len(x) > 1:
        starts, ends = ints(x[1]), ints(x[2])
        axes = ints(arg(x, 3)) if arg(x, 3) is not None else list(range(len(starts)))
        steps = ints(arg(x, 4)) if arg(x, 4) is not None else [1] * len(starts)
    else:  # opset < 10
        starts, ends = list(attr(node, "starts")), list(attr(node, "ends"))
        axes = list(attr(node, "axes", range(len(starts))))
        steps = [1] * len(starts)
    idx: list[Any] = [slice(None)] * t.dim()
    flips = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        a = a % t.dim()
        dim = t.shape[a]
        if st > 0:
            s = max(0, min(dim, s + dim if s < 0 else s))
            e = max(0, min(dim, e + dim if e < 0 else e))
            idx[a] = slice(s, e, st)
        else:  # negative step: index with an explicit range
            s = max(-1, min(dim - 1, s + dim if s < 0 else s))
            e = max(-1, min(dim - 1, e + dim if e < 0 else e))
            flips.append((a, torch.arange(s, e, st, dtype=torch.int64)))
    y = t[tuple(idx)]
    for a, r in flips:
        y = y.index_select(a, r)
    return [y]


@op("Gather")
def _gather(node, x):
    t, i = x[0], x[1]
    axis = attr(node, "axis", 0) % t.dim()
    i = torch.where(i < 0, i + t.shape[axis], i).long()
    y = t.index_select(axis, i.reshape(-1))
    return [y.reshape(tuple(t.shape[:axis]) + tuple(i.shape) + tuple(t.shape[axis + 1:]))]


@op("GatherElements")
def _gather_el(node, x):
    axis = attr(node, "axis", 0)
    i = x[1].long()
    i = torch.where(i < 0, i + x[0].shape[axis], i)
    return [torch.gather(x[0], axis, i)]


@op("Expand")
def _expand(node, x):
    shape = ints(x[1])
    t = x[0]
    rank = max(t.dim(), len(shape))
    shape = [1] * (rank - len(shape)) + shape
    tshape = [1] * (rank - t.dim()) + list(t.shape)
    target = [max(a, b) if a != 1 and b != 1 else a * b for a, b in zip(shape, tshape)]
    return [t.reshape(tshape).expand(target)]


@op("Tile")
def _tile(node, x):
    return [x[0].repeat(ints(x[1]))]


@op("ConstantOfShape")
def _const_of_shape(node, x):
    value = node.attributes.get("value")
    arr = value.as_tensor().numpy().reshape(-1) if value is not None else np.zeros(1, np.float32)
    v = torch.from_numpy(arr.copy())
    return [torch.full(ints(x[0]), v[0].item(), dtype=v.dtype)]


@op("Range")
def _range(node, x):
    start, limit, delta = (t.item() for t in x[:3])
    return [torch.arange(start, limit, delta, dtype=x[0].dtype)]


@op("Pad")
def _pad(node, x):
    t = x[0]
    if len(x) > 1 and x[1] is not None:
        pads = ints(x[1])
        value = arg(x, 2)
        value = float(value.reshape(-1)[0]) if value is not None and value.numel() else 0.0
        axes = ints(arg(x, 3)) if arg(x, 3) is not None else list(range(t.dim()))
    else:  # opset < 11
        pads, value = list(attr(node, "pads")), attr(node, "value", 0.0)
        axes = list(range(t.dim()))
    mode = attr(node, "mode", "constant")
    n = len(axes)
    full_b, full_e = [0] * t.dim(), [0] * t.dim()
    for k, a in enumerate(axes):
        full_b[a % t.dim()], full_e[a % t.dim()] = pads[k], pads[k + n]
    if any(p < 0 for p in full_b + full_e):  # negative pads crop
        idx = tuple(slice(max(0, -b), t.shape[d] - max(0, -e)) for d, (b, e) in enumerate(zip(full_b, full_e)))
        t = t[idx]
        full_b, full_e = [max(0, p) for p in full_b], [max(0, p) for p in full_e]
    torch_pads: list[int] = []
    for d in reversed(range(t.dim())):
        torch_pads += [full_b[d], full_e[d]]
    while torch_pads[-2:] == [0, 0] and len(torch_pads) > 2:
        torch_pads = torch_pads[:-2]
    if mode == "constant":
        return [F.pad(t, torch_pads, value=value)]
    tmode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    spatial = len(torch_pads) // 2
    # torch pads the last `spatial` axes of an (N, C, ...) tensor in these modes
    lead = t.dim() - spatial
    shape = t.shape
    flat = t.reshape((1, int(np.prod(shape[:lead])) if lead else 1) + tuple(shape[lead:])) if lead != 2 else t
    y = F.pad(flat, torch_pads, mode=tmode)
    return [y.reshape(tuple(shape[:lead]) + tuple(y.shape[-spatial:])) if lead != 2 else y]


@op("DepthToSpace")
def _d2s(node, x):
    b = attr(node, "blocksize")
    n, c, h, w = x[0].shape
    if attr(node, "mode", "DCR") == "DCR":
        y = x[0].reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x[0].reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // (b * b), h * b, w * b)]


@op("SpaceToDepth")
def _s2d(node, x):
    b = attr(node, "blocksize")
    n, c, h, w = x[0].shape
    y = x[0].reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * b * b, h // b, w // b)]


@op("TopK")
def _topk(node, x):
    k = ints(x[1])[0]
    axis = attr(node, "axis", -1)
    v, i = torch.topk(x[0], k, axis, largest=bool(attr(node, "largest", 1)), sorted=bool(attr(node, "sorted", 1)))
    return [v, i]


@op("NonZero")
def _nonzero(node, x):
    return [torch.nonzero(x[0]).t().contiguous()]


@op("CumSum")
def _cumsum(node, x):
    axis = ints(x[1])[0]
    t = x[0].flip(axis) if attr(node, "reverse", 0) else x[0]
    y = torch.cumsum(t, axis)
    if attr(node, "exclusive", 0):
        y = y - t
    return [y.flip(axis) if attr(node, "reverse", 0) else y]


# ------------------------------------------------------------------ resize
def _resize_sizes(node, t, scales, sizes, axes):
    rank = t.dim()
    if sizes is not None and sizes.numel():
        sz = ints(sizes)
        if axes is not None:
            full = list(t.shape)
            for a, s in zip(axes, sz):
                full[a % rank] = s
            sz = full
        policy = attr(node, "keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            raise NotImplementedError(f"Resize keep_aspect_ratio_policy={policy}")
        return sz, [sz[i] / t.shape[i] for i in range(rank)]
    sc = [float(v) for v in scales.reshape(-1).tolist()]
    if axes is not None:
        full = [1.0] * rank
        for a, s in zip(axes, sc):
            full[a % rank] = s
        sc = full
    return [int(math.floor(t.shape[i] * sc[i])) for i in range(rank)], sc


def _source_coords(mode, out_size, in_size, scale):
    o = torch.arange(out_size, dtype=torch.float64)
    if mode == "half_pixel":
        return (o + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (o + 0.5) / scale - 0.5 if out_size > 1 else torch.zeros_like(o)
    if mode == "align_corners":
        return o * (in_size - 1) / (out_size - 1) if out_size > 1 else torch.zeros_like(o)
    if mode == "asymmetric":
        return o / scale
    if mode == "half_pixel_symmetric":
        adj = out_size / (scale * in_size)
        center = in_size / 2
        offset = center * (1 - adj)
        return offset + (o + 0.5) / scale - 0.5
    raise NotImplementedError(f"Resize coordinate_transformation_mode={mode}")


@op("Resize", "Upsample")
def _resize(node, x):
    t = x[0]
    if node.op_type == "Upsample":
        scales, sizes = (x[1] if len(x) > 1 else torch.tensor(attr(node, "scales"))), None
        mode_coord = "asymmetric"
    elif len(x) == 2:  # opset 10: X, scales
        scales, sizes, mode_coord = x[1], None, "asymmetric"
    else:  # X, roi (only tf_crop_and_resize reads it: refused below), scales, sizes
        scales, sizes = arg(x, 2), arg(x, 3)
        mode_coord = attr(node, "coordinate_transformation_mode", "half_pixel")
    axes = attr(node, "axes", None)
    out, sc = _resize_sizes(node, t, scales, sizes, axes)
    mode = attr(node, "mode", "nearest")
    if mode == "nearest":
        nearest = attr(node, "nearest_mode", "round_prefer_floor")
        y = t
        for d in range(t.dim()):
            if out[d] == t.shape[d] and sc[d] == 1.0:
                continue
            src = _source_coords(mode_coord, out[d], t.shape[d], sc[d])
            if nearest == "floor":
                idx = torch.floor(src)
            elif nearest == "ceil":
                idx = torch.ceil(src)
            elif nearest == "round_prefer_ceil":
                idx = torch.floor(src + 0.5)
            else:  # round_prefer_floor
                idx = torch.ceil(src - 0.5)
            idx = idx.clamp(0, t.shape[d] - 1).long()
            y = y.index_select(d, idx)
        return [y]
    if mode == "linear":
        y = t
        for d in range(t.dim()):
            if out[d] == t.shape[d] and sc[d] == 1.0:
                continue
            src = _source_coords(mode_coord, out[d], t.shape[d], sc[d]).clamp(0, t.shape[d] - 1)
            lo = torch.floor(src).long()
            hi = (lo + 1).clamp(max=t.shape[d] - 1)
            w = (src - lo).to(t.dtype)
            shape = [1] * t.dim()
            shape[d] = -1
            w = w.reshape(shape)
            y = y.index_select(d, lo) * (1 - w) + y.index_select(d, hi) * w
        return [y]
    raise NotImplementedError(f"Resize mode={mode}")


# ------------------------------------------------------------------ quantization (QDQ as fake quantization)
class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return torch.round(t)

    @staticmethod
    def backward(ctx, g):
        return g


def round_ste(t: torch.Tensor) -> torch.Tensor:
    """Round to nearest even (as QuantizeLinear does); the gradient passes straight through."""
    return _RoundSTE.apply(t)


QRANGE = {torch.int8: (-128, 127), torch.uint8: (0, 255), torch.int16: (-32768, 32767), torch.uint16: (0, 65535),
          torch.int32: (-(2 ** 31), 2 ** 31 - 1)}


def broadcast_param(p: torch.Tensor, t: torch.Tensor, axis: int, block: int = 0) -> torch.Tensor:
    """A per-tensor, per-axis or blocked scale/zero point shaped to broadcast against ``t``."""
    if p.dim() == 0 or p.numel() == 1 and t.dim() == 0:
        return p.reshape(())
    axis = axis % t.dim()
    if block:
        return p.repeat_interleave(block, dim=axis).narrow(axis, 0, t.shape[axis])
    shape = [1] * t.dim()
    shape[axis] = -1
    return p.reshape(shape)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, qmin: int, qmax: int, axis: int = 1,
               block: int = 0) -> torch.Tensor:
    """Dequantize(Quantize(x)) with a straight-through gradient for x (zero outside the range) and
    the LSQ gradient for the scale."""
    s = broadcast_param(scale, x, axis, block)
    z = broadcast_param(zp.to(x.dtype), x, axis, block) if zp is not None else 0.0
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


@op("QuantizeLinear")
def _quantize(node, x):
    """The codes as a float tensor, rounded with a straight-through gradient (the scale gets
    LSQ's gradient when it is a parameter)."""
    t, scale, zp = x[0], x[1], arg(x, 2)
    out_type = attr(node, "output_dtype", 0)
    dtype = zp.dtype if zp is not None else (torch_dtype(out_type) if out_type else torch.uint8)
    qmin, qmax = QRANGE.get(dtype, (-128, 127))
    axis, block = attr(node, "axis", 1), attr(node, "block_size", 0)
    s = broadcast_param(scale.to(t.dtype), t, axis, block)
    z = broadcast_param(zp.to(t.dtype), t, axis, block) if zp is not None else 0.0
    return [torch.clamp(round_ste(t / s) + z, qmin, qmax)]


@op("DequantizeLinear")
def _dequantize(node, x):
    q, scale, zp = x[0], x[1], arg(x, 2)
    axis, block = attr(node, "axis", 1), attr(node, "block_size", 0)
    qf = q if q.is_floating_point() else q.to(scale.dtype)
    s = broadcast_param(scale, qf, axis, block)
    z = broadcast_param(zp.to(qf.dtype), qf, axis, block) if zp is not None else 0.0
    return [(qf - z) * s]


# ------------------------------------------------------------------ recurrent
@op("LSTM")
def _lstm(node, x):
    """ONNX LSTM (gates i, o, f, c; default activations; forward, reverse or bidirectional), as
    exported by torch 1.x for CRNN heads. Peepholes, clipping and custom activations are refused."""
    t, w, r = x[0], x[1], x[2]
    b, seq_lens, h0, c0, peep = arg(x, 3), arg(x, 4), arg(x, 5), arg(x, 6), arg(x, 7)
    if peep is not None or attr(node, "clip", None) is not None or attr(node, "activations", None) not in (None, ["Sigmoid", "Tanh", "Tanh"] * 2, ["Sigmoid", "Tanh", "Tanh"]):
        raise NotImplementedError("LSTM with peepholes, clip or custom activations")
    if attr(node, "input_forget", 0):
        raise NotImplementedError("LSTM input_forget=1")
    if seq_lens is not None and bool((seq_lens != t.shape[0 if not attr(node, 'layout', 0) else 1]).any()):
        raise NotImplementedError("LSTM with per-sample sequence lengths")
    layout = attr(node, "layout", 0)
    if layout:
        t = t.transpose(0, 1)
    steps, batch = t.shape[0], t.shape[1]
    dirs = w.shape[0]
    hidden = r.shape[-1]
    direction = attr(node, "direction", "forward")
    ys, hs, cs = [], [], []
    for d in range(dirs):
        reverse = direction == "reverse" or (direction == "bidirectional" and d == 1)
        bias = (b[d, :4 * hidden] + b[d, 4 * hidden:]) if b is not None else 0.0
        h = h0[d] if h0 is not None else t.new_zeros(batch, hidden)
        c = c0[d] if c0 is not None else t.new_zeros(batch, hidden)
        if layout and h0 is not None:
            h = h0[:, d]
        if layout and c0 is not None:
            c = c0[:, d]
        xw = torch.matmul(t, w[d].t()) + bias  # [T, N, 4H]
        out = [None] * steps
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        for k in order:
            g = xw[k] + h @ r[d].t()
            i, o, f, cc = g.split(hidden, dim=-1)
            i, o, f, cc = torch.sigmoid(i), torch.sigmoid(o), torch.sigmoid(f), torch.tanh(cc)
            c = f * c + i * cc
            h = o * torch.tanh(c)
            out[k] = h
        ys.append(torch.stack(out))  # [T, N, H]
        hs.append(h)
        cs.append(c)
    y = torch.stack(ys, 1)  # [T, dirs, N, H]
    yh, yc = torch.stack(hs), torch.stack(cs)
    if layout:
        y, yh, yc = y.permute(2, 0, 1, 3), yh.transpose(0, 1), yc.transpose(0, 1)
    return [y, yh, yc]
