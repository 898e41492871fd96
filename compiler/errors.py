"""Errors that onnxcc reports to its users, each with the exit code the CLI uses.

Exit codes: 0 success, 1 verification or budget failure, 2 bad input, 3 internal error (a bug
in onnxcc, never the input's fault; CI pipelines can tell it from a model that failed its budget).
"""

from __future__ import annotations


class OnnxccError(Exception):
    """Base class: a one-line message meant for the user, plus an exit code."""

    exit_code = 1

    def __init__(self, message: str):
        # Keep messages on one line: users grep logs and CI shows the last line.
        super().__init__(" ".join(str(message).split()))


class BadInputError(OnnxccError):
    """The model, data, options or output path cannot be used (exit 2)."""

    exit_code = 2


class ModelRejectedError(BadInputError):
    """onnxruntime cannot load or run a model (exit 2 for the user's model; the pipeline turns
    it into the pass's :class:`VerificationError` when the model is one onnxcc made)."""


class VerificationError(OnnxccError):
    """A pass produced a model that does not agree with its input (exit 1)."""

    exit_code = 1


class BudgetError(OnnxccError):
    """A lossy pass went over the accuracy/agreement budget (exit 1)."""

    exit_code = 1


INTERNAL_ERROR_EXIT = 3  # any other exception: a bug in onnxcc
