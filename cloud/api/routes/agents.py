"""Agents: enrolment with a single-use join token (the contract of ``edgefed.edge.join``), and
the fleet as the registry and the live MQTT view know it."""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import StringConstraints
from sqlalchemy import select, update

from edgefed.cloud.api.deps import (
    AUTH_ERRORS,
    AnonymousLimitDep,
    AuditDep,
    PrincipalDep,
    ReaderDep,
    ServicesDep,
    SessionDep,
    StateDep,
)
from edgefed.cloud.api.schemas import AgentPublic, ErrorBody, JoinAnswer, JoinRequest
from edgefed.cloud.api.security import hash_token, new_token, unauthorized
from edgefed.cloud.brokerauth.files import sync_from_registry
from edgefed.cloud.brokerauth.passwords import hash_password, new_password
from edgefed.cloud.registry.db import as_utc
from edgefed.cloud.registry.models import Agent, ApiToken, JoinToken
from edgefed.cloud.services import Services
from edgefed.common.topics import ID_PATTERN

log = logging.getLogger(__name__)

LABEL_FILTER = r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}=[^\x00-\x1f\x7f]{0,128}$"
"""``KEY=VALUE``: a label key as in :data:`~edgefed.cloud.api.schemas.LabelKey`, any value."""

router = APIRouter(prefix="/api/v1", tags=["agents"])

AgentIdPath = Annotated[str, Path(pattern=ID_PATTERN, description="An agent id")]


def live_view(services: Services, agent_id: str) -> dict[str, Any] | None:
    """What the fleet view received from the agent over MQTT (None: nothing, or no view)."""
    if services.fleet is None:
        return None
    try:
        return services.fleet.live(agent_id)
    except Exception:  # a failing live view must not fail the registry's answer
        log.warning("the fleet view failed for %s", agent_id, exc_info=True)
        return None


def agent_public(agent: Agent, services: Services) -> AgentPublic:
    out = AgentPublic.model_validate(agent)
    out.live = live_view(services, agent.id)
    return out


def _free_agent_id(session: SessionDep) -> str:
    while True:
        candidate = f"agent-{secrets.token_hex(4)}"
        if session.get(Agent, candidate) is None:
            return candidate


@router.post(
    "/agents/join",
    responses={
        401: {"model": ErrorBody, "description": "join token invalid, expired or used"},
        429: {"model": ErrorBody},
        503: {"model": ErrorBody, "description": "the controller has no broker URL"},
    },
)
def join(
    body: JoinRequest,
    session: SessionDep,
    state: StateDep,
    audit: AuditDep,
    _limit: AnonymousLimitDep,
) -> JoinAnswer:
    """Enrol a device: trade a single-use join token for an agent id, an agent token, the
    broker URL and the artifact-signing key. No bearer token: the join token is the secret."""
    broker_url = state.settings.broker_url
    if not broker_url:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "this controller has no broker URL configured (set broker_url / EDGEFED_BROKER_URL "
            "to an address agents can reach); agents cannot join until it has one",
        )
    row = session.scalars(
        select(JoinToken).where(JoinToken.token_hash == hash_token(body.token))
    ).first()
    if row is None:
        raise unauthorized("the join token is not valid")
    audit.actor = f"join-token#{row.id}"
    if row.used_at is not None:
        raise unauthorized("the join token has already been used (join tokens are single-use)")
    expires = as_utc(row.expires_at)
    now = datetime.now(UTC)
    if expires is not None and expires <= now:
        raise unauthorized("the join token has expired")
    agent_id = _free_agent_id(session)
    labels = {**body.labels, **{str(k): str(v) for k, v in row.labels.items()}}
    # With [controller.mqtt_auth] the agent gets its own broker user (its id) and a password
    # kept only hashed; the broker's files are re-rendered once the agent is committed.
    mqtt_password = new_password() if state.broker_auth is not None else None
    session.add(
        Agent(
            id=agent_id,
            fleet=state.settings.fleet,
            hostname=body.hostname,
            labels=labels,
            device_profile=body.device_profile,
            agent_version=body.agent_version,
            state="unknown",
            mqtt_password_hash=hash_password(mqtt_password) if mqtt_password else None,
        )
    )
    session.flush()
    consumed = session.execute(
        update(JoinToken)
        .where(JoinToken.id == row.id, JoinToken.used_at.is_(None))
        .values(used_at=now, used_by=agent_id)
    )
    if getattr(consumed, "rowcount", 0) != 1:  # another request used it a moment ago
        raise unauthorized("the join token has already been used (join tokens are single-use)")
    secret = new_token()
    session.add(
        ApiToken(
            name=f"agent:{agent_id}",
            token_hash=hash_token(secret),
            scopes=["agent"],
            agent_id=agent_id,
        )
    )
    audit.resource = f"agent:{agent_id}"
    audit.detail = {"hostname": body.hostname, "labels": labels}
    session.commit()
    if state.broker_auth is not None:
        sync_from_registry(state.broker_auth, state.sessions)
    log.info("agent %s joined (host %s, labels %s)", agent_id, body.hostname, labels)
    return JoinAnswer(
        agent_id=agent_id,
        fleet=state.settings.fleet,
        broker_url=broker_url,
        mqtt_username=agent_id if mqtt_password else None,
        mqtt_password=mqtt_password,
        agent_token=secret,
        artifact_signing_keys=[state.signing_key.verify_key.to_base64()],
        labels=labels,
        session_key=state.session_key.to_base64() if state.session_key is not None else None,
    )


@router.get("/agents", responses=AUTH_ERRORS)
def list_agents(
    session: SessionDep,
    services: ServicesDep,
    _who: ReaderDep,
    label: Annotated[
        list[Annotated[str, StringConstraints(pattern=LABEL_FILTER)]] | None,
        Query(max_length=16, description="Only agents with these labels (KEY=VALUE)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> list[AgentPublic]:
    """Enrolled agents with what the registry holds and their live status over MQTT."""
    wanted: dict[str, str] = {}
    for item in label or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise HTTPException(422, f"label filter {item!r} must be KEY=VALUE")
        wanted[key] = value
    rows = session.scalars(select(Agent).order_by(Agent.id)).all()
    matching = [a for a in rows if all(a.labels.get(k) == v for k, v in wanted.items())]
    return [agent_public(a, services) for a in matching[offset : offset + limit]]


@router.get("/agents/{agent_id}", responses={**AUTH_ERRORS, 404: {"model": ErrorBody}})
def get_agent(
    agent_id: AgentIdPath, session: SessionDep, services: ServicesDep, who: PrincipalDep
) -> AgentPublic:
    """One agent (readers, or the agent itself with its own token)."""
    who.require_agent_or(agent_id, "reader")
    agent = session.get(Agent, agent_id)
    if agent is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no agent {agent_id!r}")
    return agent_public(agent, services)
