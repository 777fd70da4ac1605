"""Session messages on MQTT (the schemas of issue 11's session API).

A holder (an agent) answers :class:`SessionRequest` on ``agents/<agent>/sessions`` with a
:class:`SessionReply` (or an :class:`~edgefed.common.schemas.ErrorReply`) on the request's
response topic, as for inference requests. Two brokers, two kinds of caller:

- the **cloud broker**: only the controller sends session requests there (the broker's ACLs
  let no one else write the topic); it names the session's ``owner`` itself, after checking the
  caller's API token;
- the agent's **local broker** (local apps on the device): the caller proves ownership with an
  ``owner_key`` it chose at ``create``; the agent keeps only a keyed digest of it.

Encrypted context records (:mod:`edgefed.common.sessions.crypto`) and KV caches travel as
tensors in the payload (safetensors, see :func:`edgefed.common.schemas.encode`): the context as
a ``uint8`` tensor named :data:`CONTEXT_TENSOR`, the cache as ``kv.*`` tensors
(:mod:`edgefed.common.sessions.kvcache`). Contexts never cross the broker in clear.

A holder also publishes a :class:`SessionReplica` on ``agents/<agent>/sessions-replica`` after
every change of a session it holds (asynchronously, at most ``replica_lag_s`` late), so the
controller can hand the session to another holder when this one is gone.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from edgefed.common.schemas import Identifier, NonNegative, WireModel, new_id

__all__ = [
    "CONTEXT_TENSOR",
    "SESSION_ID_PATTERN",
    "HandoffRecord",
    "KvFormat",
    "SessionId",
    "SessionOp",
    "SessionReplica",
    "SessionReply",
    "SessionRequest",
    "SessionSummary",
]

CONTEXT_TENSOR = "context"
"""Name of the ``uint8`` tensor that carries an encrypted context record."""

SessionOp = Literal["create", "turn", "get", "list", "delete", "adopt", "export"]
KvFormat = Literal["none", "fp16", "int8"]
HandoffMethod = Literal["kv-fp16", "kv-int8", "rerun"]

SESSION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SessionId = Annotated[str, Field(pattern=SESSION_ID_PATTERN)]


class SessionSummary(WireModel):
    """What a session is, without its messages (listings, replies)."""

    KIND: ClassVar[str] = "session-summary"
    kind: Literal["session-summary"] = "session-summary"

    session_id: SessionId
    model: Identifier
    holder: str | None = None
    version: int = Field(ge=0)
    """Turns taken so far (every change bumps it; copies compare it to stay monotonic)."""
    messages: int = Field(ge=0)
    context_bytes: int = Field(ge=0)
    created_at: float
    expires_at: float
    metadata: dict[str, Any] = Field(default_factory=dict)


class HandoffRecord(WireModel):
    """How a session moved to its holder: recorded per handoff."""

    KIND: ClassVar[str] = "session-handoff"
    kind: Literal["session-handoff"] = "session-handoff"

    session_id: SessionId
    source: str | None
    """The old holder (``None``: taken from the controller's replica)."""
    target: str
    reason: Literal["offline", "drain", "latency", "placement"]
    method: HandoffMethod
    context_tokens: int = Field(ge=0)
    kv_bytes: int = Field(default=0, ge=0)
    estimates_ms: dict[str, NonNegative] = Field(default_factory=dict)
    """The planner's estimate of each method (``kv-fp16``, ``kv-int8``, ``rerun``)."""
    took_ms: NonNegative = 0.0


class SessionRequest(WireModel):
    KIND: ClassVar[str] = "session-request"
    kind: Literal["session-request"] = "session-request"

    request_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    op: SessionOp
    session_id: SessionId | None = None
    owner: str | None = Field(default=None, max_length=200)
    """Set by the controller (cloud broker only): the owner it checked."""
    owner_key: str | None = Field(default=None, min_length=16, max_length=512)
    """Local apps (local broker only): the secret chosen at ``create``."""
    # create
    model: Identifier | None = None
    system_prompt: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    ttl_s: float | None = Field(default=None, gt=0)
    # turn
    message: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    # adopt / export
    kv_format: KvFormat = "none"
    """export: the cache to ship with the context; adopt: the cache that came with it."""
    kv: dict[str, Any] | None = None
    """adopt: metadata of the ``kv.*`` tensors (see
    :func:`edgefed.common.sessions.kvcache.kv_to_wire`)."""
    handoff: HandoffRecord | None = None
    """adopt: the plan the controller made (the holder fills in what it took)."""
    deadline: float | None = None


class SessionReply(WireModel):
    KIND: ClassVar[str] = "session-reply"
    kind: Literal["session-reply"] = "session-reply"

    request_id: str = Field(min_length=1, max_length=128)
    op: SessionOp
    served_by: str
    summary: SessionSummary | None = None
    sessions: list[SessionSummary] = Field(default_factory=list)
    reply: str | None = None
    """turn: the assistant's answer (also appended to the context)."""
    tokens: int = Field(default=0, ge=0)
    context: dict[str, Any] | None = None
    """get: the context in clear (messages, system prompt, metadata) for its owner."""
    handoff: HandoffRecord | None = None
    kv: dict[str, Any] | None = None
    """export: metadata of the ``kv.*`` tensors in the payload, if any, and
    ``bytes_per_token`` (``{"fp16": n, "int8": m}``: what the cache costs on the wire)."""
    context_tokens: int = Field(default=0, ge=0)
    """export: tokens the holder's cache covers (what a re-run would prefill)."""
    timings_ms: dict[str, NonNegative] = Field(default_factory=dict)


class SessionReplica(WireModel):
    """A holder's copy of one session for the controller (``deleted``: the holder dropped it)."""

    KIND: ClassVar[str] = "session-replica"
    kind: Literal["session-replica"] = "session-replica"

    session_id: SessionId
    holder: str
    version: int = Field(ge=0)
    owner: str = Field(max_length=200)
    model: Identifier
    expires_at: float
    deleted: bool = False
    sent_at: float
