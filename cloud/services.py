"""What the control API needs from the controller's background services, as small protocols.

The API writes rows (jobs, deployments) and *kicks* the service that acts on them; the services
own their loops (worker processes, MQTT, rollouts) and are started in the app's lifespan by
``edgefed cloud serve``. Tests of the API alone pass :class:`Services` with ``None`` members.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from edgefed.common.routing import Routed, TargetSnapshot
from edgefed.common.schemas import InferenceRequest

if TYPE_CHECKING:
    from edgefed.cloud.orchestration.service import PoolState
    from edgefed.cloud.sessions.service import SessionView, TurnOutcome
    from edgefed.cloud.split.placements import PlannedPlacement
    from edgefed.common.sessions.wire import SessionSummary

log = logging.getLogger(__name__)


class Kickable(Protocol):
    def kick(self) -> None: ...


def kick(service: Kickable | None, what: str) -> None:
    """Tell ``service`` to look at its table now; a failure only delays the work (logged)."""
    if service is None:
        return
    try:
        service.kick()
    except Exception:
        log.warning("the %s service failed to take a kick", what, exc_info=True)


class JobService(Protocol):
    def kick(self) -> None:
        """A job was queued or asked to cancel: look at the jobs table now."""


class RolloutService(Protocol):
    def kick(self) -> None:
        """A deployment was created or asked to abort: look at the deployments now."""


class FederationControl(Protocol):
    def kick(self) -> None:
        """A federated run was queued or asked to stop: look at the runs now."""


class GatewayService(Protocol):
    async def infer(self, request: InferenceRequest, *, timeout: float | None) -> Routed:
        """Route one request to the best target (agents, worker pools) and await its reply."""

    def targets(self) -> list[TargetSnapshot]:
        """What the router knows of each target now."""


class FleetView(Protocol):
    def live(self, agent_id: str) -> dict[str, Any] | None:
        """The agent's latest status and heartbeat as received over MQTT (None: never seen)."""

    def connected(self) -> bool:
        """Whether the controller's MQTT link is up."""


class PlacementView(Protocol):
    def planned(self, agent_id: str | None = None) -> dict[str, dict[str, PlannedPlacement]]:
        """Split plans in force by agent and model, with the figures they were made for."""


class AutoscalerView(Protocol):
    @property
    def applying(self) -> bool:
        """Whether decisions are applied through a scaler (False: recommend-only)."""

    def snapshot(self) -> list[PoolState]:
        """Every autoscaled pool: settings, last sample, last decisions, vertical hints."""


class SessionControl(Protocol):
    """Conversation sessions (:class:`edgefed.cloud.sessions.service.SessionService`). Every
    call names the owner (the caller's token); another owner's session is not found."""

    async def create(
        self,
        owner: str,
        *,
        model: str,
        system_prompt: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        ttl_s: float | None = None,
    ) -> SessionSummary:
        """A new session; it gets a holder at its first turn."""

    async def list_sessions(self, owner: str) -> list[SessionSummary]:
        """The owner's active sessions."""

    async def get(self, owner: str, session_id: str) -> SessionView:
        """One session with its conversation."""

    async def turn(
        self,
        owner: str,
        session_id: str,
        message: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> TurnOutcome:
        """One turn of the conversation on the session's holder."""

    async def delete(self, owner: str, session_id: str) -> SessionSummary:
        """Delete the session and every copy of it."""


@dataclass
class Services:
    jobs: JobService | None = None
    rollouts: RolloutService | None = None
    fleet: FleetView | None = None
    gateway: GatewayService | None = None
    placements: PlacementView | None = None
    federation: FederationControl | None = None
    autoscaler: AutoscalerView | None = None
    sessions: SessionControl | None = None
