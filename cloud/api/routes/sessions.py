"""Conversation sessions: ``/api/v1/sessions`` (issue 11).

A session belongs to the API token that created it (any valid token may create sessions): no
other token can see, continue or delete it -- for them it does not exist (404, never 403).

Answers: 404 unknown session (or another token's); 410 expired (its context is deleted
everywhere; the answer says when it expired); 413 a turn or a new session over the size limits
(nothing changed); 422 bad input; 503 (``Retry-After``) no live agent serves the model, or the
session service is not running; 504 the holder did not answer in time; 502 the holder failed.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel, Field, StringConstraints

from edgefed.cloud.api.deps import AUTH_ERRORS, AuditDep, ReaderDep, ServicesDep, SessionDep
from edgefed.cloud.api.schemas import ErrorBody, Identifier, _In
from edgefed.cloud.api.security import Principal
from edgefed.cloud.services import SessionControl
from edgefed.common.errors import (
    EdgefedError,
    ErrorCode,
    PayloadError,
    RemoteError,
    RequestTimeout,
    TemporaryError,
)
from edgefed.common.sessions.context import owner_of_token
from edgefed.common.sessions.errors import SessionExpired, SessionNotFound, SessionTooLarge
from edgefed.common.sessions.wire import SESSION_ID_PATTERN, SessionSummary

router = APIRouter(prefix="/api/v1", tags=["sessions"])

SessionIdPath = Annotated[
    str, Path(pattern=SESSION_ID_PATTERN, description="A session id (from POST /sessions)")
]

_NOT_FOUND = {"model": ErrorBody, "description": "no such session for this token"}
_GONE = {"model": ErrorBody, "description": "the session expired (its copies are deleted)"}
_UNAVAILABLE = {
    "model": ErrorBody,
    "description": "no live agent serves the model, or sessions are off (see Retry-After)",
}

_REMOTE_STATUS = {
    ErrorCode.NOT_FOUND: status.HTTP_404_NOT_FOUND,
    ErrorCode.GONE: status.HTTP_410_GONE,
    ErrorCode.TOO_LARGE: status.HTTP_413_CONTENT_TOO_LARGE,
    ErrorCode.MALFORMED: status.HTTP_422_UNPROCESSABLE_CONTENT,
    ErrorCode.UNSUPPORTED_VERSION: status.HTTP_422_UNPROCESSABLE_CONTENT,
    ErrorCode.OVERLOADED: status.HTTP_429_TOO_MANY_REQUESTS,
    ErrorCode.EXPIRED: status.HTTP_504_GATEWAY_TIMEOUT,
    ErrorCode.TIMEOUT: status.HTTP_504_GATEWAY_TIMEOUT,
    ErrorCode.UNAVAILABLE: status.HTTP_503_SERVICE_UNAVAILABLE,
}


# ------------------------------------------------------------------ bodies


class SessionCreate(_In):
    model: Identifier
    """The model the session talks to (served by the fleet's agents)."""
    system_prompt: Annotated[str, StringConstraints(max_length=100_000)] | None = None
    metadata: Annotated[dict[str, Any], Field(max_length=64)] = Field(default_factory=dict)
    """Free JSON kept with the session (counts towards its size limit)."""
    ttl_s: Annotated[float, Field(gt=0, le=10 * 365 * 86_400)] | None = None
    """Idle lifetime (every turn restarts it); the controller's default when unset."""


class TurnIn(_In):
    message: Annotated[str, StringConstraints(min_length=1, max_length=100_000)]
    """The user's message; the answer is generated from the whole conversation so far."""
    parameters: Annotated[dict[str, Any], Field(max_length=32)] = Field(default_factory=dict)
    """Generation parameters (e.g. ``max_new_tokens``)."""
    timeout_s: Annotated[float, Field(gt=0, le=600)] | None = None
    """How long the turn may take; the controller's ``turn_timeout_s`` when unset."""


class ChatMessageOut(BaseModel):
    role: str
    content: str


class SessionOut(BaseModel):
    session_id: str
    model: str
    holder: str | None
    """The agent that keeps the session now (none before its first turn)."""
    version: int
    """Turns taken so far."""
    messages: int
    context_bytes: int
    created_at: float
    expires_at: float
    """Unix seconds; every turn moves it to now + the session's TTL."""
    metadata: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, s: SessionSummary) -> SessionOut:
        return cls.model_validate(s.model_dump(exclude={"kind", "v"}))


