"""Errors of the compression pipeline: every one says what was wrong and is permanent (the same
input fails the same way) unless it says otherwise."""

from __future__ import annotations

from edgefed.common.errors import ConfigError, PermanentError


class CompressionError(PermanentError):
    """Base of compression errors."""

    exit_code = 65  # EX_DATAERR


class TeacherError(CompressionError):
    """The teacher directory is missing, is not a Hugging Face model, or does not fit the task."""


class DataError(CompressionError):
    """The distillation data is missing, empty or malformed (the message names file and line)."""


class StudentError(CompressionError):
    """The requested student cannot be built from this teacher (depth, layer indices)."""


class UnknownTargetError(ConfigError):
    """A device target profile that edgefed does not know."""


class ExportError(CompressionError):
    """Optimum could not export the model, or the ONNX outputs do not match torch."""


class QuantizationError(CompressionError):
    """A quantized model could not be produced for a target."""


class QualityGateError(CompressionError):
    """The compressed model is below the quality gate; the message says by how much."""

    def __init__(self, message: str, *, shortfalls: dict[str, tuple[float, float]]) -> None:
        super().__init__(message)
        self.shortfalls = shortfalls
        """metric -> (measured, threshold) for every metric that missed."""
