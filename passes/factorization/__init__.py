"""Factorization: low-rank and depthwise-separable replacements for Conv, Gemm and MatMul."""
