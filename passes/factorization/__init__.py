"""Factorization: low-rank and depthwise-separable replacements for Conv, Gemm and MatMul."""

from passes.factorization.factorize import FactorizePass  # noqa: F401
