"""The controller's session service: directory, replica, placement and handoffs of sessions.

Every session has a row in the registry (``sessions``) with its owner, model, holder, version
and the controller's replica of its context, sealed with the fleet's session key. The replica is
current after every turn the controller routes (the holder returns the new sealed context with
its answer) and is refreshed from the replicas holders publish (``agents/+/sessions-replica``:
kept only when newer).

**Turns.** A turn goes to the session's holder while that agent is live (online, not draining,
serving the model) and not much slower than the best live agent serving the model
(``move_factor``). Otherwise the session moves first: to the best live agent, from the old
holder when it is reachable (``export`` there, then ``adopt`` with the context and, when the
:class:`~edgefed.common.sessions.handoff.HandoffPlanner` says it is faster than re-running the
prompt, the KV cache; then ``delete`` there) or, the old holder gone, from the controller's
replica (``adopt`` with method ``rerun``). A turn whose holder dies under it is handed off and
retried once. Every handoff is recorded on the row and counted in
``edgefed_session_handoffs_total{reason,method}``.

**Isolation.** Sessions are reached by their owner only (``token:<id>`` for API callers): for
anyone else a session does not exist (:class:`SessionNotFound`, never "forbidden").

**End of a session.** Deleting it, or its expiry (the sweeper, or the first request after it),
wipes the context here, keeps the row as a tombstone (so the API can say the session expired and
when) and sends ``delete`` to every holder that may keep a copy; a holder that is offline gets it
when its status says it is online again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.registry.models import SessionState
from edgefed.cloud.sessions.directory import AgentDirectory
from edgefed.cloud.sessions.records import Owed, Row, SessionTable
from edgefed.cloud.sessions.settings import SessionSettings
from edgefed.common.errors import (
    ErrorCode,
    PayloadError,
    RemoteError,
    RemotePermanentError,
    RemoteTemporaryError,
    RequestTimeout,
    TemporaryError,
)
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.routing import TargetSnapshot
from edgefed.common.rpc import Requester
from edgefed.common.schemas import Decoded, decode
from edgefed.common.sessions.context import ChatMessage, SessionContext, new_session_id
from edgefed.common.sessions.crypto import FleetKey
from edgefed.common.sessions.errors import (
    SessionExpired,
    SessionKeyError,
    SessionNotFound,
    SessionTooLarge,
)
from edgefed.common.sessions.handoff import HandoffPlanner, LinkEstimate, PrefillMeter
from edgefed.common.sessions.wire import (
    CONTEXT_TENSOR,
    HandoffMethod,
    HandoffRecord,
    KvFormat,
    SessionReplica,
    SessionReply,
    SessionRequest,
    SessionSummary,
)
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)

__all__ = [
    "NoHolderError",
    "SessionService",
    "SessionView",
    "TurnOutcome",
]

_MAX_REPLICA_BYTES = 64 * 1024 * 1024
_DIED_GRACE_S = 3.0
"""After a failed turn, how long to wait for the holder's status to say it went away."""
_KV_PREFIX = "kv."
_DELETES_AT_ONCE = 16
_DELETE_BACKOFF_MAX_S = 600.0

LOCAL_OWNER_PREFIX = "key:"
"""Owners of sessions local apps created on a holder (:func:`owner_of_key`)."""

Reason = Literal["offline", "drain", "latency", "placement"]
"""Why a session moves (:attr:`HandoffRecord.reason`)."""


class HolderLost(TemporaryError):
    """The holder went offline while a request to it was in flight."""

    code = ErrorCode.UNAVAILABLE


class NoHolderError(TemporaryError):
    """No live agent serves the session's model now (retry later)."""

    code = ErrorCode.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class SessionView:
    """A session as its owner sees it: the summary and the conversation so far."""

    summary: SessionSummary
    state: str
    system_prompt: str | None
    messages: list[ChatMessage]
    metadata: dict[str, Any]
    last_handoff: HandoffRecord | None = None


@dataclass(frozen=True, slots=True)
class TurnOutcome:
    """What a turn answered, where it ran, and the handoff that preceded it (if any)."""

    reply: str
    tokens: int
    summary: SessionSummary
    holder: str
    handoff: HandoffRecord | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _record_of(tensors: Mapping[str, np.ndarray]) -> bytes | None:
    array = tensors.get(CONTEXT_TENSOR)
    if array is None:
        return None
    return np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _context_tensor(record: bytes) -> dict[str, np.ndarray]:
    return {CONTEXT_TENSOR: np.frombuffer(record, dtype=np.uint8)}


