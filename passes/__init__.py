"""onnxcc passes, one module or package per rewrite family (installed as ``onnxcc.passes``).

:data:`PASSES` is the list of shipped passes, as data: the registry
(:mod:`onnxcc.compiler.registry`) imports each entry when a pass is first looked
up, so importing one pass module never imports the others.
"""

PASSES: tuple[str, ...] = (
    "onnxcc.passes.fold:FoldPass",
    "onnxcc.passes.pruning.prune:PrunePass",
    "onnxcc.passes.factorization.factorize:FactorizePass",
    "onnxcc.passes.compression.sparsify:SparsifyPass",
    "onnxcc.passes.compression.codebook:CodebookPass",
    "onnxcc.passes.quantization.equalize:EqualizePass",
    "onnxcc.passes.quantization.lower:LowerInt8Pass",
    "onnxcc.passes.quantization.qdq:QuantizePass",
    "onnxcc.passes.quantization.dynamic:DynamicQuantizePass",
    "onnxcc.passes.quantization.weights:WeightOnlyPass",
    "onnxcc.passes.training.distill:DistillPass",
)
