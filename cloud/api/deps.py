"""Dependencies of the routes, as ``Annotated`` aliases: the controller state, a database
session (one transaction per request), the calling principal (authenticated, rate limited) and
scope requirements.

Usage::

    @router.post("/models")
    def create_model(body: ModelCreate, session: SessionDep, who: OperatorDep) -> ModelPublic:
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from edgefed.cloud.api.audit import AUDITED_METHODS, AuditContext, audit_context
from edgefed.cloud.api.schemas import MAX_INT32, ErrorBody
from edgefed.cloud.api.security import Principal, authenticate, unauthorized
from edgefed.cloud.api.state import ControllerState
from edgefed.cloud.services import Services


def get_state(request: Request) -> ControllerState:
    """The controller state built by the lifespan (503 before start-up finished)."""
    state = getattr(request.app.state, "controller", None)
    if not isinstance(state, ControllerState):
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the controller is starting")
    return state


StateDep = Annotated[ControllerState, Depends(get_state)]


def get_services(request: Request) -> Services:
    """The background services (``app.state.services``; may be replaced after start-up)."""
    services = getattr(request.app.state, "services", None)
    return services if isinstance(services, Services) else Services()


ServicesDep = Annotated[Services, Depends(get_services)]


def get_session(request: Request, state: StateDep) -> Iterator[Session]:
    """A session for this request: routes commit once at the end; anything not committed
    (an error on the way) is rolled back when the session closes, before the answer is sent."""
    factory = state.write_sessions if request.method in AUDITED_METHODS else state.sessions
    session = factory()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# scope="function": the session closes when the route returns, before the response is sent
# (so its transaction never overlaps the audit record written at that moment).
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def get_audit(request: Request) -> AuditContext:
    return audit_context(request)


AuditDep = Annotated[AuditContext, Depends(get_audit)]

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="An API token (`Authorization: Bearer <token>`); agents use their own.",
)


def get_principal(
    request: Request,
    session: SessionDep,
    state: StateDep,
    audit: AuditDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> Principal:
    """The caller behind the bearer token: 401 without a valid one, 429 over its rate.

    Calls with a missing or invalid token are limited per client address (so guessing tokens
    or hammering the API without one costs the guesser, not the database)."""
    try:
        if credentials is None or not credentials.credentials:
            raise unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        principal = authenticate(session, credentials.credentials)
    except HTTPException:
        client = request.client.host if request.client else "unknown"
        state.limiter.check(f"addr:{client}")
        raise
    audit.actor = principal.actor
    state.limiter.check(f"token:{principal.token_id}")
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(scope: str) -> Callable[[Principal], Principal]:
    """A dependency: the principal, if it holds ``scope`` (403 otherwise)."""

    def dependency(principal: PrincipalDep) -> Principal:
        principal.require(scope)
        return principal

    dependency.__name__ = f"require_{scope}"
    return dependency


AdminDep = Annotated[Principal, Depends(require("admin"))]
OperatorDep = Annotated[Principal, Depends(require("operator"))]
ReaderDep = Annotated[Principal, Depends(require("reader"))]


def limit_anonymous(request: Request, state: StateDep) -> None:
    """Rate limit for calls without a token (agent enrolment), keyed by client address."""
    client = request.client.host if request.client else "unknown"
    state.limiter.check(f"addr:{client}")


AnonymousLimitDep = Annotated[None, Depends(limit_anonymous)]


IdPath = Annotated[int, Path(ge=1, le=MAX_INT32, description="A numeric id")]
"""A numeric id in a path (bounded: anything larger is a 422, not a database error)."""

AUTH_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "no, unknown, expired or revoked token"},
    403: {"model": ErrorBody, "description": "the token lacks the scope"},
    429: {"model": ErrorBody, "description": "over the rate limit (see Retry-After)"},
}
"""OpenAPI documentation of the answers every authenticated route can give."""
