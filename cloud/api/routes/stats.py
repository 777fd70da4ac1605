"""Fleet and routing statistics from the agents' last heartbeats.

The live view (``services.fleet.live(agent_id)``, MQTT) wins over what the registry stored;
it is read as ``{"status": AgentStatus | None, "heartbeat": Heartbeat | None, ...}`` (wire
dicts), and a flat status or heartbeat dict is understood too. Heartbeats carry latency per
model (count, p50, p99, EWMA) and queue depth per priority.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter
from sqlalchemy import select

from edgefed.cloud.api.deps import AUTH_ERRORS, ReaderDep, ServicesDep, SessionDep
from edgefed.cloud.api.routes.agents import live_view
from edgefed.cloud.api.schemas import (
    AgentStats,
    FleetStats,
    ModelLatency,
    RouteTarget,
    RoutingStats,
)
from edgefed.cloud.registry.db import as_utc
from edgefed.cloud.registry.models import Agent
from edgefed.cloud.services import Services

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/stats", tags=["stats"])

KNOWN_STATES = ("online", "offline", "unknown")


@dataclass
class Snapshot:
    """What is known of one agent now."""

    id: str
    state: str
    last_seen: datetime | None
    models: list[dict[str, Any]]
    latency: dict[str, ModelLatency]
    queue_depth: dict[str, int]


def _dict(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _moment(value: object) -> datetime | None:
    if isinstance(value, datetime):
        return as_utc(value)
    if isinstance(value, str):
        try:
            return as_utc(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None


def snapshot(agent: Agent, live: dict[str, Any] | None) -> Snapshot:
    """Merge the registry's row with the live view (the live view wins)."""
    live = live or {}
    status = _dict(live.get("status")) or (live if live.get("kind") == "agent-status" else None)
    heartbeat = _dict(live.get("heartbeat")) or (live if live.get("kind") == "heartbeat" else None)
    status = status or agent.last_status or {}
    heartbeat = heartbeat or agent.last_heartbeat or {}
    state = str(status.get("state") or live.get("state") or agent.state or "unknown")
    # When the controller last heard from the agent, on the controller's clock: never the
    # ``ts`` the agent wrote into its heartbeat (a device's clock can be hours off).
    seen = _moment(live.get("last_seen")) or as_utc(agent.last_seen)
    raw_models = heartbeat.get("models") or status.get("models") or []
    models = [
        {"name": m.get("name"), "version": m.get("version"), "role": m.get("role", "full")}
        for m in raw_models
        if isinstance(m, dict) and isinstance(m.get("name"), str)
    ]
    latency: dict[str, ModelLatency] = {}
    for name, figures in (_dict(heartbeat.get("latency")) or {}).items():
        if isinstance(figures, dict):
            count = _number(figures.get("count"))
            latency[str(name)] = ModelLatency(
                count=int(count) if count is not None else None,
                p50_ms=_number(figures.get("p50_ms")),
                p99_ms=_number(figures.get("p99_ms")),
                ewma_ms=_number(figures.get("ewma_ms")),
            )
    queue: dict[str, int] = {}
    for priority, depth in (_dict(heartbeat.get("queue_depth")) or {}).items():
        number = _number(depth)
        if number is not None:
            queue[str(priority)] = int(number)
    return Snapshot(agent.id, state, seen, models, latency, queue)


def snapshots(session: SessionDep, services: Services) -> list[Snapshot]:
    agents = session.scalars(select(Agent).order_by(Agent.id))
    return [snapshot(a, live_view(services, a.id)) for a in agents]


@router.get("/fleet", responses=AUTH_ERRORS)
def fleet_stats(session: SessionDep, services: ServicesDep, _who: ReaderDep) -> FleetStats:
    """Agents by state; per agent its models, latency and queue depth; per model the versions
    served and by whom."""
    counts = dict.fromkeys(KNOWN_STATES, 0)
    per_agent: list[AgentStats] = []
    served: dict[str, dict[str, list[str]]] = {}
    for snap in snapshots(session, services):
        counts[snap.state] = counts.get(snap.state, 0) + 1
        per_agent.append(
            AgentStats(
                id=snap.id,
                state=snap.state,
                last_seen=snap.last_seen,
                models=snap.models,
                latency=snap.latency,
                queue_depth=snap.queue_depth,
            )
        )
        for m in snap.models:
            versions = served.setdefault(str(m["name"]), {})
            versions.setdefault(str(m["version"]), []).append(snap.id)
    connected = None
    if services.fleet is not None:
        try:
            connected = services.fleet.connected()
        except Exception:
            log.warning("the fleet view failed to say whether it is connected", exc_info=True)
            connected = False
    return FleetStats(agents=counts, per_agent=per_agent, models=served, broker_connected=connected)


@router.get("/routing", responses=AUTH_ERRORS)
def routing_stats(session: SessionDep, services: ServicesDep, _who: ReaderDep) -> RoutingStats:
    """Per model: which agents serve which version, with their latency, fastest first."""
    table: dict[str, list[RouteTarget]] = {}
    for snap in snapshots(session, services):
        depth = sum(snap.queue_depth.values())
        for m in snap.models:
            name = str(m["name"])
            figures = snap.latency.get(name, ModelLatency())
            version = m.get("version")
            table.setdefault(name, []).append(
                RouteTarget(
                    agent_id=snap.id,
                    version=version if isinstance(version, int) else 0,
                    role=str(m.get("role") or "full"),
                    state=snap.state,
                    p50_ms=figures.p50_ms,
                    p99_ms=figures.p99_ms,
                    ewma_ms=figures.ewma_ms,
                    queue_depth=depth,
                )
            )
    for targets in table.values():
        targets.sort(key=lambda t: (t.p50_ms is None, t.p50_ms or 0.0, t.agent_id))
    return RoutingStats(models=table)
