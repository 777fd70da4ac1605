"""A session's context: the conversation a holder keeps for its owner.

A :class:`SessionContext` is what a holder stores (encrypted, :mod:`.crypto`) and hands over
between holders: the system prompt, the messages so far, metadata, the session's expiry and a
``version`` that every change bumps (copies compare it so that an older copy never replaces a
newer one). Changes make new objects (:meth:`SessionContext.with_turn`): a turn that fails
leaves the context it started from untouched.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
import secrets
from datetime import UTC, datetime
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefed.common.schemas import Identifier
from edgefed.common.sessions.errors import SessionExpired, SessionKeyError, SessionTooLarge
from edgefed.common.sessions.wire import SESSION_ID_PATTERN, SessionId, SessionSummary

__all__ = [
    "ChatMessage",
    "SessionContext",
    "SessionLimits",
    "is_session_id",
    "new_session_id",
    "owner_of_key",
    "owner_of_token",
]

_SESSION_ID = re.compile(SESSION_ID_PATTERN)
OWNER_DIGEST_INFO = b"edgefed owner"
"""HKDF ``info`` of the key that digests owner keys (:func:`owner_of_key`)."""


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(frozen=True)

    role: Literal["system", "user", "assistant"]
    content: str


class SessionLimits(BaseModel):
    """How large a session may grow."""

    model_config = ConfigDict(frozen=True)

    max_context_bytes: int = Field(default=64_000, ge=1)
    """UTF-8 bytes of the system prompt, all message contents and the metadata (as JSON)."""
    max_messages: int = Field(default=200, ge=1)
    """Messages in the history (a turn adds two: the user's and the assistant's)."""


def _metadata_bytes(metadata: dict[str, Any]) -> int:
    if not metadata:
        return 0
    text = json.dumps(metadata, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return len(text.encode("utf-8"))


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


class SessionContext(BaseModel):
    """A session: who owns it, for which model, and the conversation so far."""

    session_id: SessionId
    owner: str = Field(min_length=1, max_length=200)
    model: Identifier
    system_prompt: str | None = None
    messages: list[ChatMessage] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: float
    expires_at: float
    ttl_s: float = Field(gt=0)
    """Idle lifetime: every turn moves ``expires_at`` to ``now + ttl_s``."""
    version: int = Field(default=0, ge=0)
    limits: SessionLimits = Field(default_factory=SessionLimits)

    @field_validator("metadata")
    @classmethod
    def _metadata_is_json(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be plain JSON (no NaN, no objects): {exc}") from exc
        return value

    # ------------------------------------------------------------------------ size and limits

    def size_bytes(self) -> int:
        """UTF-8 bytes counted against ``limits.max_context_bytes``."""
        size = len((self.system_prompt or "").encode("utf-8"))
        size += sum(len(m.content.encode("utf-8")) for m in self.messages)
        return size + _metadata_bytes(self.metadata)

    def _too_large(self, limit: str, allowed: int, size: int, unit: str) -> SessionTooLarge:
        return SessionTooLarge(
            f"session {self.session_id} would have {size:,} {unit}, over its limit "
            f"{limit} = {allowed:,}; "
            "nothing was changed: start a new session (or delete this one), or send a shorter "
            "message",
            limit=limit,
            allowed=allowed,
            size=size,
        )

    def _check(self, messages: int, size: int) -> None:
        if messages > self.limits.max_messages:
            raise self._too_large("max_messages", self.limits.max_messages, messages, "messages")
        if size > self.limits.max_context_bytes:
            raise self._too_large(
                "max_context_bytes", self.limits.max_context_bytes, size, "bytes of context"
            )

    def check_limits(self) -> None:
        """Raise :class:`SessionTooLarge` (naming the limit and the size) if over a limit."""
        self._check(len(self.messages), self.size_bytes())

    def check_can_add(self, user: str, reserve_bytes: int = 0) -> None:
        """Raise :class:`SessionTooLarge` if a turn with this ``user`` message (and an answer of
        up to ``reserve_bytes``) would take the session over a limit: check before running it."""
        size = self.size_bytes() + len(user.encode("utf-8")) + max(0, reserve_bytes)
        self._check(len(self.messages) + 2, size)

    # ------------------------------------------------------------------------ changes

    def with_turn(self, user: str, assistant: str, now: float) -> SessionContext:
        """A new context with this exchange appended, ``version + 1`` and its expiry moved to
        ``now + ttl_s``; this one is left as it was. Raises :class:`SessionTooLarge` if the
        result would be over a limit."""
        new = self.model_copy(
            update={
                "messages": [
                    *self.messages,
                    ChatMessage(role="user", content=user),
                    ChatMessage(role="assistant", content=assistant),
                ],
                "metadata": copy.deepcopy(self.metadata),
                "version": self.version + 1,
                "expires_at": now + self.ttl_s,
            }
        )
        new.check_limits()
        return new

    # ------------------------------------------------------------------------ expiry

    def expired(self, now: float) -> bool:
        return now >= self.expires_at

    def check_alive(self, now: float) -> None:
        """Raise :class:`SessionExpired` if the session has expired at ``now``."""
        if self.expired(now):
            raise SessionExpired(
                f"session {self.session_id} expired at {_when(self.expires_at)} "
                f"({now - self.expires_at:,.0f} s ago, after {self.ttl_s:,.0f} s without a "
                "turn): start a new session"
            )

    # ------------------------------------------------------------------------ views

    def summary(self, holder: str | None) -> SessionSummary:
        return SessionSummary(
            session_id=self.session_id,
            model=self.model,
            holder=holder,
            version=self.version,
            messages=len(self.messages),
            context_bytes=self.size_bytes(),
            created_at=self.created_at,
            expires_at=self.expires_at,
            metadata=copy.deepcopy(self.metadata),
        )

    def chat(self, next_user: str | None) -> list[ChatMessage]:
        """The conversation to render for the model: the system prompt (if any), the history
        and, if given, the next user message."""
        chat: list[ChatMessage] = []
        if self.system_prompt is not None:
            chat.append(ChatMessage(role="system", content=self.system_prompt))
        chat.extend(self.messages)
        if next_user is not None:
            chat.append(ChatMessage(role="user", content=next_user))
        return chat


def is_session_id(text: str) -> bool:
    """Whether ``text`` is a valid session id (:data:`SESSION_ID_PATTERN`)."""
    return _SESSION_ID.fullmatch(text) is not None


def new_session_id() -> str:
    """A fresh session id: 128 random bits as 32 hex digits (URL-safe, a valid id)."""
    return secrets.token_hex(16)


def owner_digest_key(fleet_key: bytes) -> bytes:
    """The key that digests owner keys, derived from the fleet key (HKDF-SHA256)."""
    if len(fleet_key) != 32:
        raise SessionKeyError(f"a fleet session key has 32 bytes, not {len(fleet_key)}")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=OWNER_DIGEST_INFO)
    return hkdf.derive(fleet_key)


def owner_of_key(fleet_key: bytes, owner_key: str) -> str:
    """The owner of a local app's session: ``"key:"`` + a keyed digest of its secret (the
    holder never stores the secret itself). Equals ``"key:" + FleetKey.digest(...)``."""
    digest = hmac.new(owner_digest_key(fleet_key), owner_key.encode("utf-8"), hashlib.sha256)
    return "key:" + digest.hexdigest()


def owner_of_token(token_id: int) -> str:
    """The owner of a session created through the HTTP API with API token ``token_id``."""
    return f"token:{token_id}"
