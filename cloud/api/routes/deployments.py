"""Deployments: run a model version on a set of agents with a rollout strategy.

Creating one checks that the model and its artifact for the target exist, resolves the
selector to the enrolled agents of the controller's fleet *now* (agents joining later are not
included), refuses a second active deployment of the same model on any of those agents, and
writes the deployment (with the whole validated strategy, which is the engine's own schema),
its agents and a ``created`` rollout event in one transaction. The rollout engine (kicked
afterwards) does the rest -- it alone chooses the canary set (online agents first, then by id)
and checks the artifact's signature and quality -- and owns every later state change, except
the two an operator asks for: ``abort`` (any rollout still going; the engine rolls back) and
``confirm`` (a blue-green deployment waiting in ``soaking``: it completes).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from edgefed.cloud.api.deps import (
    AUTH_ERRORS,
    AuditDep,
    IdPath,
    OperatorDep,
    ReaderDep,
    ServicesDep,
    SessionDep,
    StateDep,
)
from edgefed.cloud.api.schemas import (
    DeploymentAgentPublic,
    DeploymentCreate,
    DeploymentDetail,
    DeploymentPublic,
    ErrorBody,
    RolloutEventPublic,
)
from edgefed.cloud.registry.models import (
    Agent,
    AgentPhase,
    Artifact,
    Deployment,
    DeploymentAgent,
    DeploymentStatus,
    Model,
    ModelVersion,
    RolloutEvent,
)
from edgefed.cloud.rollout.strategy import RolloutStrategy, Selector, quality_problem
from edgefed.cloud.services import kick
from edgefed.common.topics import ID_PATTERN

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["deployments"])

ACTIVE = frozenset(
    {
        DeploymentStatus.PENDING,
        DeploymentStatus.CANARY,
        DeploymentStatus.SOAKING,
        DeploymentStatus.ROLLING,
    }
)
"""Statuses of a deployment whose rollout is still going."""


def resolve_selector(session: Session, body: DeploymentCreate, fleet: str) -> list[str]:
    """Enrolled agents of ``fleet`` the selector matches now, sorted (the engine's own
    :class:`Selector` semantics); 422 naming unknown ids, or when none match."""
    selector = Selector.model_validate(body.selector.model_dump(exclude_none=True))
    query = select(Agent).where(Agent.fleet == fleet).order_by(Agent.id)
    if selector.agents is not None:
        query = query.where(Agent.id.in_(selector.agents))
    agents = list(session.scalars(query))
    if selector.agents is not None:
        missing = sorted(set(selector.agents) - {a.id for a in agents})
        if missing:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"unknown agents (not enrolled in fleet {fleet}): {', '.join(missing)}",
            )
    matched = [a.id for a in agents if selector.matches(a.id, a.labels or {})]
    if not matched:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"the selector matches no enrolled agent of fleet {fleet} "
            "(agent ids and labels must all hold)",
        )
    return matched


def deployment_public(
    dep: Deployment, model_name: str, *, events: list[RolloutEvent] | None = None
) -> DeploymentDetail:
    agents = sorted(dep.agents, key=lambda a: a.agent_id)
    return DeploymentDetail(
        id=dep.id,
        model=model_name,
        version=dep.version,
        target=dep.target,
        selector=dep.selector,
        strategy=dep.strategy,
        status=dep.status,
        previous_version=dep.previous_version,
        rollback_version=dep.rollback_version,
        reason=dep.reason,
        created_by=dep.created_by,
        created_at=dep.created_at,
        updated_at=dep.updated_at,
        phase_started_at=dep.phase_started_at,
        agents=[DeploymentAgentPublic.model_validate(a) for a in agents],
        events=[RolloutEventPublic.model_validate(e) for e in events or []],
    )


def _events(session: Session, deployment_id: int) -> list[RolloutEvent]:
    return list(
        session.scalars(
            select(RolloutEvent)
            .where(RolloutEvent.deployment_id == deployment_id)
            .order_by(RolloutEvent.id)
        )
    )


def insert_deployment(
    session: Session, body: DeploymentCreate, fleet: str, actor: str | None
) -> tuple[Deployment, RolloutEvent]:
    """Check ``body`` and add the deployment, its agents and its ``created`` event to
    ``session`` (flushed, not committed): the API's create and the federation's closed loop
    share it. Refusals are HTTPExceptions (404 unknown model or artifact, 409 overlap, 422
    quality or selector) whose ``detail`` says why."""
    # FOR UPDATE (PostgreSQL): deployments of one model are created one at a time, so two
    # requests cannot both pass the overlap check. SQLite serialises writers already.
    model = session.scalars(
        select(Model).where(Model.name == body.model).with_for_update()
    ).one_or_none()
    if model is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model named {body.model!r}")
    artifact = session.scalars(
        select(Artifact)
        .join(ModelVersion, Artifact.version_id == ModelVersion.id)
        .where(
            ModelVersion.model_id == model.id,
            ModelVersion.version == body.version,
            Artifact.target == body.target,
        )
    ).one_or_none()
    if artifact is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"{body.model} v{body.version} has no artifact for target {body.target!r}",
        )
    problem, _ = quality_problem(
        {
            k: float(v)
            for k, v in (artifact.metrics or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        },
        RolloutStrategy.model_validate(body.strategy.model_dump()),
        f"{body.model} v{body.version} for {body.target}",
    )
    if problem is not None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, problem)
    agent_ids = resolve_selector(session, body, fleet)
    busy = session.execute(
        select(DeploymentAgent.agent_id, Deployment.id)
        .join(Deployment, DeploymentAgent.deployment_id == Deployment.id)
        .where(
            Deployment.model_id == model.id,
            Deployment.status.in_(ACTIVE),
            DeploymentAgent.agent_id.in_(agent_ids),
        )
        .order_by(DeploymentAgent.agent_id)
    ).all()
    if busy:
        others = sorted({dep_id for _, dep_id in busy})
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"{body.model} already has an active deployment "
            f"({', '.join(f'#{d}' for d in others)}) on agents "
            f"{', '.join(sorted({a for a, _ in busy}))}; abort it or wait until it finishes",
        )
    deployment = Deployment(
        model_id=model.id,
        version=body.version,
        target=body.target,
        selector=body.selector.model_dump(exclude_none=True),
        strategy=body.strategy.model_dump(mode="json"),
        status=DeploymentStatus.PENDING,
        created_by=actor,
        agents=[
            DeploymentAgent(agent_id=a, canary=False, phase=AgentPhase.WAITING) for a in agent_ids
        ],
    )
    session.add(deployment)
    session.flush()
    event = RolloutEvent(
        deployment_id=deployment.id,
        kind="created",
        detail={"agents": agent_ids, "strategy": body.strategy.kind, "by": actor},
    )
    session.add(event)
    session.flush()
    return deployment, event


@router.post(
    "/deployments",
    status_code=status.HTTP_201_CREATED,
    responses={**AUTH_ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def create_deployment(
    body: DeploymentCreate,
    session: SessionDep,
    state: StateDep,
    services: ServicesDep,
    who: OperatorDep,
    audit: AuditDep,
) -> DeploymentDetail:
    """Deploy ``model`` v``version`` for ``target`` to the agents the selector matches."""
    audit.resource = f"model:{body.model}/v{body.version}/{body.target}"
    deployment, event = insert_deployment(session, body, state.settings.fleet, who.actor)
    audit.resource = f"deployment:{deployment.id}"
    answer = deployment_public(deployment, body.model, events=[event])
    session.commit()
    kick(services.rollouts, "rollout")
    return answer


@router.get("/deployments", responses=AUTH_ERRORS)
def list_deployments(
    session: SessionDep,
    _who: ReaderDep,
    model: Annotated[str | None, Query(pattern=ID_PATTERN)] = None,
    dep_status: Annotated[DeploymentStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> list[DeploymentPublic]:
    """Deployments with their agents, newest first."""
    query = (
        select(Deployment, Model.name)
        .join(Model, Deployment.model_id == Model.id)
        .options(selectinload(Deployment.agents))
        .order_by(Deployment.id.desc())
        .limit(limit)
        .offset(offset)
    )
    if model is not None:
        query = query.where(Model.name == model)
    if dep_status is not None:
        query = query.where(Deployment.status == dep_status)
    return [
        DeploymentPublic(**deployment_public(dep, name).model_dump(exclude={"events"}))
        for dep, name in session.execute(query)
    ]


def _get(session: Session, deployment_id: int, *, for_update: bool = False) -> Deployment:
    dep = session.get(Deployment, deployment_id, with_for_update=for_update)
    if dep is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no deployment with id {deployment_id}")
    return dep


def _model_name(session: Session, dep: Deployment) -> str:
    return session.scalars(select(Model.name).where(Model.id == dep.model_id)).one()


@router.get("/deployments/{deployment_id}", responses={**AUTH_ERRORS, 404: {"model": ErrorBody}})
def read_deployment(
    deployment_id: IdPath, session: SessionDep, _who: ReaderDep
) -> DeploymentDetail:
    """A deployment with its agents and rollout history."""
    dep = _get(session, deployment_id)
    return deployment_public(dep, _model_name(session, dep), events=_events(session, dep.id))


@router.post(
    "/deployments/{deployment_id}/abort",
    status_code=status.HTTP_202_ACCEPTED,
    responses={**AUTH_ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def abort_deployment(
    deployment_id: IdPath,
    session: SessionDep,
    services: ServicesDep,
    who: OperatorDep,
    audit: AuditDep,
) -> DeploymentDetail:
    """Stop a rollout that is still going; the rollout service rolls its agents back."""
    audit.resource = f"deployment:{deployment_id}"
    dep = _get(session, deployment_id, for_update=True)
    if dep.status not in ACTIVE:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"deployment {deployment_id} is {dep.status.value}: only an active rollout "
            "can be aborted",
        )
    previous = dep.status
    dep.status = DeploymentStatus.ABORTED
    dep.reason = f"aborted by {who.actor}"
    session.add(
        RolloutEvent(
            deployment_id=dep.id,
            kind="abort-requested",
            detail={"by": who.actor, "status_before": previous.value},
        )
    )
    session.flush()
    answer = deployment_public(dep, _model_name(session, dep), events=_events(session, dep.id))
    session.commit()
    kick(services.rollouts, "rollout")
    return answer


@router.post(
    "/deployments/{deployment_id}/confirm",
    responses={**AUTH_ERRORS, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
def confirm_deployment(
    deployment_id: IdPath,
    session: SessionDep,
    services: ServicesDep,
    who: OperatorDep,
    audit: AuditDep,
) -> DeploymentDetail:
    """Confirm a blue-green deployment that is soaking: it completes (the agents keep the new
    version; until then its gates could still switch back)."""
    audit.resource = f"deployment:{deployment_id}"
    dep = _get(session, deployment_id, for_update=True)
    kind = RolloutStrategy.model_validate(dep.strategy or {}).kind
    if kind != "blue-green" or dep.status != DeploymentStatus.SOAKING:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"deployment {deployment_id} is a {kind} deployment in status {dep.status.value}: "
            "only a blue-green deployment that is soaking can be confirmed",
        )
    dep.status = DeploymentStatus.COMPLETED
    dep.phase_started_at = datetime.now(UTC)
    session.add(
        RolloutEvent(
            deployment_id=dep.id,
            kind="confirmed",
            detail={"by": who.actor, "status_before": DeploymentStatus.SOAKING.value},
        )
    )
    session.add(
        RolloutEvent(
            deployment_id=dep.id,
            kind="completed",
            detail={"agents": sorted(a.agent_id for a in dep.agents), "confirmed_by": who.actor},
        )
    )
    session.flush()
    answer = deployment_public(dep, _model_name(session, dep), events=_events(session, dep.id))
    session.commit()
    kick(services.rollouts, "rollout")
    return answer
