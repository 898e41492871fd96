"""onnxcc: an ONNX graph-rewriting compiler for convolutional networks.

The public API::

    import onnxcc
    result = onnxcc.compile_model("model.onnx", recipe="int8-x86", calibration="calib.npz", budget=1.0)

The implementation lives in two subpackages, :mod:`onnxcc.compiler` (core
services, pipeline, API, CLI, reports) and :mod:`onnxcc.passes` (one module or
package per rewrite family); their layers are described in ARCHITECTURE.md.
Names are resolved lazily (PEP 562), so ``import onnxcc.compiler.ir_utils``
does not load onnxruntime or any pass.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__version__ = "0.1.0"

# In the repository the subpackages sit beside this folder (compiler/, passes/,
# models/ at the top, as the product's layout fixes them); an installed copy has
# them inside it. Running from a source tree without installing finds them too.
_here = os.path.dirname(os.path.abspath(__file__))
_repo = os.path.dirname(_here)
if not os.path.isdir(os.path.join(_here, "compiler")) and os.path.isfile(os.path.join(_repo, "compiler", "pipeline.py")):
    __path__.append(_repo)  # type: ignore[name-defined]  # noqa: F821

_PUBLIC = {
    "CompileResult": "onnxcc.compiler.api",
    "compile_model": "onnxcc.compiler.api",
    "shipped_recipes": "onnxcc.compiler.api",
    "CalibrationSet": "onnxcc.compiler.calibration",
    "BadInputError": "onnxcc.compiler.errors",
    "BudgetError": "onnxcc.compiler.errors",
    "OnnxccError": "onnxcc.compiler.errors",
    "VerificationError": "onnxcc.compiler.errors",
    "load_model": "onnxcc.compiler.ir_utils",
    "save_model": "onnxcc.compiler.ir_utils",
    "Budget": "onnxcc.compiler.pipeline",
    "PassSpec": "onnxcc.compiler.pipeline",
    "Pipeline": "onnxcc.compiler.pipeline",
    "PipelineResult": "onnxcc.compiler.pipeline",
    "load_recipe": "onnxcc.compiler.pipeline",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxcc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
