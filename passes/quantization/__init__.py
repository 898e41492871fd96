"""INT8 quantization: QDQ placement for onnxruntime, calibration ranges, fusion check."""
