"""Storage compression: magnitude sparsity and codebook weight sharing (files shrink, onnxruntime runs them as is)."""

from passes.compression.codebook import CodebookPass  # noqa: F401
from passes.compression.sparsify import SparsifyPass  # noqa: F401
