"""Train the bundled sample once and write it with its data (``python -m models.make_sample``).

Needs the ``torch`` extra and scikit-learn (its bundled 8×8 digits: no download). The README's
quick start compiles what this writes, so it is committed; rerunning it gives the same files
up to float rounding of the training (seeded, 2 threads).

* ``sample_resnet.onnx``: a ResNet-style CNN (3 stages of basic blocks, 0.68 M parameters, BatchNorm unfolded, as
  frameworks export it; dynamic batch) on the digits upscaled to 1×32×32, trained to ~98% on
  held-out digits; legacy torch exporter, opset 17;
* ``sample_calib.npy``: 100 calibration inputs (their own split, never trained on);
* ``sample_eval.npy`` + ``sample_labels.npy``: 400 held-out labelled inputs, for ``--data`` and
  ``--labels``: the accuracy before and after, and what ``--budget`` bounds;
* ``sample_images/``: the first 32 evaluation digits as 32×32 grayscale PNGs, an image-folder
  calibration set (see the README: ``--calib models/sample_images`` with ``--mean 0.3 --std 0.4``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SIZE = 32
MEAN, STD = 0.3, 0.4  # the sample's input is (pixel in [0, 1] - MEAN) / STD


def data(seed: int = 0):
    """(x_train, y_train, x_calib, x_eval, y_eval): 1×32×32 float32, standardised."""
    import torch
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32)[:, None] / 16.0)
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1).numpy()
    x = (x - MEAN) / STD
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    train, calib, ev = idx[:1297], idx[1297:1397], idx[1397:]
    return x[train], y[train], x[calib], x[ev], y[ev]


def layers():
    """``cbr`` (conv → BatchNorm → activation) and the residual basic ``Block``, as torch modules;
    shared with the trained test networks (tests/trained.py)."""
    import torch.nn as nn

    def cbr(cin, cout, k=3, s=1, g=1, act=nn.ReLU):
        mods = [nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*mods, *([act()] if act is not None else []))

    class Block(nn.Module):
        def __init__(self, cin, cout, s):
            super().__init__()
            self.body = nn.Sequential(cbr(cin, cout, 3, s), cbr(cout, cout, 3, 1, act=None))
            self.short = nn.Identity() if s == 1 and cin == cout else cbr(cin, cout, 1, s, act=None)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.body(x) + self.short(x))

    return cbr, Block


def net():
    import torch.nn as nn

    cbr, Block = layers()

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                cbr(1, 32), Block(32, 32, 1), Block(32, 64, 2), Block(64, 64, 1), Block(64, 128, 2), Block(128, 128, 1),
            )
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(self.features(x).mean((2, 3)))

    return ResNet()


def fit(model, x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0, shift: int = 0, on_epoch=None):
    """AdamW with a one-cycle schedule, batches of 64, light input noise (a less brittle net) and,
    with ``shift``, random translations by up to that many pixels; 2 torch threads, seeded.
    Shared with the trained test networks (tests/trained.py)."""
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * -(-len(x) // 64))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 64):
            j = perm[i:i + 64]
            xb = xt[j]
            if shift:
                dx, dy = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=g))
                xb = torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
            xb = xb + 0.1 * torch.randn(xt[j].shape, generator=g)
            loss = torch.nn.functional.cross_entropy(model(xb), yt[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        if on_epoch is not None:
            on_epoch(epoch, float(loss.item()))
    return model


def train(epochs: int = 12, seed: int = 0):
    import torch

    x_tr, y_tr, _, x_ev, y_ev = data()

    def held_out() -> float:
        with torch.no_grad():
            return float((model(torch.from_numpy(x_ev)).argmax(1).numpy() == y_ev).mean())

    def report(epoch: int, loss: float) -> None:
        print(f"epoch {epoch + 1}/{epochs}: loss {loss:.3f}, held-out accuracy {held_out():.4f}", flush=True)

    torch.manual_seed(seed)  # the initial weights
    model = fit(net(), x_tr, y_tr, epochs, seed, shift=2, on_epoch=report)
    return model, held_out()


def main() -> None:
    import torch
    from PIL import Image

    model, acc = train()
    _, _, x_cal, x_ev, y_ev = data()
    torch.onnx.export(
        model, (torch.from_numpy(x_cal[:1]),), str(HERE / "sample_resnet.onnx"), dynamo=False, opset_version=17,
        input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=False,  # BatchNorm stays a node, as frameworks export it
    )
    np.save(HERE / "sample_calib.npy", x_cal.astype(np.float32))
    np.save(HERE / "sample_eval.npy", x_ev.astype(np.float32))
    np.save(HERE / "sample_labels.npy", y_ev.astype(np.int64))
    folder = HERE / "sample_images"
    folder.mkdir(exist_ok=True)
    for i in range(32):
        pixels = np.clip((x_ev[i, 0] * STD + MEAN) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:03d}_label{y_ev[i]}.png")
    print(f"wrote the sample: held-out accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
