"""Errors of conversation sessions.

Each error carries the :class:`~edgefed.common.errors.ErrorCode` a holder answers with
(``code``), so a holder turns any of them into an error reply without a lookup table.
"""

from __future__ import annotations

from edgefed.common.errors import EdgefedError, ErrorCode, PermanentError, TemporaryError

__all__ = [
    "SessionConflict",
    "SessionError",
    "SessionExpired",
    "SessionKeyError",
    "SessionNotFound",
    "SessionStoreError",
    "SessionTooLarge",
]


class SessionError(EdgefedError):
    """Base of session errors."""

    code: ErrorCode = ErrorCode.INTERNAL


class SessionNotFound(SessionError, PermanentError):
    """No such session for this caller (also another owner's session: never say it exists)."""

    exit_code = 66  # EX_NOINPUT
    code = ErrorCode.NOT_FOUND


class SessionExpired(SessionError, PermanentError):
    """The session expired; its copies are deleted. The message says when it expired."""

    code = ErrorCode.GONE


class SessionTooLarge(SessionError, PermanentError):
    """A change would take a session over one of its limits; nothing was changed.

    ``limit`` names the limit (``max_context_bytes``, ``max_messages``), ``allowed`` its value
    and ``size`` what the session would have grown to.
    """

    exit_code = 65  # EX_DATAERR
    code = ErrorCode.TOO_LARGE

    def __init__(self, message: str, *, limit: str = "", allowed: int = 0, size: int = 0) -> None:
        super().__init__(message)
        self.limit = limit
        self.allowed = allowed
        self.size = size


class SessionConflict(SessionError, TemporaryError):
    """A stale version: a copy older than the one it would replace (re-read, then retry)."""

    code = ErrorCode.CONFLICT


class SessionKeyError(SessionError, PermanentError):
    """A bad session key, or a record that does not decrypt under it (tampered, another fleet's
    or another session's record)."""

    exit_code = 65  # EX_DATAERR
    code = ErrorCode.MALFORMED


class SessionStoreError(SessionError, TemporaryError):
    """A holder could not write or remove a session's file (disk full, permissions); the
    session is as it was before the call."""

    exit_code = 74  # EX_IOERR
    code = ErrorCode.UNAVAILABLE
