"""The live fleet as the controller sees it over MQTT.

:class:`FleetMonitor` subscribes to every agent's retained status, heartbeats and telemetry of
one fleet. It keeps the latest status and heartbeat of each agent in memory (:meth:`live`, for
the API; :meth:`loaded_models`, :meth:`offline_for`, :meth:`heartbeat` for the rollout gates),
writes what it learnt to the agent's registry row (``state``, ``last_seen``, ``last_status``,
``last_heartbeat``) at most every ``write_interval_s`` per agent and at once when the state
changes, and passes model lifecycle events, heartbeats and status changes to its listeners.

Only enrolled agents count: a message from an agent id that is not in the ``agents`` table of
this fleet is logged and dropped (agents are created by enrolment, never from MQTT). Times are
the controller's own (when a message was received), so a device with a wrong clock cannot
confuse presence or gates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.registry.models import Agent
from edgefed.common.errors import PayloadError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.schemas import (
    AgentState,
    AgentStatus,
    Heartbeat,
    LoadedModel,
    Telemetry,
    decode,
)
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)

LIFECYCLE_RECORD = "model.lifecycle"
"""Name of the telemetry record an agent sends for every step of deploying a model."""
_MAX_PAYLOAD_BYTES = 1024 * 1024
_UNKNOWN_RECHECK_S = 10.0


@dataclass(frozen=True, slots=True)
class LifecycleEvent:
    """One step of an agent deploying a model (``model.lifecycle`` telemetry record)."""

    agent_id: str
    model: str
    version: int | None
    step: str
    """downloading, verifying, loading, warming, loaded, failed, rejected, unloaded, restored."""
    detail: str = ""
    reason: str | None = None
    temporary: bool = False
    """A failure the agent retries by itself (network, disk): not a verdict on the version."""
    ts: float = 0.0
    """The agent's clock (informative only)."""
    received_at: float = field(default_factory=time.monotonic)
    """The controller's monotonic clock when the record arrived."""


class FleetListener(Protocol):
    """What the monitor tells its listeners (the rollout engine is one). Called in the event
    loop, synchronously: keep them short; exceptions are logged and swallowed."""

    def on_lifecycle(self, event: LifecycleEvent) -> None:
        """An agent reported a step of deploying a model."""

    def on_heartbeat(self, agent_id: str, heartbeat: Heartbeat) -> None:
        """An agent's heartbeat arrived."""

    def on_status(self, agent_id: str, status: AgentStatus) -> None:
        """An agent's status arrived (retained on subscription, then on every change)."""


@dataclass(frozen=True, slots=True)
class _Row:
    """What to write to an agent's registry row (taken in the event loop, written elsewhere)."""

    agent_id: str
    changes: int
    state: str
    last_seen: datetime | None
    status: dict[str, Any] | None
    heartbeat: dict[str, Any] | None


@dataclass(slots=True)
class _Live:
    agent_id: str
    status: AgentStatus | None = None
    heartbeat: Heartbeat | None = None
    models: tuple[LoadedModel, ...] = ()
    """From the newest of status and heartbeat."""
    last_seen: datetime | None = None
    offline_since: float | None = None
    """Monotonic time the agent was last seen going offline (``None`` while it is online)."""
    dirty: bool = False
    state_changed: bool = False
    changes: int = 0
    """Bumped by every message: a row write clears ``dirty`` only if nothing came since."""
    last_written: float = float("-inf")

    @property
    def state(self) -> str:
        return str(self.status.state) if self.status is not None else "unknown"


