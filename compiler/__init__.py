"""onnxcc's core services, pipeline, API, CLI and reports (installed as ``onnxcc.compiler``).

Importing this package imports nothing else: each module is loaded when it is
used, so low-level helpers (``onnxcc.compiler.ir_utils``) stay free of
onnxruntime and of the passes. The public API is the top-level ``onnxcc``.
"""
