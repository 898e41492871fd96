"""Training on the graph itself (the optional ``train`` extra: torch).

``bridge`` runs an ``onnx_ir`` model as a torch module whose weights are parameters and writes
them back; ``ops`` is its operator table; ``distill`` is the pass (knowledge distillation, and
through the bridge's fake quantization also QAT and binary/ternary/codebook training). Nothing in
the core imports this package; the pass module imports torch only when it runs.
"""
