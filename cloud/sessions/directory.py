"""Which agents can hold sessions now: the fleet's statuses (retained, backed by last wills) and
heartbeats (models served, measured latency per model, uplink figures), followed over MQTT.

A holder is *live* when its last status says ``online``: ``draining`` agents finish what they
have but take no new session (theirs move, reason ``drain``); ``offline`` (a last will, or a
clean stop) means unreachable (theirs move from the controller's replica, reason ``offline``).
Listeners hear every agent that comes (back) online, so deletes owed to it can be sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from edgefed.common.errors import PayloadError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.routing import TargetSnapshot
from edgefed.common.schemas import AgentState, AgentStatus, Heartbeat, LinkFigures, decode
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)

__all__ = ["AgentDirectory", "AgentView"]

OnlineListener = Callable[[str], Awaitable[None]]
_MAX_PAYLOAD_BYTES = 1024 * 1024


@dataclass(slots=True)
class AgentView:
    """What the directory knows of one agent."""

    agent_id: str
    state: AgentState | None = None
    status_models: frozenset[str] = frozenset()
    beat_models: frozenset[str] | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    """Recent latency per model (heartbeats: EWMA, else p50)."""
    link: LinkFigures | None = None
    changed_at: float = 0.0

    @property
    def models(self) -> frozenset[str]:
        return self.beat_models if self.beat_models is not None else self.status_models

    @property
    def online(self) -> bool:
        return self.state is AgentState.ONLINE

    @property
    def reachable(self) -> bool:
        """Connected (online or draining): it can still answer an export or a delete."""
        return self.state in (AgentState.ONLINE, AgentState.DRAINING)


class AgentDirectory:
    """Follows ``agents/+/status`` and ``agents/+/heartbeat`` of one fleet on ``client``.

    ``targets`` (the gateway router's snapshot) adds its latency estimates for agents whose
    heartbeats carry none, and its ejections (an agent that keeps failing is not live)."""

    def __init__(
        self,
        topics: Topics,
        *,
        targets: Callable[[], list[TargetSnapshot]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self._targets = targets
        self._clock = clock
        self._agents: dict[str, AgentView] = {}
        self._listeners: list[OnlineListener] = []
        self._changed = asyncio.Event()

    async def watch(self, client: MqttClient) -> None:
        await client.subscribe(self.topics.all_agent_status(), self._on_status)
        await client.subscribe(self.topics.all_heartbeats(), self._on_heartbeat, qos=0)

    def on_online(self, listener: OnlineListener) -> None:
        """``await listener(agent_id)`` whenever an agent says it is online (again)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ intake

    def _view(self, agent_id: str) -> AgentView:
        view = self._agents.get(agent_id)
        if view is None:
            view = self._agents[agent_id] = AgentView(agent_id)
        return view

    async def _on_status(self, message: Message) -> None:
        agent = self.topics.agent_of(message.topic)
        if agent is None or not message.payload:
            return
        try:
            status = decode(
                message.payload, message.content_type, AgentStatus, max_bytes=_MAX_PAYLOAD_BYTES
            ).message
        except PayloadError as exc:
            log.debug("ignored agent status on %s: %s", message.topic, exc)
            return
        if status.agent_id != agent:
            return
        await self.apply_status(status)

    async def apply_status(self, status: AgentStatus) -> None:
        view = self._view(status.agent_id)
        was_online = view.online
        view.state = status.state
        view.status_models = frozenset(m.name for m in status.models)
        if status.state is not AgentState.ONLINE:
            view.beat_models = None  # a restarted agent announces its models afresh
        view.changed_at = self._clock()
        self._changed.set()
        self._changed = asyncio.Event()
        if view.online and not was_online:
            for listener in self._listeners:
                try:
                    await listener(status.agent_id)
                except Exception:
                    log.exception("session listener failed for agent %s", status.agent_id)

    async def _on_heartbeat(self, message: Message) -> None:
        agent = self.topics.agent_of(message.topic)
        if agent is None:
            return
        try:
            beat = decode(
                message.payload, message.content_type, Heartbeat, max_bytes=_MAX_PAYLOAD_BYTES
            ).message
        except PayloadError:
            return  # agents also publish RTT probes on this topic
        if beat.agent_id == agent:
            self.apply_heartbeat(beat)

    def apply_heartbeat(self, beat: Heartbeat) -> None:
        view = self._view(beat.agent_id)
        view.beat_models = frozenset(m.name for m in beat.models)
        view.latency_ms = {
            model: fig.ewma_ms if fig.ewma_ms is not None else fig.p50_ms
            for model, fig in beat.latency.items()
            if fig.count > 0
        }
        if beat.link is not None:
            view.link = beat.link

    # ------------------------------------------------------------------ queries

    def get(self, agent_id: str | None) -> AgentView | None:
        return None if agent_id is None else self._agents.get(agent_id)

    def _ejected(self) -> set[str]:
        if self._targets is None:
            return set()
        try:
            return {t.id for t in self._targets() if t.health == "ejected"}
        except Exception:  # noqa: BLE001 - the gateway's view is a hint only
            return set()

    def live(self, agent_id: str | None, model: str | None = None) -> bool:
        """Online (not draining), not ejected by the gateway, serving ``model`` if given."""
        view = self.get(agent_id)
        if view is None or not view.online or view.agent_id in self._ejected():
            return False
        return model is None or model in view.models

    def reachable(self, agent_id: str | None) -> bool:
        view = self.get(agent_id)
        return view is not None and view.reachable

    def online_ids(self) -> list[str]:
        return sorted(a for a, v in self._agents.items() if v.online)

    def candidates(self, model: str, exclude: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Live agents serving ``model``, not in ``exclude``."""
        ejected = self._ejected()
        return sorted(
            a
            for a, v in self._agents.items()
            if v.online and model in v.models and a not in exclude and a not in ejected
        )

    def latency_ms(self, agent_id: str, model: str) -> float | None:
        """Recent latency of ``model`` on the agent (its heartbeats; else the gateway's
        estimate of the agent as a target); ``None`` while unmeasured."""
        view = self._agents.get(agent_id)
        if view is not None and model in view.latency_ms:
            return view.latency_ms[model]
        if self._targets is not None:
            try:
                for t in self._targets():
                    if t.id == agent_id and t.estimate_ms is not None:
                        return t.estimate_ms
            except Exception:  # noqa: BLE001 - a hint only
                return None
        return None

    def link(self, agent_id: str) -> LinkFigures | None:
        view = self._agents.get(agent_id)
        return view.link if view is not None else None

    async def wait_gone(self, agent_id: str) -> None:
        """Return once ``agent_id`` is no longer reachable (its status says offline)."""
        while self.reachable(agent_id):
            await self._changed.wait()

    async def wait_change(self, agent_id: str, timeout: float) -> None:
        """Return once ``agent_id``'s status changed, or after ``timeout`` seconds."""
        view = self._agents.get(agent_id)
        since = view.changed_at if view is not None else 0.0
        deadline = self._clock() + timeout
        while True:
            view = self._agents.get(agent_id)
            if view is not None and view.changed_at != since:
                return
            left = deadline - self._clock()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return
