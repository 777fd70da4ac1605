"""The audit log: every POST/PUT/PATCH/DELETE under ``/api/v1`` leaves one :class:`AuditRecord`
(actor, action, resource, outcome = HTTP status, time), whether it succeeded or not.

A pure ASGI middleware writes the record in its own transaction when the response starts --
so a request whose own transaction rolled back still gets its row, and the row exists before
the client sees the answer. For error answers (status >= 400) it holds the (small) body back
until the record, with the error's ``detail``, is written. Routes and dependencies fill in
the :class:`AuditContext` of the request (who is calling, what resource was touched).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from anyio import to_thread
from sqlalchemy import select
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edgefed.cloud.api.security import hash_token
from edgefed.cloud.api.state import ControllerState
from edgefed.cloud.registry.db import session_scope
from edgefed.cloud.registry.models import ApiToken, AuditRecord

log = logging.getLogger(__name__)

AUDITED_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
AUDIT_SCOPE_KEY = "edgefed.audit"
ANONYMOUS = "anonymous"
_HELD_BODY_LIMIT = 64 * 1024


@dataclass
class AuditContext:
    """What the request tells the audit log about itself (filled while it runs)."""

    actor: str | None = None
    resource: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def audit_context(request: Request) -> AuditContext:
    """The request's audit context (a throwaway one for requests that are not audited)."""
    ctx = request.scope.get(AUDIT_SCOPE_KEY)
    return ctx if isinstance(ctx, AuditContext) else AuditContext()


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            text: str = bytes(value).decode("latin-1")
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _client(scope: Scope) -> str | None:
    client = scope.get("client")
    return str(client[0]) if client else None


def _error_detail(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300].decode("utf-8", "replace") or None
    if isinstance(data, dict) and "detail" in data:
        detail = data["detail"]
        text = detail if isinstance(detail, str) else json.dumps(detail)
        return str(text)[:1000]
    return None


def write_record(
    state: ControllerState,
    *,
    scope: Scope,
    ctx: AuditContext,
    outcome: int,
    error: str | None,
) -> None:
    """Insert one audit record in its own transaction (blocking; never raises)."""
    method = str(scope.get("method", ""))
    path = str(scope.get("path", ""))
    detail: dict[str, Any] = {"client": _client(scope), **ctx.detail}
    if error:
        detail["error"] = error
    try:
        with session_scope(state.write_sessions) as session:
            actor = ctx.actor
            if actor is None:
                token = _bearer(scope)
                row = (
                    session.scalars(
                        select(ApiToken).where(ApiToken.token_hash == hash_token(token))
                    ).first()
                    if token
                    else None
                )
                actor = f"{row.name}#{row.id}" if row is not None else ANONYMOUS
            session.add(
                AuditRecord(
                    actor=actor[:128],
                    action=f"{method} {path}"[:128],
                    resource=ctx.resource or path,
                    outcome=outcome,
                    detail=detail,
                )
            )
    except Exception:
        log.exception("could not write the audit record of %s %s (%d)", method, path, outcome)


class AuditMiddleware:
    """Writes an audit record for every mutating call under ``prefix``."""

    def __init__(self, app: ASGIApp, prefix: str = "/api/v1") -> None:
        self.app = app
        self.prefix = prefix.rstrip("/")

    def _audited(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope.get("method") not in AUDITED_METHODS:
            return False
        path = str(scope.get("path", ""))
        return path == self.prefix or path.startswith(self.prefix + "/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = getattr(scope["app"].state, "controller", None) if "app" in scope else None
        if not self._audited(scope) or not isinstance(state, ControllerState):
            await self.app(scope, receive, send)
            return
        ctx = AuditContext()
        scope[AUDIT_SCOPE_KEY] = ctx
        written = False
        held: Message | None = None
        held_body: list[bytes] = []
        status = 500

        async def record(error: str | None) -> None:
            nonlocal written
            written = True
            await to_thread.run_sync(
                lambda: write_record(state, scope=scope, ctx=ctx, outcome=status, error=error)
            )

        async def audited_send(message: Message) -> None:
            nonlocal held, status
            if written:
                await send(message)
                return
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if status < 400:
                    await record(None)
                    await send(message)
                else:
                    held = message
                return
            if message["type"] == "http.response.body" and held is not None:
                held_body.append(message.get("body", b""))
                more = bool(message.get("more_body", False))
                if more and sum(map(len, held_body)) < _HELD_BODY_LIMIT:
                    return
                body = b"".join(held_body)
                await record(_error_detail(body))
                await send(held)
                await send({"type": "http.response.body", "body": body, "more_body": more})
                return
            await send(message)

        try:
            await self.app(scope, receive, audited_send)
        except Exception as exc:
            if not written:
                status = 500
                await record(f"internal error: {type(exc).__name__}")
            raise
