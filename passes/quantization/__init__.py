"""INT8 quantization: QDQ placement for onnxruntime, calibration ranges, fusion check."""

from passes.quantization.dynamic import DynamicQuantizePass  # noqa: F401
from passes.quantization.equalize import EqualizePass  # noqa: F401
from passes.quantization.qdq import QuantizePass  # noqa: F401
from passes.quantization.weights import WeightOnlyPass  # noqa: F401
