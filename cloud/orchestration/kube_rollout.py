"""A Deployment's rollout status, read the way ``kubectl rollout status`` reads it (from the
object alone, so the controller, the CLI and tests share one reading)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RolloutStatus:
    """Where a Deployment's rollout stands, read the way ``kubectl rollout status`` reads it."""

    name: str
    desired: int
    """``spec.replicas``."""
    updated: int
    """Replicas running the current template."""
    ready: int
    available: int
    """Ready for at least ``minReadySeconds``."""
    observed_generation_current: bool
    """The controller has seen the latest spec (otherwise the other figures are stale)."""
    complete: bool
    message: str
    failed: bool = False
    """The rollout exceeded its progress deadline (``ProgressDeadlineExceeded``)."""


def rollout_status_of(deployment: Mapping[str, Any]) -> RolloutStatus:
    """The rollout status of a Deployment object (as a dict), without asking the server."""
    meta = deployment.get("metadata") or {}
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    name = str(meta.get("name", "?"))
    desired = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    total = int(status.get("replicas") or 0)
    generation = int(meta.get("generation") or 0)
    observed = int(status.get("observedGeneration") or 0)
    current = observed >= generation and "observedGeneration" in status

    def result(complete: bool, message: str, failed: bool = False) -> RolloutStatus:
        return RolloutStatus(
            name, desired, updated, ready, available, current, complete, message, failed
        )

    if not current:
        return result(False, f"waiting for the deployment {name!r} spec update to be observed")
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return result(False, f"deployment {name!r} exceeded its progress deadline", True)
    if updated < desired:
        return result(
            False, f"{updated} out of {desired} new replicas of {name!r} have been updated"
        )
    if total > updated:
        return result(False, f"{total - updated} old replicas of {name!r} are pending termination")
    if available < updated:
        return result(False, f"{available} of {updated} updated replicas of {name!r} are available")
    return result(True, f"deployment {name!r} successfully rolled out")