class SessionDetailOut(SessionOut):
    state: str
    system_prompt: str | None
    history: list[ChatMessageOut]
    """The conversation so far, oldest first (user and assistant messages)."""
    last_handoff: dict[str, Any] | None = None
    """How the session last moved between holders (method, reason, estimates)."""


class TurnOut(BaseModel):
    session_id: str
    reply: str
    tokens: int
    """Tokens generated."""
    holder: str
    """The agent that answered (and keeps the session now)."""
    version: int
    messages: int
    expires_at: float
    handoff: dict[str, Any] | None = None
    """Set when the session moved to another holder for this turn: from where, why, how
    (``kv-fp16``, ``kv-int8`` or ``rerun``), the planner's estimates and the time it took."""
    timings_ms: dict[str, float] = Field(default_factory=dict)


# ------------------------------------------------------------------ helpers


def _service(services: ServicesDep, session_id: str | None = None) -> SessionControl:
    """The session service; without one (sessions off, or the API running without its
    services) a session named in the path does not exist here."""
    if services.sessions is None:
        if session_id is not None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"no session {session_id!r} (this controller serves no sessions)",
            )
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "sessions are not served here (they run with `edgefed cloud serve` and "
            "[controller.sessions] enabled)",
            headers={"Retry-After": "5"},
        )
    return services.sessions


def _release(session: SessionDep) -> None:
    """End the request's own transaction (it only checked the token) before the service
    writes the session's row: on SQLite it holds the write lock until it ends."""
    session.commit()


def _owner(who: Principal) -> str:
    return owner_of_token(who.token_id)


def _retry_after(exc: EdgefedError) -> dict[str, str]:
    wait = getattr(exc, "retry_after", None)
    return {"Retry-After": str(max(1, math.ceil(wait or 1)))}


def _http_error(exc: Exception) -> HTTPException:
    """The HTTP answer for an error of the session service."""
    if isinstance(exc, SessionNotFound):
        return HTTPException(status.HTTP_404_NOT_FOUND, exc.message)
    if isinstance(exc, SessionExpired):
        return HTTPException(status.HTTP_410_GONE, exc.message)
    if isinstance(exc, SessionTooLarge):
        return HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, exc.message)
    if isinstance(exc, RequestTimeout):
        return HTTPException(status.HTTP_504_GATEWAY_TIMEOUT, exc.message)
    if isinstance(exc, RemoteError):
        code = _REMOTE_STATUS.get(exc.code, status.HTTP_502_BAD_GATEWAY)
        headers = (
            _retry_after(exc)
            if code in (status.HTTP_429_TOO_MANY_REQUESTS, status.HTTP_503_SERVICE_UNAVAILABLE)
            else None
        )
        return HTTPException(code, f"the holder answered: {exc.remote_message}", headers=headers)
    if isinstance(exc, PayloadError):
        return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, exc.message)
    if isinstance(exc, TemporaryError):
        return HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, exc.message, headers=_retry_after(exc)
        )
    if isinstance(exc, EdgefedError):
        return HTTPException(status.HTTP_502_BAD_GATEWAY, exc.message)
    raise exc


_ERRORS = (EdgefedError,)


# ------------------------------------------------------------------ routes


@router.post(
    "/sessions",
    status_code=status.HTTP_201_CREATED,
    responses={
        **AUTH_ERRORS,
        413: {"model": ErrorBody, "description": "the system prompt or metadata is too large"},
        503: _UNAVAILABLE,
    },
)
async def create_session(
    body: SessionCreate, services: ServicesDep, who: ReaderDep, audit: AuditDep, db: SessionDep
) -> SessionOut:
    """Start a conversation with a model; it is placed on an agent at its first turn."""
    control = _service(services)
    _release(db)
    try:
        summary = await control.create(
            _owner(who),
            model=body.model,
            system_prompt=body.system_prompt,
            metadata=body.metadata,
            ttl_s=body.ttl_s,
        )
    except _ERRORS as exc:
        raise _http_error(exc) from exc
    audit.resource = f"session:{summary.session_id}"
    audit.detail = {"model": body.model}
    return SessionOut.of(summary)


