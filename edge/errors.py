"""Errors of the edge agent. Each says whether a retry can help (temporary) or not."""

from __future__ import annotations

from edgefed.common.errors import ErrorCode, PermanentError, TemporaryError


class AgentError(PermanentError):
    """Base of the agent's permanent errors."""


class JoinRefused(AgentError):
    """The controller refused the join token (invalid, expired or already used)."""

    exit_code = 77  # EX_NOPERM


class ControllerUnavailable(TemporaryError):
    """The controller could not be reached or answered with a server error."""

    exit_code = 69  # EX_UNAVAILABLE


class NotJoined(AgentError):
    """``edgefed edge run`` found no agent configuration: run ``edgefed edge join`` first."""

    exit_code = 78  # EX_CONFIG


class FetchError(TemporaryError):
    """An artifact download failed part-way; a retry resumes it."""


class ModelLoadError(AgentError):
    """A verified artifact could not be loaded into an inference session."""


class UnknownModelError(AgentError):
    """A request names a model this agent does not serve."""

    code = ErrorCode.NOT_FOUND


class InputTooLongError(AgentError):
    """A request's text or tensors exceed the model's limits."""

    code = ErrorCode.MALFORMED


class OverloadedError(TemporaryError):
    """The agent's request queue is full; retry later or elsewhere."""

    code = ErrorCode.OVERLOADED
