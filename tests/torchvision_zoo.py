"""torchvision's own architectures, exported by both torch exporters (benchmarks and slow tests).

PyPI's torchvision wheel cannot load its C++ ops beside the CPU build of torch installed here
("operator torchvision::nms does not exist" at import). The models themselves are plain torch; only
the detection post-processing calls those ops. :func:`import_torchvision` declares the two op
schemas torchvision's import registers fake kernels for (``nms``, ``qnms``) when its extension did
not load, so the package imports; calling them still fails, and no model here does (SSDlite is
exported without its NMS post-processing: box regression and class logits, as a deployed detector's
graph ends). No weights are downloaded (``weights=None``): BatchNorm statistics and scales are
randomised as after training (``torch_zoo.trained_bn_stats``), so shapes, graphs and node counts are
torchvision's, but accuracies are not.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

_LIB = None


def import_torchvision():
    """torchvision, importable beside a CPU torch whose ABI its C++ ops were not built for."""
    global _LIB
    try:
        import torchvision

        return torchvision
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    import sys

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - declared once per process
        _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision

    return torchvision


class _Out(nn.Module):
    """A segmentation model's ``out`` tensor (torchvision returns a dict)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


class _SSDHead(nn.Module):
    """SSD's backbone and head: (box regression, class logits), without anchors and NMS."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone, self.head = model.backbone, model.head

    def forward(self, x):
        feats = list(self.backbone(x).values())
        out = self.head(feats)
        return out["bbox_regression"], out["cls_logits"]


def _models():
    tv = import_torchvision()
    M = tv.models
    return {
        "shufflenet_v2": (lambda: M.shufflenet_v2_x1_0(weights=None), 224, ["logits"]),
        "mobilenet_v3_large": (lambda: M.mobilenet_v3_large(weights=None), 224, ["logits"]),
        "convnext_tiny": (lambda: M.convnext_tiny(weights=None), 224, ["logits"]),
        "lraspp_mobilenet_v3": (lambda: _Out(M.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)), 224, ["out"]),
        "deeplabv3_mobilenet_v3": (lambda: _Out(M.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None)), 224, ["out"]),
        "ssdlite320": (lambda: _SSDHead(M.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)), 320, ["boxes", "scores"]),
    }


NAMES = ["shufflenet_v2", "mobilenet_v3_large", "convnext_tiny", "lraspp_mobilenet_v3", "deeplabv3_mobilenet_v3", "ssdlite320"]


def make(name: str, seed: int = 0) -> tuple[nn.Module, int, list[str]]:
    from tests.torch_zoo import trained_bn_stats

    torch.manual_seed(seed)
    ctor, hw, outputs = _models()[name]
    return trained_bn_stats(ctor(), seed), hw, outputs


def export(name: str, path: str | Path, *, dynamo: bool, batch: int = 2, seed: int = 0) -> Path:
    """The raw export (no exporter-side optimisation) with a dynamic batch axis."""
    module, hw, outputs = make(name, seed)
    path = Path(path)
    x = torch.randn(batch, 3, hw, hw)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(module, (x,), dynamo=True, input_names=["input"], output_names=outputs,
                                     dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=1024)}}, optimize=False, verbose=False)
            prog.save(str(path))
        else:
            torch.onnx.export(module, (x,), str(path), dynamo=False, input_names=["input"], output_names=outputs,
                              dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}}, opset_version=17,
                              do_constant_folding=False)
    return path
