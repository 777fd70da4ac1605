"""The holder of conversation sessions: the agent-side half of the session API.

A :class:`SessionHolder` keeps the sessions placed on it: each one's context (encrypted at rest in
a :class:`~edgefed.common.sessions.store.SessionStore`) and, in memory, the KV cache of the
tokens its last turn ran, so that the next turn only prefills what is new. It answers
:class:`~edgefed.common.sessions.wire.SessionRequest` on two brokers:

- the **cloud broker** (:meth:`handle_cloud`): only the controller writes there; it names the
  owner it checked, and may move sessions (``export`` here, ``adopt`` on the new holder);
- the **local broker** (:meth:`handle_local`): apps on the device prove ownership with the
  ``owner_key`` they chose at ``create``; the holder keeps only a keyed digest of it.
  ``adopt`` and ``export`` are refused there.

After every change the holder publishes a :class:`~edgefed.common.sessions.wire.SessionReplica`
with the sealed context (:meth:`replicate`, at most ``replica_lag_s`` late, changes of one
session coalesced), so the controller can hand the session to another holder when this one is
gone. A turn the controller routes also returns the sealed context in its reply: the
controller's copy is then current at once, whatever happens to this holder after.

Errors: an unknown session and another owner's session are the same :class:`SessionNotFound`
(no one learns that a session exists); an expired one is :class:`SessionExpired` and its local
copy is deleted as the error is sent; a turn that would take the context over its limits is
:class:`SessionTooLarge` and changes nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgefed.common.errors import PayloadError, TemporaryError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.schemas import Decoded, Encoded, encode
from edgefed.common.serving.runtime import OnnxModel
from edgefed.common.sessions.chat import ChatFormat
from edgefed.common.sessions.context import (
    SessionContext,
    SessionLimits,
    new_session_id,
)
from edgefed.common.sessions.crypto import FleetKey
from edgefed.common.sessions.errors import SessionConflict, SessionNotFound, SessionStoreError
from edgefed.common.sessions.kvcache import KvCache, kv_from_wire, kv_to_wire
from edgefed.common.sessions.store import SessionStore
from edgefed.common.sessions.wire import (
    CONTEXT_TENSOR,
    HandoffRecord,
    SessionReplica,
    SessionReply,
    SessionRequest,
)
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)

__all__ = ["HolderSettings", "SessionHolder", "local_owner"]

LOCAL_OPS = frozenset({"create", "turn", "get", "list", "delete"})
"""What local apps may ask (moving sessions is the controller's business)."""


@dataclass(frozen=True)
class HolderSettings:
    default_ttl_s: float = 3600.0
    max_ttl_s: float = 7 * 24 * 3600.0
    limits: SessionLimits = field(default_factory=SessionLimits)
    replica_lag_s: float = 0.5
    """A change reaches the controller's replica at most this late (while the link is up)."""
    max_sessions: int = 1000
    sweep_s: float = 5.0
    """How often expired sessions are looked for."""


def local_owner(key: FleetKey, owner_key: str) -> str:
    """The owner of a session a local app created with ``owner_key`` (a keyed digest)."""
    return "key:" + key.digest(owner_key.encode())


ModelLookup = Callable[[str], OnnxModel]
ChatFormats = Callable[[OnnxModel], ChatFormat]


class SessionHolder:
    def __init__(
        self,
        *,
        holder_id: str,
        topics: Topics,
        key: FleetKey,
        store: SessionStore,
        models: ModelLookup,
        chat_format: ChatFormats,
        settings: HolderSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.holder_id = holder_id
        self.topics = topics
        self.key = key
        self.store = store
        self.models = models
        self.chat_format = chat_format
        self.settings = settings or HolderSettings()
        self.clock = clock
        self._contexts: dict[str, SessionContext] = {}
        self._caches: dict[str, KvCache] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._dirty: dict[str, tuple[SessionContext, bool]] = {}
        """Sessions whose replica is due: the context (as kept, or as dropped) and whether it
        was dropped."""
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ state

    def restore(self) -> list[str]:
        """Load the contexts kept on disk (expired ones are deleted); returns their ids."""
        now = self.clock()
        for sid in self.store.purge_expired(now):
            log.info("session %s expired while the holder was down: deleted", sid)
        for ctx in self.store.load_all(now):
            self._contexts[ctx.session_id] = ctx
        return sorted(self._contexts)

    def sessions(self) -> list[str]:
        return sorted(self._contexts)

    def context(self, session_id: str) -> SessionContext | None:
        return self._contexts.get(session_id)

    def cache(self, session_id: str) -> KvCache | None:
        return self._caches.get(session_id)

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    def _own(self, session_id: str | None, owner: str) -> SessionContext:
        if not session_id:
            raise PayloadError("session_id is required")
        ctx = self._contexts.get(session_id)
        if ctx is None or ctx.owner != owner:
            raise SessionNotFound(f"no session {session_id!r} here")
        now = self.clock()
        if ctx.expired(now):
            self._drop(session_id)
            ctx.check_alive(now)  # raises SessionExpired with the time it expired
        return ctx

    def _keep(self, ctx: SessionContext) -> None:
        self.store.save(ctx)
        self._contexts[ctx.session_id] = ctx
        self._mark(ctx, deleted=False)

    def _drop(self, session_id: str) -> None:
        """Delete the session here: its file first (a failure raises and keeps it whole, to be
        retried), then what is in memory; the controller hears of it."""
        self.store.delete(session_id)
        ctx = self._contexts.pop(session_id, None)
        self._caches.pop(session_id, None)
        self._locks.pop(session_id, None)
        if ctx is not None:
            self._mark(ctx, deleted=True)

    def _mark(self, ctx: SessionContext, *, deleted: bool) -> None:
        """Queue the session's replica (the newest change of a session wins)."""
        self._dirty[ctx.session_id] = (ctx, deleted)
        self._changed.set()

    def _replica(self, ctx: SessionContext, *, deleted: bool) -> SessionReplica:
        return SessionReplica(
            session_id=ctx.session_id,
            holder=self.holder_id,
            version=ctx.version,
            owner=ctx.owner,
            model=ctx.model,
            expires_at=ctx.expires_at,
            deleted=deleted,
            sent_at=self.clock(),
        )

    def _sealed(self, ctx: SessionContext) -> dict[str, np.ndarray]:
        record = self.key.seal_context(self.topics.fleet, ctx)
        return {CONTEXT_TENSOR: np.frombuffer(record, dtype=np.uint8)}

    def _open(self, session_id: str, tensors: Mapping[str, np.ndarray]) -> SessionContext:
        record = tensors.get(CONTEXT_TENSOR)
        if record is None:
            raise PayloadError(f"no {CONTEXT_TENSOR!r} tensor with the session's context")
        ctx = self.key.open_context(
            self.topics.fleet, session_id, np.ascontiguousarray(record, np.uint8).tobytes()
        )
        if ctx.session_id != session_id:  # pragma: no cover - the AAD already binds it
            raise PayloadError(f"the context is of session {ctx.session_id}, not {session_id}")
        return ctx

    # ------------------------------------------------------------------ requests

    async def handle_cloud(self, decoded: Decoded[SessionRequest], _message: Message) -> Encoded:
        """A request from the controller (cloud broker): it names the owner it checked."""
        request = decoded.message
        if not request.owner:
            raise PayloadError("a session request on the cloud link must name its owner")
        return await self._handle(request, request.owner, decoded.tensors)

    async def handle_local(self, decoded: Decoded[SessionRequest], _message: Message) -> Encoded:
        """A request from an app on the device (local broker): ownership by ``owner_key``."""
        request = decoded.message
        if request.op not in LOCAL_OPS:
            raise PayloadError(f"op {request.op!r} is not offered to local apps")
        if not request.owner_key:
            raise PayloadError("owner_key is required (the secret chosen at create)")
        return await self._handle(request, local_owner(self.key, request.owner_key), {})

    async def _handle(
        self, request: SessionRequest, owner: str, tensors: Mapping[str, np.ndarray]
    ) -> Encoded:
        op = request.op
        if op == "list":
            now = self.clock()
            own = [
                c.summary(self.holder_id)
                for c in self._contexts.values()
                if c.owner == owner and not c.expired(now)
            ]
            return encode(self._reply(request, sessions=own))
        if op == "create":
            return encode(self._create(request, owner))
        sid = request.session_id
        if not sid:
            raise PayloadError(f"op {op!r} needs a session_id")
        async with self._lock(sid):
            if op == "adopt":
                return await self._adopt(request, owner, tensors)
            if op == "delete":
                ctx = self._contexts.get(sid)
                if ctx is None or ctx.owner != owner:
                    raise SessionNotFound(f"no session {sid!r} here")
                self._drop(sid)
                log.info("session %s deleted", sid)
                return encode(self._reply(request, summary=ctx.summary(None)))
            ctx = self._own(sid, owner)
            if op == "get":
                body = ctx.model_dump(
                    mode="json", include={"system_prompt", "messages", "metadata", "model"}
                )
                return encode(
                    self._reply(request, summary=ctx.summary(self.holder_id), context=body)
                )
            if op == "turn":
                return await self._turn(request, ctx)
            if op == "export":
                return await self._export(request, ctx)
        raise PayloadError(f"unknown op {op!r}")  # pragma: no cover - the schema lists them

    def _reply(self, request: SessionRequest, **fields: Any) -> SessionReply:
        return SessionReply(
            request_id=request.request_id, op=request.op, served_by=self.holder_id, **fields
        )

    def _create(self, request: SessionRequest, owner: str) -> SessionReply:
        if request.model is None:
            raise PayloadError("create needs the model the session talks to")
        self.models(request.model)  # raises naming the models served here
        if len(self._contexts) >= self.settings.max_sessions:
            raise TemporaryError(
                f"holder {self.holder_id} keeps {self.settings.max_sessions} sessions already",
                retry_after=30.0,
            )
        sid = request.session_id or new_session_id()
        if sid in self._contexts:
            raise SessionConflict(f"session {sid!r} exists already")
        ttl = min(request.ttl_s or self.settings.default_ttl_s, self.settings.max_ttl_s)
        now = self.clock()
        ctx = SessionContext(
            session_id=sid,
            owner=owner,
            model=request.model,
            system_prompt=request.system_prompt,
            metadata=request.metadata,
            created_at=now,
            expires_at=now + ttl,
            ttl_s=ttl,
            limits=self.settings.limits,
        )
        ctx.check_limits()
        self._keep(ctx)
        log.info("session %s created for model %s (ttl %.0f s)", sid, ctx.model, ttl)
        return self._reply(request, summary=ctx.summary(self.holder_id))

    async def _turn(self, request: SessionRequest, ctx: SessionContext) -> Encoded:
        if request.message is None or not request.message.strip():
            raise PayloadError("a turn needs a non-empty message")
        ctx.check_can_add(request.message)
        model = self.models(ctx.model)
        fmt = self.chat_format(model)
        prompt = fmt.render(ctx.chat(request.message))
        cache = self._caches.get(ctx.session_id)
        started = time.perf_counter()
        result = await asyncio.to_thread(
            functools.partial(
                model.generate_turn,
                prompt,
                request.parameters,
                cache,
                special_tokens=not fmt.templated,
            )
        )
        total_ms = (time.perf_counter() - started) * 1000.0
        updated = ctx.with_turn(request.message, result.text, self.clock())
        self._keep(updated)
        if result.cache is not None:
            self._caches[ctx.session_id] = result.cache
        reply = self._reply(
            request,
            summary=updated.summary(self.holder_id),
            reply=result.text,
            tokens=len(result.token_ids),
            timings_ms={
                "ttft": result.ttft_ms,
                "total": total_ms,
                "prefill_tokens": float(result.prefill_tokens),
            },
        )
        return encode(reply, self._sealed(updated))

    def _history_ids(self, model: OnnxModel, ctx: SessionContext) -> list[int]:
        """The tokens a re-run prefills: the chat so far, as the next turn's prompt starts."""
        fmt = self.chat_format(model)
        return model.tokenize_prompt(fmt.render(ctx.chat(None)), special_tokens=not fmt.templated)

    async def _export(self, request: SessionRequest, ctx: SessionContext) -> Encoded:
        tensors = self._sealed(ctx)
        cache = self._caches.get(ctx.session_id)
        model = self.models(ctx.model)
        tokens = cache.length if cache is not None else len(self._history_ids(model, ctx))
        meta: dict[str, Any] = {}
        if request.kv_format != "none" and cache is not None:
            kv_tensors, meta = kv_to_wire(cache, request.kv_format)
            tensors.update(kv_tensors)
        # What a cache of this model costs on the wire, so that the planner can price shipping
        # it before asking for it.
        meta = {
            **meta,
            "bytes_per_token": {f: model.kv_bytes_per_token(f) for f in ("fp16", "int8")},
        }
        reply = self._reply(
            request, summary=ctx.summary(self.holder_id), kv=meta, context_tokens=tokens
        )
        return encode(reply, tensors)

    async def _adopt(
        self, request: SessionRequest, owner: str, tensors: Mapping[str, np.ndarray]
    ) -> Encoded:
        assert request.session_id is not None
        started = time.perf_counter()
        ctx = self._open(request.session_id, tensors)
        if ctx.owner != owner:
            raise SessionNotFound(f"no session {request.session_id!r} for this owner")
        ctx.check_alive(self.clock())
        mine = self._contexts.get(ctx.session_id)
        if mine is not None and mine.version > ctx.version:
            raise SessionConflict(
                f"session {ctx.session_id}: this holder has version {mine.version}, newer than "
                f"the adopted {ctx.version}"
            )
        model = self.models(ctx.model)
        plan = request.handoff
        method = plan.method if plan is not None else "rerun"
        cache: KvCache | None = None
        if request.kv_format != "none":
            kv = {k: v for k, v in tensors.items() if k != CONTEXT_TENSOR}
            cache = kv_from_wire(kv, request.kv or {}, dtype=model.kv_dtype)
            model.check_cache(cache)  # a cache of another graph is refused here, not at a turn
            method = "kv-int8" if request.kv_format == "int8" else "kv-fp16"
        else:
            method = "rerun"
            ids = self._history_ids(model, ctx)
            cache = await asyncio.to_thread(model.prefill, ids, None)
        self._keep(ctx)
        if cache is not None:
            self._caches[ctx.session_id] = cache
        else:
            self._caches.pop(ctx.session_id, None)
        took = (time.perf_counter() - started) * 1000.0
        record = (
            plan.model_copy(
                update={
                    "method": method,
                    "took_ms": took,
                    "target": self.holder_id,
                    "context_tokens": cache.length if cache is not None else plan.context_tokens,
                }
            )
            if plan is not None
            else HandoffRecord(
                session_id=ctx.session_id,
                source=None,
                target=self.holder_id,
                reason="placement",
                method=method,
                context_tokens=cache.length if cache is not None else 0,
                took_ms=took,
            )
        )
        log.info("session %s adopted (v%d, %s, %.0f ms)", ctx.session_id, ctx.version, method, took)
        return encode(self._reply(request, summary=ctx.summary(self.holder_id), handoff=record))

    # ------------------------------------------------------------------ background

    async def replicate(self, client: MqttClient) -> None:
        """Publish the changed sessions' replicas (forever; cancel to stop). Changes of one
        session within ``replica_lag_s`` go as one message; a failed publish is retried."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            await asyncio.sleep(min(self.settings.replica_lag_s, 0.05))
            pending, self._dirty = self._dirty, {}
            for sid, (ctx, deleted) in pending.items():
                replica = self._replica(ctx, deleted=deleted)
                encoded = encode(replica, None if deleted else self._sealed(ctx))
                try:
                    await client.publish(
                        self.topics.session_replica(self.holder_id),
                        encoded.payload,
                        qos=1,
                        content_type=encoded.content_type,
                    )
                except Exception as exc:  # noqa: BLE001 - kept and retried
                    log.warning("replica of session %s not sent (%s); retrying", sid, exc)
                    self._dirty.setdefault(sid, (ctx, deleted))
                    self._changed.set()
                    await asyncio.sleep(self.settings.replica_lag_s)

    async def sweep(self) -> None:
        """Delete expired sessions every ``sweep_s`` (forever; cancel to stop)."""
        while True:
            await asyncio.sleep(self.settings.sweep_s)
            self.expire_now()

    def expire_now(self) -> list[str]:
        """Delete the sessions expired by now; the ids deleted."""
        now = self.clock()
        gone: list[str] = []
        for sid in [sid for sid, ctx in self._contexts.items() if ctx.expired(now)]:
            try:
                self._drop(sid)
            except SessionStoreError as exc:  # kept whole; the next sweep tries again
                log.warning("expired session %s not deleted yet: %s", sid, exc)
                continue
            log.info("session %s expired: deleted", sid)
            gone.append(sid)
        return gone
