"""Framework-free builders of the CNN families onnxcc must handle, on `onnx_ir`.

Each builder takes a ``seed`` and a size preset (``"tiny"`` for fast tests,
``"full"`` for benchmarks) and returns an ``ir.Model`` with a dynamic batch
axis. Weights are He-initialised; BatchNorm statistics are *realistic*: after
building, :func:`calibrate_batchnorm` runs the model on random images and sets
each BatchNorm's running mean/var to the batch statistics of its input, layer
depth by layer depth, so every BatchNorm really normalises (as after training)
and activations neither explode nor vanish. BN scales γ follow a gamma
distribution, so channel importances differ as in trained networks.

Families: VGG (Flatten→Gemm head over a 7×7 map), ResNet (basic/bottleneck,
1×1 downsample), MobileNetV2 (depthwise, Clip as ReLU6, inverted residuals),
MobileNetV3 (HardSwish, squeeze-excite with HardSigmoid), EfficientNet (SiLU as
x·sigmoid(x), squeeze-excite Mul), DenseNet (concatenation, pre-activation BN),
Inception (multi-branch concat), ResNeXt (grouped conv).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import onnx
import onnx_ir as ir


class NetBuilder:
    def __init__(self, name: str, input_hw: int, *, in_ch: int = 3, seed: int = 0, opset: int = 17):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.opset = opset
        self.tape = ir.tape.Tape()
        self.input = ir.Value(
            name="input",
            shape=ir.Shape(["N", in_ch, input_hw, input_hw]),
            type=ir.TensorType(ir.DataType.FLOAT),
        )
        self.ch: dict[ir.Value, int] = {self.input: in_ch}
        self._n = 0

    # ---- naming and constants
    def _name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def const(self, arr: np.ndarray, prefix: str = "w") -> ir.Value:
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        return self.tape.initializer(ir.tensor(np.ascontiguousarray(arr)), name=self._name(prefix))

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], attrs: dict | None = None, ch: int | None = None, prefix: str | None = None) -> ir.Value:
        name = self._name(prefix or op_type.lower())
        y = self.tape.op(op_type, list(inputs), attrs or None, name=name)
        y.name = name + "_out"
        if ch is not None:
            self.ch[y] = ch
        elif inputs and inputs[0] in self.ch:
            self.ch[y] = self.ch[inputs[0]]
        return y

    # ---- layers
    def conv(self, x: ir.Value, cout: int, k: int = 3, s: int = 1, g: int = 1, bias: bool = False, d: int = 1) -> ir.Value:
        cin = self.ch[x]
        fan_in = cin // g * k * k
        w = (self.rng.standard_normal((cout, cin // g, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        inputs = [x, self.const(w, "conv_w")]
        if bias:
            inputs.append(self.const((self.rng.standard_normal(cout) * 0.05).astype(np.float32), "conv_b"))
        pad = d * (k - 1) // 2
        attrs = {"kernel_shape": [k, k], "strides": [s, s], "pads": [pad] * 4, "group": g, "dilations": [d, d]}
        return self.op("Conv", inputs, attrs, ch=cout, prefix="conv")

    def bn(self, x: ir.Value) -> ir.Value:
        c = self.ch[x]
        gamma = self.rng.gamma(2.0, 0.5, c).astype(np.float32) + 0.05
        beta = (self.rng.standard_normal(c) * 0.2).astype(np.float32)
        mean = np.zeros(c, np.float32)
        var = np.ones(c, np.float32)
        ins = [x] + [self.const(a, p) for a, p in ((gamma, "bn_g"), (beta, "bn_b"), (mean, "bn_m"), (var, "bn_v"))]
        return self.op("BatchNormalization", ins, {"epsilon": 1e-5}, prefix="bn")

    def relu(self, x):
        return self.op("Relu", [x])

    def relu6(self, x):
        return self.op("Clip", [x, self.const(np.array(0, np.float32), "lo"), self.const(np.array(6, np.float32), "hi")])

    def hardswish(self, x):
        return self.op("HardSwish", [x])

    def hardsigmoid(self, x):
        return self.op("HardSigmoid", [x], {"alpha": 1 / 6, "beta": 0.5})

    def sigmoid(self, x):
        return self.op("Sigmoid", [x])

    def silu(self, x):
        return self.mul(x, self.sigmoid(x))

    def act(self, x, kind: str | None):
        if kind is None:
            return x
        return {"relu": self.relu, "relu6": self.relu6, "hardswish": self.hardswish, "silu": self.silu}[kind](x)

    def add(self, a, b):
        return self.op("Add", [a, b], ch=self.ch[a])

    def mul(self, a, b):
        return self.op("Mul", [a, b], ch=self.ch[a])

    def concat(self, xs):
        return self.op("Concat", list(xs), {"axis": 1}, ch=sum(self.ch[x] for x in xs))

    def maxpool(self, x, k=2, s=2, p=0):
        return self.op("MaxPool", [x], {"kernel_shape": [k, k], "strides": [s, s], "pads": [p] * 4})

    def avgpool(self, x, k=2, s=2, p=0):
        return self.op("AveragePool", [x], {"kernel_shape": [k, k], "strides": [s, s], "pads": [p] * 4})

    def gap(self, x):
        return self.op("GlobalAveragePool", [x])

    def flatten(self, x, spatial: int = 1):
        return self.op("Flatten", [x], {"axis": 1}, ch=self.ch[x] * spatial)

    def gemm(self, x, cout: int, bias: bool = True):
        cin = self.ch[x]
        w = (self.rng.standard_normal((cout, cin)) * np.sqrt(2.0 / cin)).astype(np.float32)
        ins = [x, self.const(w, "fc_w")]
        if bias:
            ins.append(self.const((self.rng.standard_normal(cout) * 0.05).astype(np.float32), "fc_b"))
        return self.op("Gemm", ins, {"transB": 1}, ch=cout, prefix="fc")

    def cba(self, x, cout, k=3, s=1, g=1, act: str | None = "relu"):
        return self.act(self.bn(self.conv(x, cout, k, s, g)), act)

    def se(self, x, reduced: int, gate: str = "sigmoid", act: str = "relu"):
        s = self.gap(x)
        s = self.act(self.conv(s, reduced, 1, bias=True), act)
        s = self.conv(s, self.ch[x], 1, bias=True)
        s = self.hardsigmoid(s) if gate == "hardsigmoid" else self.sigmoid(s)
        return self.mul(x, s)

    def classifier(self, x, classes: int):
        return self.gemm(self.flatten(self.gap(x)), classes)

    def finish(self, out: ir.Value, calibrate: bool = True, hw: int | None = None) -> ir.Model:
        out.name = "logits"
        graph = ir.Graph(
            [self.input],
            [out],
            nodes=self.tape.nodes,
            initializers=self.tape.initializers,
            opset_imports={"": self.opset},
            name=self.name,
        )
        model = ir.Model(graph, ir_version=8, producer_name="onnxcc.models")
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass()(model)
        if calibrate:
            seed = int(self.rng.integers(1 << 30))
            calibrate_batchnorm(model, seed=seed)
            calibrate_head(model, seed=seed)
        return model


def calibrate_batchnorm(model: ir.Model, *, seed: int = 0, batch: int = 4) -> None:
    """Set BatchNorm running stats to the statistics of their inputs on random images.

    Done depth level by depth level (a BatchNorm is set once every BatchNorm
    upstream of it is), so the result equals running the network in training
    mode once.
    """
    import onnxruntime as ort

    bns = [n for n in model.graph if n.op_type == "BatchNormalization"]
    if not bns:
        return
    depth: dict[ir.Node, int] = {}
    for node in model.graph:  # nodes are in topological order
        ups = [depth.get(i.producer(), 0) for i in node.inputs if i is not None and i.producer() is not None]
        d = max(ups, default=0)
        depth[node] = d + 1 if node.op_type == "BatchNormalization" else d
    shape = [batch] + [d if isinstance(d, int) else batch for d in model.graph.inputs[0].shape.dims[1:]]
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    for level in sorted(set(depth[b] for b in bns)):
        todo = [b for b in bns if depth[b] == level]
        proto = ir.to_proto(model)
        names = [b.inputs[0].name for b in todo]
        for n in names:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
        sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
        outs = sess.run(names, {model.graph.inputs[0].name: x})
        for b, a in zip(todo, outs):
            axes = (0,) + tuple(range(2, a.ndim))
            b.inputs[3].const_value = ir.tensor(a.mean(axis=axes).astype(np.float32), name=b.inputs[3].name)
            b.inputs[4].const_value = ir.tensor(a.var(axis=axes).astype(np.float32) + 1e-3, name=b.inputs[4].name)


def calibrate_head(model: ir.Model, *, seed: int = 0, batch: int = 32) -> None:
    """Standardise the classifier's input features on random images.

    A random network's pooled features vary little from image to image, so its
    logits are dominated by a constant per class and every input gets the same
    top-1 class, which makes agreement metrics meaningless. Folding the feature
    mean/std into the final Gemm (as a trained head effectively does) gives
    logits that vary per input with zero mean per class.
    """
    from onnxcc.compiler.sessions import make_session

    head = model.graph.outputs[0].producer()
    if head is None or head.op_type != "Gemm":
        return
    feat = head.inputs[0]
    proto = ir.to_proto(model)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(feat.name, onnx.TensorProto.FLOAT, None))
    shape = [batch] + [d if isinstance(d, int) else batch for d in model.graph.inputs[0].shape.dims[1:]]
    x = np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)
    f = make_session(proto).run([feat.name], {model.graph.inputs[0].name: x})[0].reshape(batch, -1)
    mean, std = f.mean(0), f.std(0) + 1e-3
    w = head.inputs[1].const_value.numpy() / std[None, :]  # builders use transB=1
    b = -(w @ mean)
    head.inputs[1].const_value = ir.tensor(w.astype(np.float32), name=head.inputs[1].name)
    head.inputs[2].const_value = ir.tensor(b.astype(np.float32), name=head.inputs[2].name)


# --------------------------------------------------------------------------- families
def _scale(c: int, width: float, divisor: int = 4) -> int:
    return max(divisor, int(round(c * width / divisor)) * divisor)


PRESETS = {"tiny": dict(hw=32, width=0.125, classes=10), "small": dict(hw=64, width=0.25, classes=100), "full": dict(hw=224, width=1.0, classes=1000)}


def vgg(size: str = "tiny", seed: int = 0, cfg: Sequence = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"), hidden: int = 4096) -> ir.Model:
    p = PRESETS[size]
    pools = sum(1 for c in cfg if c == "M")
    hw = 7 * 2**pools  # a 7×7 map before the Flatten→Gemm head, as in VGG
    b = NetBuilder(f"vgg_{size}", hw, seed=seed)
    x = b.input
    for c in cfg:
        x = b.maxpool(x) if c == "M" else b.cba(x, _scale(c, p["width"]))
    x = b.flatten(x, spatial=49)
    h = _scale(hidden, p["width"], 8)
    x = b.relu(b.gemm(x, h))
    return b.finish(b.gemm(x, p["classes"]))


def resnet(size: str = "tiny", seed: int = 0, block: str = "basic", layers: Sequence[int] = (2, 2, 2, 2), groups: int = 1, base_width: int = 64) -> ir.Model:
    p = PRESETS[size]
    w = p["width"]
    b = NetBuilder(f"resnet_{block}_{size}", p["hw"], seed=seed)
    x = b.input
    if size == "full":
        x = b.maxpool(b.cba(x, _scale(64, w), 7, 2), 3, 2, 1)
    else:
        x = b.cba(x, _scale(64, w), 3, 1)
    expansion = 4 if block == "bottleneck" else 1
    for stage, n in enumerate(layers):
        planes = _scale(64 * 2**stage, w)
        for i in range(n):
            s = 2 if (i == 0 and stage > 0) else 1
            identity = x
            cout = planes * expansion
            if block == "basic":
                y = b.cba(x, planes, 3, s)
                y = b.cba(y, planes, 3, 1, act=None)
            else:
                mid = _scale(planes * base_width / 64, 1.0) * groups if groups > 1 else planes
                y = b.cba(x, mid, 1)
                y = b.cba(y, mid, 3, s, g=groups)
                y = b.cba(y, cout, 1, act=None)
            if s != 1 or b.ch[x] != cout:
                identity = b.cba(x, cout, 1, s, act=None)
            x = b.relu(b.add(y, identity))
    return b.finish(b.classifier(x, p["classes"]))


def resnext(size: str = "tiny", seed: int = 0) -> ir.Model:
    return resnet(size, seed, block="bottleneck", layers=(1, 1, 1, 1) if size == "tiny" else (3, 4, 6, 3), groups=4 if size == "tiny" else 32, base_width=4)


def mobilenet_v2(size: str = "tiny", seed: int = 0) -> ir.Model:
    p = PRESETS[size]
    w = p["width"] if size != "tiny" else 0.25
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    if size == "tiny":
        cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 1, 1)]
    b = NetBuilder(f"mobilenetv2_{size}", p["hw"], seed=seed)
    x = b.cba(b.input, _scale(32, w, 8), 3, 2 if size == "full" else 1, act="relu6")
    for t, c, n, s in cfg:
        cout = _scale(c, w, 8)
        for i in range(n):
            stride = s if i == 0 else 1
            cin = b.ch[x]
            y = x
            if t != 1:
                y = b.cba(y, cin * t, 1, act="relu6")
            y = b.cba(y, b.ch[y], 3, stride, g=b.ch[y], act="relu6")
            y = b.cba(y, cout, 1, act=None)
            x = b.add(x, y) if stride == 1 and cin == cout else y
    x = b.cba(x, _scale(1280, w, 8) if size != "tiny" else 128, 1, act="relu6")
    return b.finish(b.classifier(x, p["classes"]))


def _mbconv(b: NetBuilder, x, cout, k, s, expand, se_ratio, act, gate):
    cin = b.ch[x]
    y = x
    if expand != 1:
        y = b.cba(y, _scale(cin * expand, 1.0, 8), 1, act=act)
    y = b.cba(y, b.ch[y], k, s, g=b.ch[y], act=act)
    if se_ratio:
        y = b.se(y, max(8, _scale(b.ch[y] * se_ratio, 1.0, 8)), gate=gate, act="relu" if gate == "hardsigmoid" else "silu")
    y = b.cba(y, cout, 1, act=None)
    return b.add(x, y) if s == 1 and cin == cout else y


def mobilenet_v3(size: str = "tiny", seed: int = 0) -> ir.Model:
    p = PRESETS[size]
    w = p["width"] if size != "tiny" else 0.25
    # (kernel, expand, out, se, act, stride) — MobileNetV3-Large
    cfg = [(3, 1, 16, 0, "relu", 1), (3, 4, 24, 0, "relu", 2), (3, 3, 24, 0, "relu", 1), (5, 3, 40, 0.25, "relu", 2),
           (5, 3, 40, 0.25, "relu", 1), (3, 6, 80, 0, "hardswish", 2), (3, 2.5, 80, 0, "hardswish", 1),
           (3, 6, 112, 0.25, "hardswish", 1), (5, 6, 160, 0.25, "hardswish", 2), (5, 6, 160, 0.25, "hardswish", 1)]
    if size == "tiny":
        cfg = cfg[:2] + cfg[3:4] + cfg[5:6] + cfg[7:9]
    b = NetBuilder(f"mobilenetv3_{size}", p["hw"], seed=seed)
    x = b.cba(b.input, _scale(16, w, 8), 3, 2 if size == "full" else 1, act="hardswish")
    for k, e, c, se, act, s in cfg:
        x = _mbconv(b, x, _scale(c, w, 8), k, s, e, se, act, "hardsigmoid")
    x = b.cba(x, _scale(960, w, 8), 1, act="hardswish")
    return b.finish(b.classifier(x, p["classes"]))


def efficientnet(size: str = "tiny", seed: int = 0) -> ir.Model:
    p = PRESETS[size]
    w = p["width"] if size != "tiny" else 0.25
    # (expand, out, repeats, stride, kernel) — EfficientNet-B0
    cfg = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5), (6, 192, 4, 2, 5), (6, 320, 1, 1, 3)]
    if size == "tiny":
        cfg = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 1, 2, 5), (6, 80, 1, 2, 3)]
    b = NetBuilder(f"efficientnet_{size}", p["hw"], seed=seed)
    x = b.cba(b.input, _scale(32, w, 8), 3, 2 if size == "full" else 1, act="silu")
    for e, c, n, s, k in cfg:
        for i in range(n):
            x = _mbconv(b, x, _scale(c, w, 8), k, s if i == 0 else 1, e, 0.25 / e if e != 1 else 0.25, "silu", "sigmoid")
    x = b.cba(x, _scale(1280, w, 8), 1, act="silu")
    return b.finish(b.classifier(x, p["classes"]))


def densenet(size: str = "tiny", seed: int = 0) -> ir.Model:
    p = PRESETS[size]
    growth = 32 if size == "full" else 8
    blocks = (6, 12, 24, 16) if size == "full" else (3, 3, 3)
    b = NetBuilder(f"densenet_{size}", p["hw"], seed=seed)
    x = b.input
    if size == "full":
        x = b.maxpool(b.cba(x, 2 * growth, 7, 2), 3, 2, 1)
    else:
        x = b.cba(x, 2 * growth, 3, 1)
    for i, n in enumerate(blocks):
        for _ in range(n):
            y = b.conv(b.relu(b.bn(x)), 4 * growth, 1)  # pre-activation: BN that cannot fold backwards
            y = b.conv(b.relu(b.bn(y)), growth, 3)
            x = b.concat([x, y])
        if i != len(blocks) - 1:
            x = b.avgpool(b.conv(b.relu(b.bn(x)), b.ch[x] // 2, 1))
    x = b.relu(b.bn(x))
    return b.finish(b.classifier(x, p["classes"]))


def inception(size: str = "tiny", seed: int = 0) -> ir.Model:
    p = PRESETS[size]
    w = p["width"] if size != "tiny" else 0.25
    b = NetBuilder(f"inception_{size}", p["hw"], seed=seed)
    x = b.input
    if size == "full":
        x = b.maxpool(b.cba(x, 64, 7, 2), 3, 2, 1)
        x = b.maxpool(b.cba(b.cba(x, 64, 1), 192, 3), 3, 2, 1)
    else:
        x = b.cba(x, _scale(64, w), 3)
    cfgs = [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "M", (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64)]
    if size == "tiny":
        cfgs = cfgs[:3] + cfgs[3:4]
    for c in cfgs:
        if c == "M":
            x = b.maxpool(x, 3, 2, 1)
            continue
        c1, r3, c3, r5, c5, pp = (_scale(v, w) for v in c)
        b1 = b.cba(x, c1, 1)
        b2 = b.cba(b.cba(x, r3, 1), c3, 3)
        b3 = b.cba(b.cba(b.cba(x, r5, 1), c5, 3), c5, 3)
        b4 = b.cba(b.maxpool(x, 3, 1, 1), pp, 1)
        x = b.concat([b1, b2, b3, b4])
    return b.finish(b.classifier(x, p["classes"]))


FAMILIES: dict[str, Callable[..., ir.Model]] = {
    "vgg": vgg,
    "resnet": resnet,
    "resnet_bottleneck": lambda size="tiny", seed=0: resnet(size, seed, block="bottleneck", layers=(1, 1, 1, 1) if size == "tiny" else (3, 4, 6, 3)),
    "resnext": resnext,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3": mobilenet_v3,
    "efficientnet": efficientnet,
    "densenet": densenet,
    "inception": inception,
}


def build(family: str, size: str = "tiny", seed: int = 0) -> ir.Model:
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if family == "vgg" and size == "tiny":
        return vgg(size, seed, cfg=(64, "M", 128, "M", 256, "M"), hidden=512)
    if family == "vgg" and size == "small":
        return vgg(size, seed, cfg=(64, "M", 128, "M", 256, 256, "M", 512, "M"), hidden=1024)
    return FAMILIES[family](size=size, seed=seed)
