"""Errors of the edge agent. Each says whether a retry can help (temporary) or not. Errors of
model loading and serving live in :mod:`edgefed.common.serving.errors`."""

from __future__ import annotations

from edgefed.common.errors import PermanentError, TemporaryError


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
