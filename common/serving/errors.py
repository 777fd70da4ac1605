"""Errors of the serving engine (agents and cloud workers alike)."""

from __future__ import annotations

from edgefed.common.errors import ErrorCode, PermanentError, TemporaryError


class ServingError(PermanentError):
    """Base of the serving engine's permanent errors."""


class ModelLoadError(ServingError):
    """A verified artifact could not be loaded into an inference session."""


class UnknownModelError(ServingError):
    """A request names a model this process does not serve."""

    code = ErrorCode.NOT_FOUND


class InputTooLongError(ServingError):
    """A request's text or tensors exceed the model's limits."""

    code = ErrorCode.MALFORMED


class OverloadedError(TemporaryError):
    """The request queue is full; retry later or elsewhere."""

    code = ErrorCode.OVERLOADED