class FleetMonitor:
    """Implements :class:`edgefed.cloud.services.FleetView` for one fleet.

    ``client`` is an entered :class:`MqttClient`; ``sessions`` makes registry sessions. Call
    :meth:`start` (subscribes) or run :meth:`run` (starts, then writes rows until cancelled).
    """

    def __init__(
        self,
        client: MqttClient,
        topics: Topics,
        sessions: sessionmaker[Session],
        *,
        write_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self._topics = topics
        self._sessions = sessions
        self._write_interval_s = write_interval_s
        self._clock = clock
        self._agents: dict[str, _Live] = {}
        self._known: set[str] = set()
        self._unknown_checked: dict[str, float] = {}
        self._listeners: list[FleetListener] = []
        self._started = False
        self._started_at = clock()
        self._urgent = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Subscribe to status (retained), heartbeats and telemetry of every agent (once)."""
        if self._started:
            return
        self._started = True
        self._started_at = self._clock()
        self._known = await asyncio.to_thread(self._load_known)
        await self._client.subscribe(self._topics.all_agent_status(), self._on_status)
        await self._client.subscribe(self._topics.all_heartbeats(), self._on_heartbeat, qos=0)
        await self._client.subscribe(self._topics.all_telemetry(), self._on_telemetry)
        log.info(
            "fleet %s: watching %d enrolled agents over MQTT", self._topics.fleet, len(self._known)
        )

    async def run(self) -> None:
        """Start, then write agent rows (throttled) until cancelled; a last write on the way out.

        Database work runs in a worker thread, never in the event loop: a request of the API
        holding the write lock (SQLite) or a row lock (PostgreSQL) across its own steps on the
        same loop would otherwise wait for a loop that waits for it."""
        await self.start()
        tick = max(0.05, min(1.0, self._write_interval_s / 2))
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), tick)
                self._urgent.clear()
                try:
                    await self.flush_async()
                except Exception:  # the database may be busy or down: try again later
                    log.exception("fleet %s: writing agent rows failed", self._topics.fleet)
        finally:
            with contextlib.suppress(Exception):
                await self.flush_async(force=True)

    def _load_known(self) -> set[str]:
        with self._sessions() as session:
            return set(session.scalars(select(Agent.id).where(Agent.fleet == self._topics.fleet)))

    @property
    def topics(self) -> Topics:
        return self._topics

    def add_listener(self, listener: FleetListener) -> None:
        self._listeners.append(listener)

    # ------------------------------------------------------------------ FleetView

    def connected(self) -> bool:
        """Whether the controller's MQTT link is up."""
        return self._client.connected

    def live(self, agent_id: str) -> dict[str, Any] | None:
        """Latest status and heartbeat of an agent as received (``None``: never seen)."""
        entry = self._agents.get(agent_id)
        if entry is None:
            return None
        return {
            "agent_id": agent_id,
            "state": entry.state,
            "last_seen": entry.last_seen.isoformat() if entry.last_seen else None,
            "models": [m.model_dump(mode="json") for m in entry.models],
            "status": entry.status.model_dump(mode="json") if entry.status else None,
            "heartbeat": entry.heartbeat.model_dump(mode="json") if entry.heartbeat else None,
        }

    # ------------------------------------------------------------------ for the rollout gates

    def state(self, agent_id: str) -> str:
        """``online``, ``offline``, ``draining`` or ``unknown`` (never seen)."""
        entry = self._agents.get(agent_id)
        return entry.state if entry is not None else "unknown"

    def is_online(self, agent_id: str) -> bool:
        return self.offline_for(agent_id) is None

    def offline_for(self, agent_id: str) -> float | None:
        """Seconds the agent has been offline (``None`` while online). An agent never seen is
        offline since the monitor started."""
        entry = self._agents.get(agent_id)
        now = self._clock()
        if entry is None or entry.status is None:
            return now - self._started_at
        if entry.offline_since is None:
            return None
        return now - entry.offline_since

    def loaded_models(self, agent_id: str) -> dict[str, int]:
        """Model versions the agent says it serves, by name (newest of status and heartbeat)."""
        entry = self._agents.get(agent_id)
        if entry is None:
            return {}
        out: dict[str, int] = {}
        for m in entry.models:
            out[m.name] = max(out.get(m.name, 0), m.version)
        return out

    def heartbeat(self, agent_id: str) -> Heartbeat | None:
        entry = self._agents.get(agent_id)
        return entry.heartbeat if entry is not None else None

    # ------------------------------------------------------------------ registry rows

    def flush(self, *, force: bool = False) -> int:
        """Write the rows of agents with news: those whose state changed at once, the others at
        most every ``write_interval_s``. Returns how many rows were written. Blocking: from the
        event loop use :meth:`flush_async`."""
        due = self._due(force)
        return self._done(due, self._write(due)) if due else 0

    async def flush_async(self, *, force: bool = False) -> int:
        """:meth:`flush` with the database work in a worker thread."""
        due = self._due(force)
        if not due:
            return 0
        written = await asyncio.to_thread(self._write, due)
        return self._done(due, written)

    def _due(self, force: bool) -> list[_Row]:
        now = self._clock()
        return [
            _Row(
                agent_id=e.agent_id,
                changes=e.changes,
                state=e.state,
                last_seen=e.last_seen,
                status=e.status.model_dump(mode="json") if e.status is not None else None,
                heartbeat=e.heartbeat.model_dump(mode="json") if e.heartbeat is not None else None,
            )
            for e in self._agents.values()
            if e.dirty
            and (force or e.state_changed or now - e.last_written >= self._write_interval_s)
        ]

    def _write(self, due: list[_Row]) -> set[str]:
        """Write the rows (any thread); returns the ids of agents that are no longer enrolled."""
        gone: set[str] = set()
        with self._sessions() as session:
            rows = {
                a.id: a
                for a in session.scalars(
                    select(Agent).where(Agent.id.in_([r.agent_id for r in due]))
                )
            }
            for snap in due:
                row = rows.get(snap.agent_id)
                if row is None:  # removed since (revoked): forget it
                    gone.add(snap.agent_id)
                    continue
                row.state = snap.state
                row.last_seen = snap.last_seen
                if snap.status is not None:
                    row.last_status = snap.status
                if snap.heartbeat is not None:
                    row.last_heartbeat = snap.heartbeat
            session.commit()
        return gone

    def _done(self, due: list[_Row], gone: set[str]) -> int:
        now = self._clock()
        for snap in due:
            if snap.agent_id in gone:
                self._known.discard(snap.agent_id)
                self._agents.pop(snap.agent_id, None)
                continue
            entry = self._agents.get(snap.agent_id)
            if entry is None:
                continue
            entry.last_written = now
            if entry.changes == snap.changes:
                entry.dirty = entry.state_changed = False
        return len(due) - len(gone)

    # ------------------------------------------------------------------ handlers

    def _is_enrolled(self, agent_id: str) -> bool:
        with self._sessions() as session:
            row = session.get(Agent, agent_id)
            return row is not None and row.fleet == self._topics.fleet

    async def _entry(self, topic: str, payload_agent: str | None = None) -> _Live | None:
        agent_id = self._topics.agent_of(topic)
        if agent_id is None:
            return None
        if payload_agent is not None and payload_agent != agent_id:
            log.warning(
                "fleet %s: message on %s names agent %r: dropped",
                self._topics.fleet,
                topic,
                payload_agent,
            )
            return None
        if agent_id not in self._known and not await self._enrolled(agent_id):
            return None
        entry = self._agents.get(agent_id)
        if entry is None:
            entry = self._agents[agent_id] = _Live(agent_id)
        entry.last_seen = datetime.now(UTC)
        entry.dirty = True
        entry.changes += 1
        return entry

    async def _enrolled(self, agent_id: str) -> bool:
        """Look an unknown agent up in the registry (at most every few seconds per id)."""
        now = self._clock()
        checked = self._unknown_checked.get(agent_id)
        if checked is not None and now - checked < _UNKNOWN_RECHECK_S:
            return False
        if len(self._unknown_checked) > 10_000:
            self._unknown_checked.clear()
        self._unknown_checked[agent_id] = now
        found = await asyncio.to_thread(self._is_enrolled, agent_id)
        if found:
            self._known.add(agent_id)
            self._unknown_checked.pop(agent_id, None)
        else:
            log.warning(
                "fleet %s: ignoring messages of %r, which is not an enrolled agent of this fleet",
                self._topics.fleet,
                agent_id,
            )
        return found

    async def _on_status(self, message: Message) -> None:
        if not message.payload:  # a cleared retained status
            return
        try:
            status = decode(
                message.payload, message.content_type, AgentStatus, max_bytes=_MAX_PAYLOAD_BYTES
            ).message
        except PayloadError as exc:
            log.warning("fleet %s: bad status on %s: %s", self._topics.fleet, message.topic, exc)
            return
        entry = await self._entry(message.topic, status.agent_id)
        if entry is None:
            return
        before = entry.state
        entry.status = status
        entry.models = tuple(status.models)
        offline = status.state == AgentState.OFFLINE
        if offline and entry.offline_since is None:
            entry.offline_since = self._clock()
        elif not offline:
            entry.offline_since = None
        if entry.state != before:
            entry.state_changed = True
            self._urgent.set()
            log.info("agent %s is %s", entry.agent_id, entry.state)
        for listener in self._listeners:
            self._call(listener.on_status, entry.agent_id, status)

    async def _on_heartbeat(self, message: Message) -> None:
        if message.user_property("probe") is not None:
            return  # the agent's round-trip probe, not a heartbeat
        try:
            beat = decode(
                message.payload, message.content_type, Heartbeat, max_bytes=_MAX_PAYLOAD_BYTES
            ).message
        except PayloadError as exc:
            log.debug("fleet %s: bad heartbeat on %s: %s", self._topics.fleet, message.topic, exc)
            return
        entry = await self._entry(message.topic, beat.agent_id)
        if entry is None:
            return
        entry.heartbeat = beat
        entry.models = tuple(beat.models)
        for listener in self._listeners:
            self._call(listener.on_heartbeat, entry.agent_id, beat)

    async def _on_telemetry(self, message: Message) -> None:
        try:
            batch = decode(
                message.payload, message.content_type, Telemetry, max_bytes=_MAX_PAYLOAD_BYTES
            ).message
        except PayloadError as exc:
            log.warning("fleet %s: bad telemetry on %s: %s", self._topics.fleet, message.topic, exc)
            return
        entry = await self._entry(message.topic, batch.agent_id)
        if entry is None:
            return
        for record in batch.records:
            if record.name != LIFECYCLE_RECORD:
                continue
            event = _lifecycle(entry.agent_id, record.ts, record.fields)
            if event is None:
                log.debug("agent %s: malformed lifecycle record %s", entry.agent_id, record)
                continue
            for listener in self._listeners:
                self._call(listener.on_lifecycle, event)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a listener's bug must not stop the monitor
            log.exception("fleet listener %s failed", fn)


def _lifecycle(
    agent_id: str, ts: float, fields: dict[str, str | int | float | bool | None]
) -> LifecycleEvent | None:
    model, version, step = fields.get("model"), fields.get("version"), fields.get("step")
    if not isinstance(model, str) or not isinstance(step, str):
        return None
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        return None
    detail = fields.get("detail")
    reason = fields.get("reason")
    return LifecycleEvent(
        agent_id=agent_id,
        model=model,
        version=version,
        step=step,
        detail=detail if isinstance(detail, str) else "",
        reason=reason if isinstance(reason, str) else None,
        temporary=fields.get("temporary") is True,
        ts=ts,
    )
