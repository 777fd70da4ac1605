"""Split placements in force per agent: what each agent's recorded desired state says about
where a model's requests run, with the figures the controller's planner made it for."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel
from sqlalchemy import select

from edgefed.cloud.api.deps import AUTH_ERRORS, ReaderDep, ServicesDep, SessionDep, StateDep
from edgefed.cloud.fleet.desired import stored_placements
from edgefed.cloud.registry.models import Agent
from edgefed.cloud.services import Services
from edgefed.cloud.split.placements import PlannedPlacement
from edgefed.common.schemas import Placement
from edgefed.common.topics import ID_PATTERN

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/split", tags=["split"])


class PlanFigures(BaseModel):
    """What the controller's planner made a placement for (since the controller started)."""

    version: int
    device_profile: str
    rtt_ms: float
    bandwidth_mbps: float
    expected_ms: float
    planned_at: datetime


class ModelPlacement(BaseModel):
    model: str
    placement: Placement
    planned: PlanFigures | None = None
    """``None``: recorded before this controller started, or split placement is off."""


class AgentPlacements(BaseModel):
    agent_id: str
    generation: int
    """The desired-state generation that carries these placements."""
    placements: list[ModelPlacement]


def _planned(services: Services, agent_id: str) -> dict[str, PlannedPlacement]:
    if services.placements is None:
        return {}
    try:
        return services.placements.planned(agent_id).get(agent_id, {})
    except Exception:  # the live view must not fail the registry's answer
        log.warning("the placement view failed for %s", agent_id, exc_info=True)
        return {}


def _figures(plan: PlannedPlacement | None) -> PlanFigures | None:
    if plan is None:
        return None
    return PlanFigures(
        version=plan.version,
        device_profile=plan.device_profile,
        rtt_ms=plan.rtt_ms,
        bandwidth_mbps=plan.bandwidth_mbps,
        expected_ms=plan.expected_ms,
        planned_at=plan.planned_at,
    )


@router.get("/placements", responses=AUTH_ERRORS)
def list_placements(
    session: SessionDep,
    state: StateDep,
    services: ServicesDep,
    _who: ReaderDep,
    agent: Annotated[str | None, Query(pattern=ID_PATTERN, description="Only this agent")] = None,
) -> list[AgentPlacements]:
    """The placements in force for every agent of the fleet that has some (recorded desired
    states), with the link and device figures each was planned for."""
    query = select(Agent).where(
        Agent.fleet == state.settings.fleet, Agent.desired_state.is_not(None)
    )
    if agent is not None:
        query = query.where(Agent.id == agent)
    out: list[AgentPlacements] = []
    for row in session.scalars(query.order_by(Agent.id)):
        placements = stored_placements(row)
        if not placements:
            continue
        planned = _planned(services, row.id)
        out.append(
            AgentPlacements(
                agent_id=row.id,
                generation=row.desired_generation,
                placements=[
                    ModelPlacement(model=name, placement=p, planned=_figures(planned.get(name)))
                    for name, p in sorted(placements.items())
                ],
            )
        )
    return out
