"""Errors of orchestration (the Kubernetes adapter), on edgefed's tree.

Each type says whether a retry can help: :class:`KubeUnavailable` is temporary (5xx, 429,
connection refused or reset, timeouts) and the adapter retries it itself a bounded number of
times; every other API error is permanent and never retried, because the same request would
be refused the same way. The API server's own message is kept in each error's text.
"""

from __future__ import annotations

from edgefed.common.errors import ConfigError, EdgefedError, PermanentError, TemporaryError


class OrchestrationError(EdgefedError):
    """Base of the errors of orchestration."""


class KubeConfigError(OrchestrationError, ConfigError):
    """No usable Kubernetes client configuration (kubeconfig, context or service account)."""


class KubeClientClosed(OrchestrationError, PermanentError):
    """The adapter was used after ``aclose()`` (or after its ``async with`` block)."""


class InvalidKubeInput(OrchestrationError, PermanentError):
    """A manifest object or an argument is invalid; nothing was sent for it."""

    exit_code = 65  # EX_DATAERR


class KubeApiError(OrchestrationError, PermanentError):
    """The API server refused a request; ``status`` is its HTTP status code."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


class KubeInvalid(KubeApiError):
    """The API server found the object invalid (400 or 422): fix the manifest."""

    exit_code = 65  # EX_DATAERR


class KubeNotFound(KubeApiError):
    """The object (or its namespace, or its kind) does not exist (404)."""

    exit_code = 66  # EX_NOINPUT


class KubeConflict(KubeApiError):
    """A conflict (409): with server-side apply, a field is owned by another field manager;
    apply with ``force_conflicts`` to take it over, or leave the field to its owner."""


class KubeForbidden(KubeApiError):
    """Not authenticated (401) or not authorised by RBAC (403) for this verb and resource."""

    exit_code = 77  # EX_NOPERM


class KubeUnavailable(OrchestrationError, TemporaryError):
    """The API server could not answer now (5xx, 429, connection refused or reset, timeout);
    ``retry_after`` carries the server's Retry-After when it sent one."""

    exit_code = 69  # EX_UNAVAILABLE
