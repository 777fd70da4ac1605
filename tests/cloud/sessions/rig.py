"""A controller (``controller()`` of ``edgefed cloud serve``, in process, real SQLite, real
control API) on a real mosquitto, and session holders standing in for agents: each one the real
:class:`SessionHolder` with its own encrypted store and a tiny GPT-2 decoder (ONNX, KV cache),
on an MQTT client of its own whose last will says it went offline, publishing a retained status
as an agent does. ``stop()`` kills a holder (its will fires), ``start()`` brings it back with
what its store kept on disk."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx

from edgefed.cloud.registry.db import session_scope
from edgefed.cloud.registry.models import SessionRecord
from edgefed.cloud.serve import Running, controller
from edgefed.cloud.sessions.service import SessionService
from edgefed.cloud.settings import load_cloud_settings
from edgefed.common.broker import PrivateBroker
from edgefed.common.mqtt import MqttClient, Will
from edgefed.common.rpc import ReplyCache, serve
from edgefed.common.schemas import (
    AgentState,
    AgentStatus,
    Heartbeat,
    LatencyFigures,
    LoadedModel,
    ResourceFigures,
    encode,
)
from edgefed.common.serving.runtime import OnnxModel
from edgefed.common.sessions.chat import ChatFormat
from edgefed.common.sessions.context import SessionLimits
from edgefed.common.sessions.crypto import FleetKey
from edgefed.common.sessions.holder import HolderSettings, SessionHolder
from edgefed.common.sessions.store import SessionStore
from edgefed.common.sessions.wire import SessionRequest
from edgefed.common.settings import Settings
from edgefed.common.topics import Topics
from tests.conftest import fast_settings
from tests.edge.tiny_artifacts import TinyArtifact

PARAMS = {"max_new_tokens": 6}


class SlowModel:
    """The model, with ``delay_s`` added before every turn (a holder busy when it dies)."""

    def __init__(self, model: OnnxModel, delay_s: float) -> None:
        self._model = model
        self.delay_s = delay_s
        self.started = threading.Event()

    def generate_turn(self, prompt: str, parameters: Any, cache: Any, **kw: Any) -> Any:
        self.started.set()
        time.sleep(self.delay_s)
        return self._model.generate_turn(prompt, parameters, cache, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@dataclass
class FakeAgent:
    """One holder on the broker, as an agent would run it."""

    agent_id: str
    root: Path
    settings: Settings
    topics: Topics
    key: FleetKey
    model: OnnxModel
    chat: ChatFormat
    holder: SessionHolder | None = None
    client: MqttClient | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    slow: SlowModel | None = None
    """Set: turns on this holder take ``slow.delay_s`` longer."""

    def _status(self, state: AgentState) -> bytes:
        models = [LoadedModel(name=self.model.name, version=1)] if state == "online" else []
        return encode(AgentStatus(agent_id=self.agent_id, state=state, models=models)).payload

    async def start(self) -> None:
        self.holder = SessionHolder(
            holder_id=self.agent_id,
            topics=self.topics,
            key=self.key,
            store=SessionStore(self.root / self.agent_id, self.key, self.topics.fleet),
            models=lambda _name: cast(OnnxModel, self.slow) if self.slow else self.model,
            chat_format=lambda _m: self.chat,
            settings=HolderSettings(
                limits=SessionLimits(max_context_bytes=4_000, max_messages=50),
                replica_lag_s=0.05,
                sweep_s=3600,  # copies of expired sessions go when the controller says so
            ),
        )
        self.holder.restore()
        self.client = MqttClient.from_settings(
            self.settings,
            client_id=f"{self.topics.fleet}-{self.agent_id}",
            will=Will(self.topics.agent_status(self.agent_id), self._status(AgentState.OFFLINE)),
        )
        await self.client.__aenter__()
        await serve(
            self.client,
            self.topics.agent_sessions(self.agent_id),
            self.holder.handle_cloud,
            expected=SessionRequest,
            dedup=ReplyCache(),
        )
        self.tasks = [
            asyncio.create_task(self.holder.replicate(self.client)),
            asyncio.create_task(self.holder.sweep()),
        ]
        await self.say(AgentState.ONLINE)

    async def say(self, state: AgentState) -> None:
        assert self.client is not None
        await self.client.publish(
            self.topics.agent_status(self.agent_id), self._status(state), qos=1, retain=True
        )

    async def beat(self, latency_ms: float, seq: int = 1) -> None:
        """A heartbeat saying how fast this agent serves the model now."""
        assert self.client is not None
        beat = Heartbeat(
            agent_id=self.agent_id,
            seq=seq,
            resources=ResourceFigures(
                cpu_percent=10, memory_used_bytes=1 << 20, memory_total_bytes=1 << 30
            ),
            models=[LoadedModel(name=self.model.name, version=1)],
            latency={
                self.model.name: LatencyFigures(
                    count=20, p50_ms=latency_ms, p99_ms=latency_ms, ewma_ms=latency_ms
                )
            },
        )
        await self.client.publish(self.topics.heartbeat(self.agent_id), encode(beat).payload, qos=0)

    async def stop(self, *, will: bool = True) -> None:
        """The agent goes away (its last will says offline)."""
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.tasks = []
        if self.client is not None:
            await self.client.aclose(publish_will=will)
            self.client = None

    def keeps(self, session_id: str) -> bool:
        """Whether this holder keeps a copy (in memory or on disk)."""
        assert self.holder is not None
        return self.holder.context(session_id) is not None or session_id in self.holder.store.ids()

    def on_disk(self, session_id: str) -> bool:
        store = SessionStore(self.root / self.agent_id, self.key, self.topics.fleet)
        return session_id in store.ids()


@dataclass
class Rig:
    running: Running
    agents: dict[str, FakeAgent]
    http: httpx.AsyncClient
    admin: str
    tiny: TinyArtifact

    @property
    def service(self) -> SessionService:
        service = self.running.services.sessions
        assert isinstance(service, SessionService)
        return service

    async def token(self, name: str) -> str:
        r = await self.http.post(
            "/api/v1/tokens",
            json={"name": name, "scopes": ["reader"]},
            headers=bearer(self.admin),
        )
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def row(self, session_id: str) -> SessionRecord | None:
        with session_scope(self.running.state.sessions) as session:
            return session.get(SessionRecord, session_id)

    async def wait_for(self, what: str, check: Callable[[], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"never happened: {what}"
            await asyncio.sleep(0.05)

    async def wait_live(self, *agents: str, live: bool = True) -> None:
        model = self.tiny.name
        await self.wait_for(
            f"agents {agents} live={live}",
            lambda: all(self.service.directory.live(a, model) is live for a in agents),
        )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def session_rig(
    broker: PrivateBroker,
    fleet: str,
    tmp_path: Path,
    tiny: TinyArtifact,
    model: OnnxModel,
    *,
    agents: tuple[str, ...] = ("h1", "h2"),
    database_url: str | None = None,
    **sessions: Any,
) -> AsyncIterator[Rig]:
    mqtt = fast_settings(broker.url, fleet).mqtt.model_dump()
    settings = load_cloud_settings(
        broker_url=broker.url,
        fleet=fleet,
        mqtt=mqtt,
        controller={
            "data_dir": tmp_path / "ctl",
            "database_url": database_url,
            "port": 0,
            "gateway_pools": [],
            "sessions": {"sweep_s": 0.2, "turn_timeout_s": 30, **sessions},
        },
    )
    agent_settings = fast_settings(broker.url, fleet)
    chat = ChatFormat.for_artifact(tiny.dir)
    async with controller(settings) as running:
        key = running.state.session_key
        assert key is not None
        fakes = {
            a: FakeAgent(a, tmp_path / "agents", agent_settings, Topics(fleet), key, model, chat)
            for a in agents
        }
        admin = running.state.admin_token_file.read_text().strip()
        async with httpx.AsyncClient(base_url=running.url, trust_env=False, timeout=60) as http:
            rig = Rig(running, fakes, http, admin, tiny)
            try:
                for fake in fakes.values():
                    await fake.start()
                await rig.wait_live(*agents)
                yield rig
            finally:
                for fake in fakes.values():
                    await fake.stop(will=False)
