"""Small PyTorch networks in the styles of the torchvision families, and their export.

Used by tests and benchmarks under the optional ``torch`` extra. Each network
is exported with both exporters because their graphs differ: the legacy
TorchScript exporter (``dynamo=False``: Identity/Constant nodes, Flatten, opset
17) and the default dynamo exporter (``dynamo=True``: Reshape chains,
ReduceMean, Gelu, opset 18+).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def trained_bn_stats(m: nn.Module, seed: int) -> nn.Module:
    """Give BatchNorms non-trivial running stats and scales, as after training."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, (nn.BatchNorm2d, nn.BatchNorm1d)):
            n = mod.num_features
            mod.weight.data = torch.rand(n, generator=g) * 1.5 + 0.25
            mod.bias.data = torch.randn(n, generator=g) * 0.2
            mod.running_mean.data = torch.randn(n, generator=g) * 0.2
            mod.running_var.data = torch.rand(n, generator=g) + 0.5
        if isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
            mod.weight.data = torch.rand(mod.weight.shape, generator=g) + 0.5
            mod.bias.data = torch.randn(mod.bias.shape, generator=g) * 0.1
    return m.eval()


def cbr(cin, cout, k=3, s=1, g=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, s):
        super().__init__()
        self.a = cbr(cin, cout, 3, s)
        self.b = cbr(cout, cout, 3, 1, act=None)
        self.down = cbr(cin, cout, 1, s, act=None) if s != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.b(self.a(x)) + self.down(x))


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, cout, s, groups=1, se=False):
        super().__init__()
        self.a = cbr(cin, mid, 1)
        self.b = cbr(mid, mid, 3, s, g=groups)
        self.se = SE(mid, max(4, mid // 4)) if se else nn.Identity()
        self.c = cbr(mid, cout, 1, act=None)
        self.down = cbr(cin, cout, 1, s, act=None) if s != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.c(self.se(self.b(self.a(x)))) + self.down(x))


class SE(nn.Module):
    def __init__(self, c, r, gate=nn.Sigmoid, act=nn.ReLU):
        super().__init__()
        self.fc1 = nn.Conv2d(c, r, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(r, c, 1)
        self.gate = gate()

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


class ResNet(nn.Module):
    def __init__(self, block="basic", widths=(16, 32, 64, 128), depth=(2, 2, 2, 2), groups=1, se=False, classes=10):
        super().__init__()
        self.stem = cbr(3, widths[0], 3)
        layers, cin = [], widths[0]
        for i, (w, d) in enumerate(zip(widths, depth)):
            for j in range(d):
                s = 2 if (j == 0 and i > 0) else 1
                if block == "basic":
                    layers.append(BasicBlock(cin, w, s))
                    cin = w
                else:
                    mid = w if groups == 1 else max(groups, w // 2 // groups * groups)
                    layers.append(Bottleneck(cin, mid, w * (4 if groups == 1 else 2), s, groups, se))
                    cin = w * (4 if groups == 1 else 2)
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, s, t, k=3, se=False, act=nn.ReLU6, gate=nn.Hardsigmoid):
        super().__init__()
        mid = cin * t
        layers = [cbr(cin, mid, 1, act=act)] if t != 1 else []
        layers.append(cbr(mid, mid, k, s, g=mid, act=act))
        if se:
            layers.append(SE(mid, max(8, mid // 4), gate=gate, act=nn.ReLU if gate is nn.Hardsigmoid else nn.SiLU))
        layers.append(cbr(mid, cout, 1, act=None))
        self.body = nn.Sequential(*layers)
        self.res = s == 1 and cin == cout

    def forward(self, x):
        y = self.body(x)
        return x + y if self.res else y


class MobileNet(nn.Module):
    def __init__(self, version=2, classes=10):
        super().__init__()
        if version == 2:
            act, cfg, gate = nn.ReLU6, [(1, 16, 1, 1, 3, False), (6, 24, 2, 2, 3, False), (6, 32, 2, 2, 3, False), (6, 64, 2, 2, 3, False)], nn.Hardsigmoid
        elif version == 3:
            act, cfg, gate = nn.Hardswish, [(1, 16, 1, 1, 3, True), (4, 24, 2, 2, 3, False), (3, 40, 2, 2, 5, True), (6, 80, 1, 2, 3, True)], nn.Hardsigmoid
        else:  # EfficientNet-style
            act, cfg, gate = nn.SiLU, [(1, 16, 1, 1, 3, True), (6, 24, 2, 2, 3, True), (6, 40, 2, 2, 5, True), (6, 80, 1, 2, 3, True)], nn.Sigmoid
        self.stem = cbr(3, 16, 3, 1, act=act)
        layers, cin = [], 16
        for t, c, n, s, k, se in cfg:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t, k, se, act, gate))
                cin = c
        self.layers = nn.Sequential(*layers)
        self.head = cbr(cin, 128, 1, act=act)
        self.fc = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, classes))

    def forward(self, x):
        x = self.head(self.layers(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DenseNet(nn.Module):
    def __init__(self, growth=8, blocks=(3, 3), classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 2 * growth, 3, 1, 1, bias=False)
        self.blocks = nn.ModuleList()
        self.trans = nn.ModuleList()
        c = 2 * growth
        for i, n in enumerate(blocks):
            layers = nn.ModuleList()
            for _ in range(n):
                layers.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 4 * growth, 1, bias=False),
                                            nn.BatchNorm2d(4 * growth), nn.ReLU(), nn.Conv2d(4 * growth, growth, 3, 1, 1, bias=False)))
                c += growth
            self.blocks.append(layers)
            if i != len(blocks) - 1:
                self.trans.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)))
                c //= 2
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            for layer in block:
                x = torch.cat([x, layer(x)], 1)
            if i < len(self.trans):
                x = self.trans[i](x)
        x = F.relu(self.norm(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Inception(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = cbr(3, 16, 3)

        def block(cin, c1, r3, c3, r5, c5, pp):
            return nn.ModuleList([cbr(cin, c1, 1), nn.Sequential(cbr(cin, r3, 1), cbr(r3, c3, 3)),
                                  nn.Sequential(cbr(cin, r5, 1), cbr(r5, c5, 3), cbr(c5, c5, 3)),
                                  nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(cin, pp, 1))])

        self.b1 = block(16, 8, 12, 16, 4, 8, 8)
        self.b2 = block(40, 16, 16, 24, 4, 12, 12)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([m(x) for m in self.b1], 1)
        x = F.max_pool2d(x, 3, 2, 1)
        x = torch.cat([m(x) for m in self.b2], 1)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ShuffleUnit(nn.Module):
    def __init__(self, c):
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(cbr(half, half, 1), cbr(half, half, 3, g=half, act=None), cbr(half, half, 1))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = cbr(3, 32, 3, 2)
        self.units = nn.Sequential(ShuffleUnit(32), ShuffleUnit(32))
        self.head = cbr(32, 64, 1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.head(self.units(self.stem(x)))
        return self.fc(x.mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, 1, 3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1 = nn.Linear(c, 4 * c)
        self.pw2 = nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        return x + y


class ConvNeXt(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, 4)
        self.blocks = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(self.norm(x.mean((2, 3))))


class VGG(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(cbr(3, 16), nn.MaxPool2d(2), cbr(16, 32), nn.MaxPool2d(2), cbr(32, 64), cbr(64, 64), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Dropout(), nn.Linear(128, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


ZOO = {
    "resnet18": (lambda: ResNet("basic"), 32),
    "resnet50": (lambda: ResNet("bottleneck", widths=(8, 16, 32, 64), depth=(1, 2, 2, 1)), 32),
    "mobilenet_v2": (lambda: MobileNet(2), 32),
    "mobilenet_v3": (lambda: MobileNet(3), 32),
    "efficientnet": (lambda: MobileNet(0), 32),
    "densenet": (lambda: DenseNet(), 32),
    "inception": (lambda: Inception(), 32),
    "regnet": (lambda: ResNet("bottleneck", widths=(16, 32, 64, 64), depth=(1, 1, 1, 1), groups=4, se=True), 32),
    "shufflenet": (lambda: ShuffleNet(), 32),
    "convnext": (lambda: ConvNeXt(), 32),
    "vgg": (lambda: VGG(), 56),
}


def make(name: str, seed: int = 0) -> tuple[nn.Module, int]:
    torch.manual_seed(seed)
    ctor, hw = ZOO[name]
    return trained_bn_stats(ctor(), seed), hw


def export(module: nn.Module, hw: int, path: str | Path, *, dynamo: bool, opset: int | None = None, batch: int = 2, optimize: bool = True, channels: int = 3) -> Path:
    """Export with a dynamic batch axis; returns ``path``.

    ``optimize=False`` keeps the exporter's raw graph (BatchNorm, Identity and
    Constant nodes, unfolded shape chains), which is what the fold pass must clean.
    """
    path = Path(path)
    x = torch.randn(batch, channels, hw, hw)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            batch_dim = torch.export.Dim("batch", min=1, max=1024)
            prog = torch.onnx.export(
                module, (x,), dynamo=True, input_names=["input"], output_names=["logits"],
                dynamic_shapes={"x": {0: batch_dim}}, opset_version=opset, verbose=False, optimize=optimize,
            )
            prog.save(str(path))
        else:
            torch.onnx.export(
                module, (x,), str(path), dynamo=False, input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset or 17,
                do_constant_folding=optimize,
            )
    return path



def apply_structured_masks(module: nn.Module, amount: float = 0.3, *, mask_bn: bool = True) -> int:
    """Prune ``amount`` of the output channels of every conv and hidden linear layer in torch, then make it permanent.

    ``torch.nn.utils.prune.ln_structured`` (L2, dim 0) masks whole filters;
    with ``mask_bn`` the BatchNorm right after a masked conv has the same
    channels' γ and β zeroed, as channel-pruning tools do before physical
    removal. ``prune.remove`` bakes the masks into the weights, which is what
    gets exported. The classifier (last Linear) is left alone. Returns the number of filters zeroed.
    """
    from torch.nn.utils import prune

    mods = list(module.modules())
    linears = [m for m in mods if isinstance(m, nn.Linear)]
    zeroed = 0
    for i, m in enumerate(mods):
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or (linears and m is linears[-1]):
            continue
        prune.ln_structured(m, "weight", amount=amount, n=2, dim=0)
        prune.remove(m, "weight")
        dead = (m.weight.detach().reshape(m.weight.shape[0], -1).abs().sum(1) == 0).nonzero().flatten()
        zeroed += len(dead)
        if m.bias is not None:
            m.bias.data[dead] = 0
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        if mask_bn and isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == m.weight.shape[0]:
            nxt.weight.data[dead] = 0
            nxt.bias.data[dead] = 0
    return zeroed
