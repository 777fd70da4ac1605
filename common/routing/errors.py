"""Errors of the router, in the tree of :mod:`edgefed.common.errors`.

A gateway converts them where they leave it: :class:`NoRouteError` to ``unavailable`` (a retry
later can help: a target may come back), :class:`DeadlineUnreachable` to ``expired`` (the same
request with the same deadline will fail the same way).
"""

from __future__ import annotations

from edgefed.common.errors import EdgefedError, ErrorCode, PermanentError, TemporaryError


class RoutingError(EdgefedError):
    """Base of the router's own errors (remote errors and timeouts keep their own types)."""

    code: ErrorCode = ErrorCode.UNAVAILABLE


class NoRouteError(RoutingError, TemporaryError):
    """No live target can take the request now: all are ejected, offline or already tried."""

    code = ErrorCode.UNAVAILABLE


class DeadlineUnreachable(RoutingError, PermanentError):
    """The request's deadline has passed, or every live target's latency estimate exceeds the
    time left: it is refused at once instead of being queued."""

    code = ErrorCode.EXPIRED


class TargetLost(RoutingError, TemporaryError):
    """A target went offline (its agent's status or last will) with the request in flight."""

    code = ErrorCode.UNAVAILABLE
