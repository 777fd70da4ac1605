"""The exception tree of edgefed.

Every error edgefed raises is an :class:`EdgefedError`. Its second level says whether a retry can
help: a :class:`TemporaryError` may succeed later (it can carry ``retry_after`` seconds), a
:class:`PermanentError` will fail the same way again. Only the main loops decide to back off.

Errors of third-party libraries (paho-mqtt, pydantic, safetensors, cryptography, OS errors) are
converted where they leave the module that uses the library, with ``raise ... from``.

Process exit codes follow ``sysexits.h`` so shells and supervisors can tell failures apart.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class EdgefedWarning(UserWarning):
    """Warnings of edgefed (the test suite turns them into errors)."""


class EdgefedError(Exception):
    """Root of all edgefed errors."""

    exit_code: ClassVar[int] = 1
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TemporaryError(EdgefedError):
    """A retry can help, after ``retry_after`` seconds when it is known."""

    exit_code: ClassVar[int] = 75  # EX_TEMPFAIL
    retryable: ClassVar[bool] = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(EdgefedError):
    """Retrying the same call will fail the same way."""


# --------------------------------------------------------------------------- configuration


class ConfigError(PermanentError):
    """Settings or a config file are invalid; the message names the field."""

    exit_code = 78  # EX_CONFIG


# --------------------------------------------------------------------------- wire payloads


class ErrorCode(enum.StrEnum):
    """Codes carried by error replies on the wire (``ErrorReply.code``)."""

    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported-version"
    UNKNOWN_KIND = "unknown-kind"
    TIMEOUT = "timeout"
    EXPIRED = "expired"
    OVERLOADED = "overloaded"
    NOT_FOUND = "not-found"
    GONE = "gone"
    """A session (or other resource) that existed and expired: it is not coming back."""
    TOO_LARGE = "too-large"
    """Over a size limit (a session's context); the request changed nothing."""
    CONFLICT = "conflict"
    """A stale version (a copy older than the one it would replace)."""
    UNAUTHORIZED = "unauthorized"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


class PayloadError(PermanentError):
    """A payload could not be decoded or did not match its schema."""

    exit_code = 65  # EX_DATAERR
    code: ErrorCode = ErrorCode.MALFORMED


class UnknownKindError(PayloadError):
    """A payload names a message kind this side does not expect."""

    code = ErrorCode.UNKNOWN_KIND


class UnsupportedSchemaVersion(PayloadError):
    """A payload carries a schema version this side does not speak."""

    code = ErrorCode.UNSUPPORTED_VERSION


class TensorFormatError(PayloadError):
    """Tensor bytes are not a valid edgefed tensor payload."""


# --------------------------------------------------------------------------- messaging


class MessagingError(EdgefedError):
    """Base of errors raised by the MQTT layer (never paho's own exceptions)."""


class BrokerUnavailable(MessagingError, TemporaryError):
    """The broker cannot be reached or the connection was lost."""

    exit_code = 69  # EX_UNAVAILABLE


class BrokerAuthError(MessagingError, PermanentError):
    """The broker refused the credentials or the client is not authorised."""

    exit_code = 77  # EX_NOPERM


class BrokerNotInstalled(MessagingError, PermanentError):
    """No mosquitto binary was found to start a private broker."""

    exit_code = 69  # EX_UNAVAILABLE


class ClientClosedError(MessagingError, PermanentError):
    """An MQTT client was used after it was closed."""


class RequestTimeout(MessagingError, TemporaryError):
    """No reply arrived before the request's deadline."""


class PublishError(MessagingError, TemporaryError):
    """The broker did not acknowledge a publish in time or refused it."""


class RemoteError(MessagingError):
    """A peer answered a request with an error reply."""

    def __init__(self, message: str, *, code: ErrorCode, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.request_id = request_id
        self.remote_message = message


class RemoteTemporaryError(RemoteError, TemporaryError):
    """A peer's error reply says a retry can help."""

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        RemoteError.__init__(self, message, code=code, request_id=request_id)
        self.retry_after = retry_after


class RemotePermanentError(RemoteError, PermanentError):
    """A peer's error reply says the request will fail the same way again."""


# --------------------------------------------------------------------------- artifacts


class RejectReason(enum.StrEnum):
    """Why an artifact was rejected; each value is one check of ``artifact.verify``."""

    NOT_A_DIRECTORY = "not-a-directory"
    MISSING_MANIFEST = "missing-manifest"
    MALFORMED_MANIFEST = "malformed-manifest"
    MISSING_SIGNATURE = "missing-signature"
    BAD_SIGNATURE = "bad-signature"
    UNTRUSTED_SIGNER = "untrusted-signer"
    VERSION_TOO_LOW = "version-too-low"
    UNSAFE_PATH = "unsafe-path"
    MISSING_FILE = "missing-file"
    EXTRA_FILE = "extra-file"
    SIZE_MISMATCH = "size-mismatch"
    HASH_MISMATCH = "hash-mismatch"
    OVERSIZED = "oversized"


class ArtifactError(PermanentError):
    """Base of artifact errors."""

    exit_code = 65  # EX_DATAERR


class ArtifactRejected(ArtifactError):
    """An artifact failed verification; ``reason`` says which check failed."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"artifact rejected ({reason}): {detail}")
        self.reason = reason
        self.detail = detail


class SigningKeyError(ArtifactError):
    """A signing or verification key could not be loaded."""