@router.get("/sessions", responses={**AUTH_ERRORS, 503: _UNAVAILABLE})
async def list_sessions(services: ServicesDep, who: ReaderDep) -> list[SessionOut]:
    """This token's active sessions."""
    if services.sessions is None:
        return []
    control = services.sessions
    try:
        return [SessionOut.of(s) for s in await control.list_sessions(_owner(who))]
    except _ERRORS as exc:
        raise _http_error(exc) from exc


@router.get(
    "/sessions/{session_id}",
    responses={**AUTH_ERRORS, 404: _NOT_FOUND, 410: _GONE, 503: _UNAVAILABLE},
)
async def get_session(
    session_id: SessionIdPath, services: ServicesDep, who: ReaderDep
) -> SessionDetailOut:
    """One session of this token, with its conversation so far."""
    control = _service(services, session_id)
    try:
        view = await control.get(_owner(who), session_id)
    except _ERRORS as exc:
        raise _http_error(exc) from exc
    base = SessionOut.of(view.summary)
    return SessionDetailOut(
        **base.model_dump(),
        state=view.state,
        system_prompt=view.system_prompt,
        history=[ChatMessageOut(role=m.role, content=m.content) for m in view.messages],
        last_handoff=(
            view.last_handoff.model_dump(mode="json") if view.last_handoff is not None else None
        ),
    )


@router.post(
    "/sessions/{session_id}/turns",
    responses={
        **AUTH_ERRORS,
        404: _NOT_FOUND,
        410: _GONE,
        413: {"model": ErrorBody, "description": "the turn would take the session over a limit"},
        502: {"model": ErrorBody, "description": "the holder failed"},
        503: _UNAVAILABLE,
        504: {"model": ErrorBody, "description": "the holder did not answer in time"},
    },
)
async def take_turn(
    session_id: SessionIdPath,
    body: TurnIn,
    services: ServicesDep,
    who: ReaderDep,
    audit: AuditDep,
    db: SessionDep,
) -> TurnOut:
    """Send the next user message; the answer uses the whole conversation so far."""
    control = _service(services, session_id)
    _release(db)
    audit.resource = f"session:{session_id}"
    try:
        outcome = await control.turn(
            _owner(who), session_id, body.message, body.parameters, timeout=body.timeout_s
        )
    except _ERRORS as exc:
        raise _http_error(exc) from exc
    if outcome.handoff is not None:
        audit.detail = {
            "handoff": outcome.handoff.method,
            "reason": outcome.handoff.reason,
            "holder": outcome.holder,
        }
    return TurnOut(
        session_id=session_id,
        reply=outcome.reply,
        tokens=outcome.tokens,
        holder=outcome.holder,
        version=outcome.summary.version,
        messages=outcome.summary.messages,
        expires_at=outcome.summary.expires_at,
        handoff=outcome.handoff.model_dump(mode="json") if outcome.handoff is not None else None,
        timings_ms=dict(outcome.timings_ms),
    )


@router.delete(
    "/sessions/{session_id}",
    responses={**AUTH_ERRORS, 404: _NOT_FOUND, 410: _GONE, 503: _UNAVAILABLE},
)
async def delete_session(
    session_id: SessionIdPath,
    services: ServicesDep,
    who: ReaderDep,
    audit: AuditDep,
    db: SessionDep,
) -> SessionOut:
    """Delete the session and every copy of it (agents offline now delete theirs when they
    are back)."""
    control = _service(services, session_id)
    _release(db)
    audit.resource = f"session:{session_id}"
    try:
        summary = await control.delete(_owner(who), session_id)
    except _ERRORS as exc:
        raise _http_error(exc) from exc
    return SessionOut.of(summary)
