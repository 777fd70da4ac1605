"""The exception tree of the federation package (the Flower server side).

A rejected update is not fatal: :class:`UpdateRejected` names why one client's update was left
out and the round goes on. :class:`RoundFailed` ends a run for good (too few valid updates, an
aggregate that is not finite); retrying the same run with the same clients fails the same way.
:class:`FederationConfigError` names the run-config key that was wrong.
"""

from __future__ import annotations

from edgefed.common.errors import ConfigError, EdgefedError, PermanentError


class FederationError(EdgefedError):
    """Root of the errors of federated runs on the server side."""


class UpdateRejected(FederationError, PermanentError):
    """One client's update failed validation; ``reason`` says which check."""

    def __init__(self, reason: str, *, node_id: int | None = None) -> None:
        prefix = f"node {node_id}: " if node_id is not None else ""
        super().__init__(f"{prefix}{reason}")
        self.reason = reason
        self.node_id = node_id


class RoundFailed(FederationError, PermanentError):
    """A round could not produce a usable aggregate; the run stops."""

    def __init__(self, message: str, *, server_round: int | None = None) -> None:
        super().__init__(message)
        self.server_round = server_round


class FederationConfigError(FederationError, ConfigError):
    """The run config is invalid; ``key`` names the offending entry."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"run config {key!r}: {problem}")
        self.key = key
        self.problem = problem
