"""Small CNNs trained on real data that ships with scikit-learn (the 8×8 digits), for accuracy measurements.

Random-weight networks say nothing about accuracy: pruning or quantizing them
is chaotic. These models are trained in seconds on CPU under the ``torch``
extra and exported with the legacy exporter, BatchNorm unfolded (as users
export them). Used by the slow tests and by ``benchmarks/recovery.py``.

``digits()`` returns (x_train, y_train, x_calib, x_test, y_test): 1 × 8 × 8
float32 images scaled to [0, 1] then standardised, a fixed seeded split.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np


@functools.lru_cache(maxsize=1)
def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0 - 0.3) / 0.4
    x = x[:, None, :, :]
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    train, calib, test = idx[:1197], idx[1197:1297], idx[1297:]
    return x[train], y[train], x[calib], x[test], y[test]


def _nets():
    import torch.nn as nn

    from onnxcc.models.make_sample import layers

    cbr, Block = layers()

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(cbr(1, 32), Block(32, 32, 1), Block(32, 64, 2), Block(64, 64, 1), Block(64, 128, 2))
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))

    class InvRes(nn.Module):
        """Inverted residual: 1x1 expand, depthwise k x k, optional squeeze-excite, 1x1 project."""

        def __init__(self, cin, cout, s, t=4, k=3, act=nn.ReLU6, se=False):
            super().__init__()
            h = cin * t
            layers = [cbr(cin, h, 1, act=act), cbr(h, h, k, s, g=h, act=act)] + ([SE(h)] if se else []) + [cbr(h, cout, 1, act=None)]
            self.body = nn.Sequential(*layers)
            self.res = s == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.res else y

    class SE(nn.Module):
        def __init__(self, c, r=4):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

        def forward(self, x):
            s = nn.functional.adaptive_avg_pool2d(x, 1)
            return x * nn.functional.hardsigmoid(self.fc2(nn.functional.relu(self.fc1(s))))

    class MobileNetV2(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                cbr(1, 32, act=nn.ReLU6), InvRes(32, 24, 1), InvRes(24, 24, 1), InvRes(24, 48, 2), InvRes(48, 48, 1),
                InvRes(48, 96, 2), cbr(96, 256, 1, act=nn.ReLU6),
            )
            self.fc = nn.Linear(256, 10)

        def forward(self, x):
            return self.fc(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

    class MobileNetV3(nn.Module):
        """Depthwise 3x3 and 5x5, squeeze-excite, Hardswish/Hardsigmoid: the quantization-hard family."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                cbr(1, 16, act=nn.Hardswish), InvRes(16, 24, 1, act=nn.Hardswish), *(InvRes(cin, cout, s, k=k, act=nn.Hardswish, se=True)
                for cin, cout, k, s in ((24, 24, 3, 1), (24, 40, 5, 2), (40, 40, 5, 1), (40, 80, 3, 2))), cbr(80, 192, 1, act=nn.Hardswish),
            )
            self.fc = nn.Linear(192, 10)

        def forward(self, x):
            return self.fc(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))

    class VGG(nn.Module):
        """Plain 3×3 conv stack on the digits upsampled to 32×32 (≈38 M MACs): the factorization target."""

        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                nn.Upsample(scale_factor=4, mode="nearest"),
                cbr(1, 32), cbr(32, 32), nn.MaxPool2d(2), cbr(32, 64), cbr(64, 64), nn.MaxPool2d(2), cbr(64, 128), cbr(128, 128),
            )
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))

    return {"resnet": ResNet, "mobilenet_v2": MobileNetV2, "mobilenet_v3": MobileNetV3, "vgg": VGG}


@functools.lru_cache(maxsize=None)
def trained_module(name: str, epochs: int | None = None, seed: int = 0):
    """Train ``name`` on digits; returns (torch module in eval mode, torch test accuracy). Cached per process."""
    import torch

    epochs = epochs or (8 if name == "vgg" else 30)  # the VGG is ~10x the MACs of the others
    from onnxcc.models.make_sample import fit

    x_tr, y_tr, _, x_te, y_te = digits()
    torch.manual_seed(seed)  # the initial weights
    net = fit(_nets()[name](), x_tr, y_tr, epochs, seed)
    net.eval()
    with torch.no_grad():
        acc = float((net(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean())
    return net, acc


def nets():
    """The network classes by name (untrained), for benchmarks that train on other data."""
    return _nets()


@functools.lru_cache(maxsize=None)
def trained(name: str, epochs: int | None = None, seed: int = 0) -> tuple[Path, float]:
    """Train ``name`` on digits, export it; returns (ONNX path, torch test accuracy). Cached per process."""
    import copy

    net, acc = trained_module(name, epochs, seed)
    from tests.torch_zoo import export

    path = Path(tempfile.mkdtemp(prefix="onnxcc-trained-")) / f"digits_{name}.onnx"
    export(copy.deepcopy(net), 8, path, dynamo=False, optimize=False, channels=1)
    return path, acc
