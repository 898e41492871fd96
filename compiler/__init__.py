"""onnxcc: an ONNX graph-rewriting compiler for convolutional networks."""

from compiler.api import CompileResult, compile_model, shipped_recipes
from compiler.calibration import CalibrationSet
from compiler.errors import BadInputError, BudgetError, OnnxccError, VerificationError
from compiler.ir_utils import load_model, save_model
from compiler.pipeline import Budget, PassSpec, Pipeline, PipelineResult, load_recipe

__all__ = [
    "BadInputError",
    "Budget",
    "BudgetError",
    "CalibrationSet",
    "CompileResult",
    "OnnxccError",
    "PassSpec",
    "Pipeline",
    "PipelineResult",
    "VerificationError",
    "compile_model",
    "load_model",
    "load_recipe",
    "save_model",
    "shipped_recipes",
]
__version__ = "0.1.0"
