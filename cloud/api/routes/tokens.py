"""API tokens (admin) and single-use join tokens for agent enrolment (operator)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException, status
from sqlalchemy import select

from edgefed.cloud.api.deps import AUTH_ERRORS as _AUTH_ERRORS
from edgefed.cloud.api.deps import AdminDep, AuditDep, IdPath, OperatorDep, SessionDep
from edgefed.cloud.api.schemas import (
    ErrorBody,
    JoinTokenCreate,
    JoinTokenCreated,
    TokenCreate,
    TokenCreated,
    TokenPublic,
)
from edgefed.cloud.api.security import expiry, hash_token, new_token
from edgefed.cloud.registry.models import Agent, ApiToken, JoinToken

router = APIRouter(prefix="/api/v1", tags=["tokens"])


@router.post(
    "/tokens",
    status_code=status.HTTP_201_CREATED,
    responses={**_AUTH_ERRORS, 404: {"model": ErrorBody}},
)
def create_token(
    body: TokenCreate, session: SessionDep, who: AdminDep, audit: AuditDep
) -> TokenCreated:
    """Create an API token; the secret is in this answer only."""
    if body.agent_id is not None and session.get(Agent, body.agent_id) is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no agent {body.agent_id!r}")
    secret = new_token()
    row = ApiToken(
        name=body.name,
        token_hash=hash_token(secret),
        scopes=sorted(set(body.scopes)),
        agent_id=body.agent_id,
        expires_at=expiry(body.expires_in_s),
    )
    session.add(row)
    session.flush()
    audit.resource = f"token:{row.id}"
    audit.detail = {"name": row.name, "scopes": row.scopes, "by": who.actor}
    answer = TokenCreated(**TokenPublic.model_validate(row).model_dump(), token=secret)
    session.commit()
    return answer


@router.get("/tokens", responses=_AUTH_ERRORS)
def list_tokens(session: SessionDep, _who: AdminDep) -> list[TokenPublic]:
    """Every API token (never their secrets), oldest first."""
    rows = session.scalars(select(ApiToken).order_by(ApiToken.id))
    return [TokenPublic.model_validate(r) for r in rows]


@router.delete("/tokens/{token_id}", responses={**_AUTH_ERRORS, 404: {"model": ErrorBody}})
def revoke_token(
    token_id: IdPath, session: SessionDep, _who: AdminDep, audit: AuditDep
) -> TokenPublic:
    """Revoke a token (idempotent): it is refused (401) from now on."""
    audit.resource = f"token:{token_id}"
    row = session.get(ApiToken, token_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no token with id {token_id}")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
    answer = TokenPublic.model_validate(row)
    session.commit()
    return answer


@router.post(
    "/join-tokens", status_code=status.HTTP_201_CREATED, responses=_AUTH_ERRORS, tags=["agents"]
)
def create_join_token(
    body: JoinTokenCreate, session: SessionDep, who: OperatorDep, audit: AuditDep
) -> JoinTokenCreated:
    """A single-use token for ``edgefed edge join --token``; the secret is shown once."""
    secret = new_token()
    row = JoinToken(
        token_hash=hash_token(secret),
        labels=dict(body.labels),
        created_by=who.actor,
        expires_at=expiry(body.expires_in_s),
    )
    session.add(row)
    session.flush()
    audit.resource = f"join-token:{row.id}"
    answer = JoinTokenCreated(
        id=row.id, token=secret, labels=dict(row.labels), expires_at=row.expires_at
    )
    session.commit()
    return answer