class SessionService:
    """Implements :class:`edgefed.cloud.services.SessionControl`.

    ``client`` is an entered MQTT client of the controller's own (the service subscribes to
    statuses, heartbeats and replicas on it and sends session requests from it); ``sessions``
    makes write sessions on the registry. Call :meth:`start`, then run :meth:`run` (the
    sweeper) as a task.
    """

    def __init__(
        self,
        client: MqttClient,
        topics: Topics,
        sessions: sessionmaker[Session],
        key: FleetKey,
        settings: SessionSettings | None = None,
        *,
        read_sessions: sessionmaker[Session] | None = None,
        targets: Callable[[], list[TargetSnapshot]] | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.topics = topics
        self.fleet = topics.fleet
        self.key = key
        self.settings = settings or SessionSettings()
        self.table = SessionTable(sessions, read_sessions)
        self.directory = AgentDirectory(topics, targets=targets)
        self.requester = Requester(client, topics, default_timeout=self.settings.control_timeout_s)
        self.planner = HandoffPlanner(allow_int8=self.settings.kv_int8)
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        self._meters: dict[str, PrefillMeter] = {}
        self._kv_bytes: dict[str, dict[str, int]] = {
            model: {"fp16": n} for model, n in self.settings.kv_bytes_per_token.items()
        }
        self._placed: dict[str, int] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._retry_at: dict[tuple[str, str], float] = {}
        self._backoff: dict[tuple[str, str], float] = {}
        self._delete_slots = asyncio.Semaphore(_DELETES_AT_ONCE)
        self.handoffs = Counter(
            "edgefed_session_handoffs",
            "Sessions moved between holders, by reason and method",
            ["reason", "method"],
            registry=registry if registry is not None else CollectorRegistry(),
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Subscribe to statuses, heartbeats and (``replicas``) the holders' replicas."""
        self.directory.on_online(self._on_agent_online)
        await self.requester.start()
        await self.directory.watch(self.client)
        if self.settings.replicas:
            await self.client.subscribe(self.topics.all_session_replicas(), self._on_replica)

    async def run(self) -> None:
        """Expire sessions and retry owed deletes every ``sweep_s`` (forever; cancel to stop)."""
        try:
            while True:
                try:
                    await self.sweep()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("the session sweeper failed; trying again next round")
                await asyncio.sleep(self.settings.sweep_s)
        finally:
            for task in list(self._background):
                task.cancel()

    async def sweep(self) -> list[str]:
        """One round: expire what is due (copies deleted everywhere), retry owed deletes to
        holders online now, forget old tombstones. Returns the ids that expired."""
        now = self.clock()
        expired: list[str] = []
        for sid in await asyncio.to_thread(self.table.due_to_expire, now):
            if await self._end(sid, SessionState.EXPIRED) is not None:
                expired.append(sid)
        owed = await asyncio.to_thread(self.table.owing_deletes)
        await asyncio.gather(*(self._send_deletes(o, list(o.pending_deletes)) for o in owed))
        await asyncio.to_thread(
            self.table.purge_tombstones, now - self.settings.tombstone_retention_s
        )
        return expired

    def _lock(self, session_id: str) -> asyncio.Lock:
        return self._locks.setdefault(session_id, asyncio.Lock())

    # ------------------------------------------------------------------ API

    async def create(
        self,
        owner: str,
        *,
        model: str,
        system_prompt: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        ttl_s: float | None = None,
    ) -> SessionSummary:
        """A new session of ``owner`` for ``model``; it gets a holder at its first turn.

        Raises :class:`SessionTooLarge` when the system prompt and metadata are over the limits,
        :class:`PayloadError` for a TTL over ``max_ttl_s`` or too many sessions."""
        s = self.settings
        ttl = s.default_ttl_s if ttl_s is None else float(ttl_s)
        if not math.isfinite(ttl) or ttl <= 0:
            raise PayloadError(f"ttl_s must be a positive number of seconds, not {ttl_s!r}")
        if ttl > s.max_ttl_s:
            raise PayloadError(f"ttl_s {ttl:g} is over this controller's maximum {s.max_ttl_s:g}")
        count = await asyncio.to_thread(self.table.count_active, owner)
        if count >= s.max_sessions_per_owner:
            raise SessionTooLarge(
                f"this token has {count} active sessions, the most it may have "
                f"(max_sessions_per_owner = {s.max_sessions_per_owner}): delete some first",
                limit="max_sessions_per_owner",
                allowed=s.max_sessions_per_owner,
                size=count + 1,
            )
        now = self.clock()
        ctx = SessionContext(
            session_id=new_session_id(),
            owner=owner,
            model=model,
            system_prompt=system_prompt,
            metadata=dict(metadata or {}),
            created_at=now,
            expires_at=now + ttl,
            ttl_s=ttl,
            limits=s.limits,
        )
        ctx.check_limits()
        record = self.key.seal_context(self.fleet, ctx)
        await asyncio.to_thread(self.table.insert, ctx, record)
        log.info("session %s created for model %s (ttl %.0f s)", ctx.session_id, model, ttl)
        return ctx.summary(None)

    async def list_sessions(self, owner: str) -> list[SessionSummary]:
        """The owner's active sessions (expired ones are expired on the way)."""
        now = self.clock()
        out: list[SessionSummary] = []
        for row in await asyncio.to_thread(self.table.of_owner, owner):
            if row.expires_at <= now:
                await self._end(row.id, SessionState.EXPIRED)
                continue
            out.append(self._summary(row))
        return out

    async def get(self, owner: str, session_id: str) -> SessionView:
        """The session with its conversation (its owner only: others get
        :class:`SessionNotFound`; an expired one :class:`SessionExpired`)."""
        row = await self._visible(owner, session_id)
        ctx = self._open(row)
        handoff = (
            HandoffRecord.model_validate(row.last_handoff) if row.last_handoff is not None else None
        )
        return SessionView(
            summary=ctx.summary(row.holder),
            state=str(row.state),
            system_prompt=ctx.system_prompt,
            messages=list(ctx.messages),
            metadata=dict(ctx.metadata),
            last_handoff=handoff,
        )

    async def delete(self, owner: str, session_id: str) -> SessionSummary:
        """Delete the session and every copy of it (holders offline now get the delete when
        they are back). Returns what it was."""
        async with self._lock(session_id):
            row = await self._visible(owner, session_id)
            summary = self._summary(row)
            await self._end(session_id, SessionState.DELETED)
        self._locks.pop(session_id, None)
        log.info("session %s deleted by its owner", session_id)
        return summary

    async def turn(
        self,
        owner: str,
        session_id: str,
        message: str,
        parameters: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> TurnOutcome:
        """Run one turn of the conversation on the session's holder (placing or moving the
        session first when needed; see the module docstring).

        Raises :class:`SessionNotFound`, :class:`SessionExpired`, :class:`SessionTooLarge`
        (nothing changed), :class:`NoHolderError` (no live agent serves the model),
        :class:`RequestTimeout` and :class:`RemoteError` (the holder's error)."""
        if not message or not message.strip():
            raise PayloadError("a turn needs a non-empty message")
        params = dict(parameters or {})
        limit = timeout if timeout is not None else self.settings.turn_timeout_s
        async with self._lock(session_id):
            row = await self._visible(owner, session_id)
            ctx = self._open(row)
            ctx.check_can_add(message)
            handoff: HandoffRecord | None = None
            target, reason = self._place(row)
            if reason is not None:
                row, handoff = await self._move(row, ctx, target, reason)
            try:
                outcome = await self._send_turn(row, target, message, params, limit)
            except (RequestTimeout, RemoteTemporaryError, HolderLost) as exc:
                if not await self._died(target):
                    raise
                log.warning(
                    "holder %s of session %s went away during a turn (%s): handing off and "
                    "retrying once",
                    target,
                    session_id,
                    exc,
                )
                row = await self._visible(owner, session_id)
                ctx = self._open(row)
                target, reason = self._place(row, exclude={target})
                row, handoff = await self._move(row, ctx, target, reason or "offline")
                outcome = await self._send_turn(row, target, message, params, limit)
            except RemotePermanentError as exc:
                if exc.code is not ErrorCode.NOT_FOUND:
                    raise
                # The holder lost its copy (e.g. restarted without its disk): place it again
                # from the controller's replica and retry once.
                log.warning("holder %s no longer has session %s: re-placing it", target, row.id)
                await asyncio.to_thread(self.table.set_holder, row.id, None, only_if=target)
                row = await self._visible(owner, session_id)
                ctx = self._open(row)
                target, reason = self._place(row)
                row, handoff = await self._move(row, ctx, target, reason or "placement")
                outcome = await self._send_turn(row, target, message, params, limit)
        return outcome if handoff is None else replace(outcome, handoff=handoff)

    # ------------------------------------------------------------------ rows and contexts

    async def _visible(self, owner: str, session_id: str) -> Row:
        """The owner's active session, or SessionNotFound / SessionExpired."""
        row = await asyncio.to_thread(self.table.get, session_id)
        if row is None or row.owner != owner or row.state is SessionState.DELETED:
            raise SessionNotFound(f"no session {session_id!r}")
        if row.state is SessionState.EXPIRED:
            raise self._expired(row)
        if row.expires_at <= self.clock():
            await self._end(row.id, SessionState.EXPIRED)
            raise self._expired(row)
        return row

    def _expired(self, row: Row) -> SessionExpired:
        return SessionExpired(
            f"session {row.id} expired at {_when(row.expires_at)}; its context is deleted "
            "everywhere: start a new session"
        )

    def _open(self, row: Row) -> SessionContext:
        if row.context is None:  # pragma: no cover - active rows always keep their context
            raise SessionNotFound(f"no session {row.id!r}")
        return self.key.open_context(self.fleet, row.id, row.context)

    def _summary(self, row: Row) -> SessionSummary:
        metadata: dict[str, Any] = {}
        if row.context is not None:
            try:
                metadata = dict(self._open(row).metadata)
            except SessionKeyError:
                log.warning("the stored context of session %s does not open", row.id)
        return SessionSummary(
            session_id=row.id,
            model=row.model,
            holder=row.holder,
            version=row.version,
            messages=row.messages,
            context_bytes=row.context_bytes,
            created_at=row.created_at,
            expires_at=row.expires_at,
            metadata=metadata,
        )

    async def _keep(
        self, session_id: str, record: bytes, *, holder: str | None, set_holder: bool
    ) -> SessionContext | None:
        """Store a sealed context a holder sent if it is newer; None if it does not open."""
        try:
            ctx = self.key.open_context(self.fleet, session_id, record)
        except SessionKeyError as exc:
            log.warning("a context of session %s from %s refused: %s", session_id, holder, exc)
            return None
        await asyncio.to_thread(
            self.table.store_context, ctx, record, holder=holder, set_holder=set_holder
        )
        return ctx

    async def _end(self, session_id: str, state: SessionState) -> Row | None:
        """Expire or delete: wipe the context, then delete the copies (holders that are
        online now at once, the others when they are back)."""
        before = await asyncio.to_thread(self.table.end, session_id, state, self.clock())
        if before is None:
            return None
        if state is SessionState.EXPIRED:
            log.info("session %s expired at %s: deleting its copies", session_id, before.expires_at)
        row = await asyncio.to_thread(self.table.get, session_id)
        if row is not None:
            await self._send_deletes(row, list(row.pending_deletes), now=True)
        return before

    # ------------------------------------------------------------------ deletes

    async def _send_deletes(self, row: Row | Owed, agents: list[str], *, now: bool = False) -> None:
        """Ask each of ``agents`` that is reachable to delete its copy (concurrently); one that
        failed is asked again after a backoff (at once with ``now``, or when it is back)."""

        async def one(agent: str) -> None:
            key = (row.id, agent)
            if row.active and agent == row.holder:
                return
            if not self.directory.reachable(agent):
                return
            if not now and self._retry_at.get(key, 0.0) > time.monotonic():
                return
            async with self._delete_slots:
                done = await self._delete_on(agent, row.id, row.owner)
            if done:
                self._retry_at.pop(key, None)
                self._backoff.pop(key, None)
                await asyncio.to_thread(self.table.deleted_on, row.id, agent)
            else:
                wait = min(self._backoff.get(key, self.settings.sweep_s) * 2, _DELETE_BACKOFF_MAX_S)
                self._backoff[key] = wait
                self._retry_at[key] = time.monotonic() + wait

        await asyncio.gather(*(one(a) for a in agents))

    async def _delete_on(self, agent: str, session_id: str, owner: str) -> bool:
        """Ask ``agent`` to delete its copy; True once it has none."""
        request = SessionRequest(op="delete", session_id=session_id, owner=owner)
        try:
            await self.requester.request(
                self.topics.agent_sessions(agent),
                request,
                SessionReply,
                timeout=self.settings.control_timeout_s,
            )
        except RemotePermanentError as exc:
            if exc.code in (ErrorCode.NOT_FOUND, ErrorCode.GONE):
                return True
            log.warning("holder %s refused to delete session %s: %s", agent, session_id, exc)
            return False
        except (RemoteTemporaryError, RequestTimeout, TemporaryError) as exc:
            log.info("delete of session %s on %s not done yet (%s)", session_id, agent, exc)
            return False
        log.info("session %s deleted on holder %s", session_id, agent)
        return True

    async def _on_agent_online(self, agent: str) -> None:
        """An agent is back: send it the deletes it missed (in the background)."""
        task = asyncio.create_task(self._catch_up(agent), name=f"session-deletes-{agent}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _catch_up(self, agent: str) -> None:
        try:
            owed = await asyncio.to_thread(self.table.owing_deletes)
            await asyncio.gather(
                *(
                    self._send_deletes(o, [agent], now=True)
                    for o in owed
                    if agent in o.pending_deletes
                )
            )
        except Exception:
            log.exception("owed session deletes to %s failed; the sweeper retries", agent)

    # ------------------------------------------------------------------ replicas

    async def _on_replica(self, message: Message) -> None:
        agent = self.topics.agent_of(message.topic)
        if agent is None:
            return
        try:
            decoded: Decoded[SessionReplica] = decode(
                message.payload,
                message.content_type,
                SessionReplica,
                max_bytes=_MAX_REPLICA_BYTES,
            )
        except PayloadError as exc:
            log.warning("ignored a session replica on %s: %s", message.topic, exc)
            return
        await self.take_replica(agent, decoded.message, decoded.tensors)

    async def take_replica(
        self, agent: str, replica: SessionReplica, tensors: Mapping[str, np.ndarray]
    ) -> None:
        """Apply one replica ``agent`` published (see the module docstring)."""
        if replica.holder != agent:
            log.warning("replica on %s's topic names holder %s: ignored", agent, replica.holder)
            return
        sid = replica.session_id
        row = await asyncio.to_thread(self.table.get, sid)
        if replica.deleted:
            if row is not None:
                await asyncio.to_thread(self.table.deleted_on, sid, agent)
                if row.active and row.holder == agent:
                    # Dropped there (expired, or deleted by a local app): the next turn places
                    # the session again from this replica.
                    await asyncio.to_thread(self.table.set_holder, sid, None, only_if=agent)
            return
        if row is not None and not row.active:
            # An ended session must not come back: that holder still owes a delete.
            await asyncio.to_thread(self.table.owe_delete, sid, agent)
            if self.directory.reachable(agent) and await self._delete_on(agent, sid, row.owner):
                await asyncio.to_thread(self.table.deleted_on, sid, agent)
            return
        record = _record_of(tensors)
        if record is None:
            log.warning("replica of session %s from %s carries no context", sid, agent)
            return
        try:
            ctx = self.key.open_context(self.fleet, sid, record)
        except SessionKeyError as exc:
            log.warning("replica of session %s from %s refused: %s", sid, agent, exc)
            return
        if ctx.owner != replica.owner or ctx.model != replica.model:
            log.warning("replica of session %s from %s contradicts its context", sid, agent)
            return
        if row is None:
            # Only sessions of local apps (owner "key:...") are born on a holder; a session of
            # an API token the controller does not know is no one's: never planted here.
            if (
                not self.settings.adopt_unknown_replicas
                or not ctx.owner.startswith(LOCAL_OWNER_PREFIX)
                or ctx.expired(self.clock())
            ):
                return
            with contextlib.suppress(Exception):  # a concurrent insert of the same id wins
                await asyncio.to_thread(self.table.insert, ctx, record, holder=agent)
                log.info("session %s of holder %s is now replicated here", sid, agent)
            return
        if ctx.owner != row.owner:
            log.warning("replica of session %s from %s names another owner: ignored", sid, agent)
            return
        if row.holder is not None and row.holder != agent:
            # Not its holder (a handoff in progress, or a stale copy that is owed a delete):
            # only the holder moves the replica forward.
            log.debug("replica of session %s from %s, held by %s: ignored", sid, agent, row.holder)
            return
        await asyncio.to_thread(
            self.table.store_context, ctx, record, holder=agent, set_holder=row.holder is None
        )

    # ------------------------------------------------------------------ placement

    def _place(self, row: Row, exclude: set[str] | None = None) -> tuple[str, Reason | None]:
        """(target, reason to move there or None to stay); NoHolderError when none is live."""
        skip = exclude or set()
        current = row.holder
        if current is not None and current not in skip and self.directory.live(current, row.model):
            best = self._best(row.model, skip)
            mine = self.directory.latency_ms(current, row.model)
            theirs = self.directory.latency_ms(best, row.model) if best is not None else None
            if (
                best is not None
                and best != current
                and mine is not None
                and theirs is not None
                and mine > self.settings.move_factor * theirs
            ):
                return best, "latency"
            return current, None
        best = self._best(row.model, skip)
        if best is None:
            raise NoHolderError(
                f"no live agent serves model {row.model!r} for session {row.id} now",
                retry_after=5.0,
            )
        if current is None:
            return best, "placement"
        view = self.directory.get(current)
        if view is not None and view.reachable and current not in skip:
            return best, "drain" if not view.online else "placement"
        return best, "offline"

    def _best(self, model: str, exclude: set[str]) -> str | None:
        candidates = self.directory.candidates(model, exclude=exclude)
        if not candidates:
            return None

        def cost(agent: str) -> tuple[float, int, str]:
            latency = self.directory.latency_ms(agent, model)
            return (latency if latency is not None else math.inf, self._placed.get(agent, 0), agent)

        return min(candidates, key=cost)

    async def _died(self, agent: str) -> bool:
        """Whether ``agent`` went away (waiting briefly for its last will)."""
        if not self.directory.live(agent):
            return True
        await self.directory.wait_change(agent, _DIED_GRACE_S)
        return not self.directory.live(agent)

    # ------------------------------------------------------------------ handoffs

    def _meter(self, agent: str) -> PrefillMeter:
        meter = self._meters.get(agent)
        if meter is None:
            meter = self._meters[agent] = PrefillMeter(
                default_ms_per_token=self.settings.prefill_ms_per_token,
                default_fixed_ms=self.settings.prefill_fixed_ms,
            )
        return meter

    def _link(self, agent: str) -> LinkEstimate:
        figures = self.directory.link(agent)
        s = self.settings
        rtt = figures.rtt_ms if figures is not None else s.default_rtt_ms
        mbps = (
            figures.bandwidth_mbps
            if figures is not None and figures.bandwidth_mbps is not None
            else s.default_bandwidth_mbps
        )
        return LinkEstimate(bandwidth_bps=mbps * 1e6, rtt_ms=rtt)

    def _kv_per_token(self, model: str, meta: Mapping[str, Any] | None) -> dict[str, int]:
        """The model's cache bytes per token by format: what the holder said (``kv`` meta
        ``bytes_per_token``), else what an earlier export showed, else the settings."""
        known = dict(self._kv_bytes.get(model, {}))
        said = meta.get("bytes_per_token") if meta else None
        if isinstance(said, Mapping):
            for fmt, n in said.items():
                if fmt in ("fp16", "int8") and isinstance(n, int) and n > 0:
                    known[str(fmt)] = n
            self._kv_bytes[model] = dict(known)
        if not self.settings.kv_int8:
            known.pop("int8", None)
        return known

    def _learn_kv(self, model: str, tensors: Mapping[str, np.ndarray]) -> None:
        """Learn the model's cache size per token from an fp16 export's ``kv.*`` tensors
        (``(1, heads, tokens, head_dim)`` each): fp16 takes 2 bytes a value, int8 one byte a
        value plus an fp16 scale per head and position."""
        fp16 = int8 = 0
        for name, t in tensors.items():
            if not name.startswith(_KV_PREFIX) or name.endswith(".scale") or t.ndim != 4:
                continue
            heads, head_dim = int(t.shape[1]), int(t.shape[3])
            fp16 += 2 * heads * head_dim
            int8 += heads * head_dim + 2 * heads
        if fp16 > 0:
            self._kv_bytes[model] = {"fp16": fp16, "int8": int8}

    async def _export(self, source: str, row: Row, kv_format: KvFormat) -> Decoded[SessionReply]:
        request = SessionRequest(
            op="export", session_id=row.id, owner=row.owner, kv_format=kv_format
        )
        return await self.requester.request(
            self.topics.agent_sessions(source),
            request,
            SessionReply,
            timeout=self.settings.control_timeout_s,
        )

    async def _move(
        self, row: Row, ctx: SessionContext, target: str, reason: Reason
    ) -> tuple[Row, HandoffRecord]:
        """Hand the session to ``target`` (see the module docstring); returns the updated row
        and the handoff record."""
        source = row.holder
        reachable = source is not None and reason != "offline" and self.directory.reachable(source)
        record = row.context
        assert record is not None
        kv_tensors: dict[str, np.ndarray] = {}
        kv_meta: dict[str, Any] | None = None
        kv_format: KvFormat = "none"
        tokens = max(1, ctx.size_bytes() // 4)  # a guess, until a holder says
        estimates: dict[str, float] = {}
        method: HandoffMethod = "rerun"
        kv_bytes = 0
        taken_from: str | None = None
        if reachable and source is not None:
            try:
                first = await self._export(source, row, "none")
                fresh = _record_of(first.tensors)
                if fresh is not None:
                    newer = await self._keep(row.id, fresh, holder=None, set_holder=False)
                    if newer is not None and newer.version >= ctx.version:
                        record, ctx = fresh, newer
                tokens = first.message.context_tokens or tokens
                taken_from = source
                per_token = self._kv_per_token(row.model, first.message.kv)
                if self.settings.kv_handoff and not per_token:
                    # No figure for this model yet: ship its cache once and learn it.
                    second = await self._export(source, row, "fp16")
                    self._learn_kv(row.model, second.tensors)
                    per_token = self._kv_per_token(row.model, None)
                    if _ships_kv(second.tensors):
                        kv_tensors = {
                            n: t for n, t in second.tensors.items() if n.startswith(_KV_PREFIX)
                        }
                        kv_meta, kv_format = second.message.kv, "fp16"
                if self.settings.kv_handoff and per_token:
                    meter = self._meter(target)
                    plan = self.planner.plan(
                        context_tokens=tokens,
                        kv_bytes_per_token=per_token,
                        link=self._link(target),
                        prefill_ms_per_token=meter.ms_per_token_at(tokens),
                        prefill_fixed_ms=meter.fixed_ms,
                    )
                    estimates, method, kv_bytes = (
                        dict(plan.estimates_ms),
                        plan.method,
                        plan.kv_bytes,
                    )
                    wanted: KvFormat = (
                        "int8" if method == "kv-int8" else "fp16" if method == "kv-fp16" else "none"
                    )
                    if wanted == "none":
                        kv_tensors, kv_meta, kv_format = {}, None, "none"
                    elif wanted != kv_format:
                        third = await self._export(source, row, wanted)
                        if _ships_kv(third.tensors):
                            kv_tensors = {
                                n: t for n, t in third.tensors.items() if n.startswith(_KV_PREFIX)
                            }
                            kv_meta, kv_format = third.message.kv, wanted
                        else:
                            kv_tensors, kv_meta, kv_format = {}, None, "none"
                    if kv_format == "none":
                        method = "rerun"
            except (RemoteError, RequestTimeout, TemporaryError) as exc:
                log.warning(
                    "export of session %s from %s failed (%s): handing it over from the "
                    "controller's replica",
                    row.id,
                    source,
                    exc,
                )
                taken_from, kv_tensors, kv_meta, kv_format, method = None, {}, None, "none", "rerun"
                current = await asyncio.to_thread(self.table.get, row.id)
                row = current if current is not None else row
                record = row.context or record
        if not estimates:
            meter = self._meter(target)
            estimates = {"rerun": meter.estimate_ms(tokens)}
        plan_record = HandoffRecord(
            session_id=row.id,
            source=taken_from,
            target=target,
            reason=reason,
            method=method,
            context_tokens=tokens,
            kv_bytes=kv_bytes if kv_format != "none" else 0,
            estimates_ms=estimates,
        )
        adopt = SessionRequest(
            op="adopt",
            session_id=row.id,
            owner=row.owner,
            handoff=plan_record,
            kv_format=kv_format,
            kv=kv_meta,
        )
        started = time.perf_counter()
        try:
            reply = await self._unless_gone(
                target,
                self.requester.request(
                    self.topics.agent_sessions(target),
                    adopt,
                    SessionReply,
                    tensors={**_context_tensor(record), **kv_tensors},
                    timeout=self.settings.adopt_timeout_s,
                ),
            )
            taken = reply.message.handoff
        except RemoteError as exc:
            if exc.code is not ErrorCode.CONFLICT:
                raise
            # The target keeps a newer copy already (it held the session before): use it.
            log.info("holder %s keeps a newer copy of session %s: using it", target, row.id)
            taken = None
        took_ms = (time.perf_counter() - started) * 1000.0
        # The prefill meter learns only from token counts a holder gave (not from the guess).
        measured = taken_from is not None or (
            taken is not None and taken.context_tokens != plan_record.context_tokens
        )
        final = (taken or plan_record).model_copy(
            update={"target": target, "source": taken_from, "reason": reason}
        )
        if taken is None:
            final = final.model_copy(update={"took_ms": took_ms})
        if final.method == "rerun" and final.took_ms > 0 and measured:
            self._meter(target).observe(final.context_tokens, final.took_ms)
        stale = [source] if source is not None and source != target else []
        if (
            taken_from is not None
            and source is not None
            and await self._delete_on(source, row.id, row.owner)
        ):
            stale = []
        moved = await asyncio.to_thread(
            self.table.moved,
            row.id,
            holder=target,
            handoff=final.model_dump(mode="json"),
            stale=stale,
        )
        self._placed[target] = self._placed.get(target, 0) + 1
        self.handoffs.labels(final.reason, final.method).inc()
        log.info(
            "session %s handed to %s (%s, %s from %s, %.0f ms)",
            row.id,
            target,
            final.reason,
            final.method,
            final.source or "the controller's replica",
            final.took_ms,
        )
        return (moved or row), final

    # ------------------------------------------------------------------ turns

    async def _unless_gone(
        self, agent: str, request: Coroutine[Any, Any, Decoded[SessionReply]]
    ) -> Decoded[SessionReply]:
        """Await ``request`` to ``agent``; raise :class:`HolderLost` as soon as the agent's
        status (its last will) says it went offline, instead of waiting for the timeout."""
        task = asyncio.ensure_future(request)
        gone = asyncio.ensure_future(self.directory.wait_gone(agent))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            task.cancel()
            raise HolderLost(f"holder {agent} went offline during the request", retry_after=0.0)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()

    async def _send_turn(
        self,
        row: Row,
        target: str,
        message: str,
        parameters: dict[str, Any],
        timeout: float,
    ) -> TurnOutcome:
        request = SessionRequest(
            op="turn",
            session_id=row.id,
            owner=row.owner,
            message=message,
            parameters=parameters,
            deadline=time.time() + timeout,
        )
        try:
            decoded = await self._unless_gone(
                target,
                self.requester.request(
                    self.topics.agent_sessions(target), request, SessionReply, timeout=timeout
                ),
            )
        except RemotePermanentError as exc:
            if exc.code is ErrorCode.TOO_LARGE:
                raise SessionTooLarge(exc.remote_message) from exc
            if exc.code is ErrorCode.GONE:
                await self._end(row.id, SessionState.EXPIRED)
                raise SessionExpired(exc.remote_message) from exc
            raise
        reply = decoded.message
        record = _record_of(decoded.tensors)
        ctx: SessionContext | None = None
        if record is not None:
            ctx = await self._keep(row.id, record, holder=target, set_holder=True)
        if ctx is not None:
            summary = ctx.summary(target)
        elif reply.summary is not None:
            summary = reply.summary.model_copy(update={"holder": target})
        else:
            summary = self._summary(row)
        return TurnOutcome(
            reply=reply.reply or "",
            tokens=reply.tokens,
            summary=summary,
            holder=target,
            timings_ms={k: float(v) for k, v in reply.timings_ms.items()},
        )


def _ships_kv(tensors: Mapping[str, np.ndarray]) -> bool:
    """Whether an export's reply carries a cache (a holder without one sends only the context
    and the cache's size per token)."""
    return any(name.startswith(_KV_PREFIX) for name in tensors)
