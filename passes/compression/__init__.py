"""Storage compression: magnitude sparsity and codebook weight sharing (files shrink, onnxruntime runs them as is)."""
