"""onnxcc passes, one module per rewrite family. Importing this package registers them."""

from passes import compression, factorization, fold, pruning, quantization  # noqa: F401
