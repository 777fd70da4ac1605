"""Bearer tokens and scopes.

A token is ``secrets.token_urlsafe(32)`` (256 random bits); the registry keeps only its SHA-256
(hex), so a database dump holds no usable credential and a lookup is one indexed equality.
Scopes nest: ``admin`` ⊇ ``operator`` ⊇ ``reader``. ``agent`` stands apart: an agent token is
bound to one agent id and reaches only that agent's resources and artifact downloads.

Unknown, expired and revoked tokens are 401 (with ``WWW-Authenticate: Bearer``); a valid token
without the needed scope, or an agent token on another agent's resource, is 403.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi import HTTPException, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefed.cloud.registry.db import as_utc
from edgefed.cloud.registry.models import ApiToken

log = logging.getLogger(__name__)

SCOPE_RANK = {"reader": 1, "operator": 2, "admin": 3}
"""Nested scopes: a token may do what any scope of lower or equal rank allows."""
AGENT_SCOPE = "agent"
ALL_SCOPES = frozenset({*SCOPE_RANK, AGENT_SCOPE})
BOOTSTRAP_ADMIN_NAME = "bootstrap-admin"
ADMIN_TOKEN_FILE = "admin.token"  # noqa: S105 - a file name, not a secret


def new_token() -> str:
    """A fresh secret (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What the registry stores and looks up: SHA-256 hex of the secret."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def unauthorized(detail: str) -> HTTPException:
    """401 with the challenge a bearer-token client expects."""
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": 'Bearer realm="edgefed"'},
    )


def forbidden(detail: str) -> HTTPException:
    return HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail=detail)


@dataclass(frozen=True)
class Principal:
    """Who is calling: one valid API token."""

    token_id: int
    name: str
    scopes: frozenset[str]
    agent_id: str | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"{self.name}#{self.token_id}"

    @property
    def rank(self) -> int:
        return max((SCOPE_RANK.get(s, 0) for s in self.scopes), default=0)

    @property
    def is_agent(self) -> bool:
        return AGENT_SCOPE in self.scopes

    def allows(self, scope: str) -> bool:
        """Whether this caller holds ``scope`` (directly or through a wider one)."""
        if scope == AGENT_SCOPE:
            return self.is_agent
        return self.rank >= SCOPE_RANK[scope]

    def require(self, scope: str) -> None:
        """403 unless this caller holds ``scope``."""
        if not self.allows(scope):
            held = ", ".join(sorted(self.scopes)) or "none"
            raise forbidden(f"this call needs the {scope} scope; the token has: {held}")

    def require_agent_or(self, agent_id: str, scope: str) -> None:
        """403 unless this is ``agent_id``'s own token or the caller holds ``scope``."""
        if self.is_agent:
            if self.agent_id != agent_id:
                raise forbidden(f"an agent token reaches only its own agent ({self.agent_id})")
            return
        self.require(scope)


def authenticate(session: Session, token: str, now: datetime | None = None) -> Principal:
    """The principal behind ``token``; 401 when it is unknown, expired or revoked."""
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == hash_token(token))).first()
    if row is None:
        raise unauthorized("unknown bearer token")
    if row.revoked_at is not None:
        raise unauthorized("this token has been revoked")
    expires = as_utc(row.expires_at)
    if expires is not None and expires <= (now or datetime.now(UTC)):
        raise unauthorized("this token has expired")
    return Principal(
        token_id=row.id,
        name=row.name,
        scopes=frozenset(str(s) for s in row.scopes),
        agent_id=row.agent_id,
    )


def expiry(seconds: int | None, now: datetime | None = None) -> datetime | None:
    """When a token created now with a lifetime of ``seconds`` expires (None: never)."""
    if seconds is None:
        return None
    return (now or datetime.now(UTC)) + timedelta(seconds=seconds)


def active_admin_exists(session: Session, now: datetime | None = None) -> bool:
    """Whether any unrevoked, unexpired token holds the admin scope."""
    moment = now or datetime.now(UTC)
    for row in session.scalars(select(ApiToken).where(ApiToken.revoked_at.is_(None))):
        expires = as_utc(row.expires_at)
        if "admin" in row.scopes and (expires is None or expires > moment):
            return True
    return False


def bootstrap_admin(session: Session, data_dir: Path) -> Path | None:
    """When no admin token exists, create one and write it to ``data_dir/admin.token`` (0600).

    Returns the file written, or None when an admin token already existed. Commits.
    """
    if active_admin_exists(session):
        return None
    token = new_token()
    session.add(ApiToken(name=BOOTSTRAP_ADMIN_NAME, token_hash=hash_token(token), scopes=["admin"]))
    path = data_dir / ADMIN_TOKEN_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        session.commit()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    log.warning(
        "created the first admin token (%s); it is in %s (mode 0600): read it from there, "
        "create your own tokens with it (POST /api/v1/tokens), then revoke it",
        BOOTSTRAP_ADMIN_NAME,
        path,
    )
    return path
