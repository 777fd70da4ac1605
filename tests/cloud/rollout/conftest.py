"""Fixtures of the rollout tests: a real controller state (SQLite registry migrated with
Alembic, artifact store, signing key, admin token -- what ``edgefed cloud serve`` opens), the
real FleetMonitor / DesiredStatePublisher / RolloutEngine running as asyncio tasks on a real
mosquitto, the real control API in process (httpx), and lightweight simulated agents: real MQTT
clients that answer their desired state the way ``edgefed.edge.agent`` does (retained status
with a last will, heartbeats with cumulative request counters and latency, ``model.lifecycle``
telemetry), with switches to fail a version's load or report errors and latency."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from edgefed.cloud.api.app import create_app, open_controller
from edgefed.cloud.api.state import ControllerState
from edgefed.cloud.fleet.desired import DesiredStatePublisher, artifact_path
from edgefed.cloud.fleet.monitor import LIFECYCLE_RECORD, FleetMonitor
from edgefed.cloud.registry.models import (
    Agent,
    Artifact,
    AuditRecord,
    Deployment,
    DeploymentStatus,
    Model,
    ModelVersion,
    RolloutEvent,
)
from edgefed.cloud.rollout.engine import RolloutEngine
from edgefed.cloud.services import Services
from edgefed.cloud.settings import CloudSettings, load_cloud_settings
from edgefed.common.artifact import MANIFEST_NAME, SIGNATURE_NAME, Manifest, write_artifact
from edgefed.common.broker import PrivateBroker
from edgefed.common.mqtt import Message, MqttClient, Will
from edgefed.common.schemas import (
    AgentState,
    AgentStatus,
    DesiredState,
    Heartbeat,
    LatencyFigures,
    LoadedModel,
    ResourceFigures,
    Telemetry,
    TelemetryRecord,
    decode,
)
from edgefed.common.topics import Topics
from tests.conftest import fast_settings

TARGET = "x86-avx2"
MODEL = "embed"


# --------------------------------------------------------------------------- the controller


@dataclass
class Cloud:
    """The controller's state as ``edgefed cloud serve`` opens it."""

    settings: CloudSettings
    state: ControllerState
    admin_token: str

    @property
    def store(self) -> Path:
        return self.state.artifact_store

    @property
    def sessions(self) -> Any:
        return self.state.write_sessions

    def add_model(self, name: str = MODEL, task: str = "feature-extraction") -> None:
        with self.sessions() as s:
            s.add(Model(name=name, task=task, teacher_dir=None, created_by="test"))
            s.commit()

    def publish_version(
        self,
        version: int,
        name: str = MODEL,
        *,
        metrics: dict[str, float] | None = None,
        src: Path | None = None,
        corrupt: bool = False,
    ) -> Path:
        """A signed artifact of ``name`` v``version`` in the store (signed by the controller's
        key), registered like a finished compression job registers one. ``src``: a real
        artifact to copy (its graph specs are kept); ``corrupt``: its model.onnx is garbage
        (signed all the same, so it verifies but cannot load)."""
        dest = artifact_path(self.store, name, version, TARGET)
        manifest: Manifest | None = None
        if src is not None:
            manifest = Manifest.model_validate_json((src / MANIFEST_NAME).read_bytes())
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns(MANIFEST_NAME, SIGNATURE_NAME))
            if corrupt:
                (dest / "model.onnx").write_bytes(b"this is not an ONNX graph" * 40)
        else:
            dest.mkdir(parents=True)
            (dest / "model.onnx").write_bytes(f"{name} v{version} ".encode() * 64)
        written = write_artifact(
            dest,
            name=name,
            version=version,
            task=manifest.task if manifest is not None else "feature-extraction",
            target=TARGET,
            signing_key=self.state.signing_key,
            inputs=manifest.inputs if manifest is not None else (),
            outputs=manifest.outputs if manifest is not None else (),
            opset=manifest.opset if manifest is not None else None,
            metrics=metrics,
        )
        sha = hashlib.sha256((dest / MANIFEST_NAME).read_bytes()).hexdigest()
        with self.sessions() as s:
            model = s.scalars(select(Model).where(Model.name == name)).one()
            row = ModelVersion(model_id=model.id, version=version, note="test")
            s.add(row)
            s.flush()
            s.add(
                Artifact(
                    version_id=row.id,
                    target=TARGET,
                    path=f"{name}/v{version}/{TARGET}",
                    manifest_sha256=sha,
                    size_bytes=written.total_size,
                    metrics=dict(metrics or {}),
                )
            )
            s.commit()
        return dest

    def enrol(self, agent_id: str, **labels: str) -> None:
        with self.sessions() as s:
            s.add(Agent(id=agent_id, fleet=self.settings.fleet, labels=labels, hostname=agent_id))
            s.commit()

    def deployment(self, dep_id: int) -> Deployment:
        with self.state.sessions() as s:
            dep = s.get(Deployment, dep_id)
            assert dep is not None
            dep.agents  # noqa: B018 - load the agents while the session is open
            return dep

    def events(self, dep_id: int) -> list[RolloutEvent]:
        with self.state.sessions() as s:
            return list(
                s.scalars(
                    select(RolloutEvent)
                    .where(RolloutEvent.deployment_id == dep_id)
                    .order_by(RolloutEvent.id)
                )
            )

    def versions(self, name: str = MODEL) -> dict[int, ModelVersion]:
        with self.state.sessions() as s:
            rows = s.scalars(select(ModelVersion).join(Model).where(Model.name == name)).all()
            return {r.version: r for r in rows}

    def count(self, table: type[Any]) -> int:
        with self.state.sessions() as s:
            return len(s.scalars(select(table)).all())


@pytest.fixture
def cloud(tmp_path: Path, broker: PrivateBroker, fleet: str) -> Iterator[Cloud]:
    base = fast_settings(broker.url, fleet)
    settings = load_cloud_settings(
        broker_url=broker.url,
        fleet=fleet,
        mqtt=base.mqtt.model_dump(),
        controller={"data_dir": str(tmp_path / "controller"), "rate_limit_per_minute": 100_000},
    )
    state = open_controller(settings)
    token = state.admin_token_file.read_text().strip()
    try:
        yield Cloud(settings, state, token)
    finally:
        state.engine.dispose()


@dataclass
class Controller:
    client: MqttClient
    monitor: FleetMonitor
    publisher: DesiredStatePublisher
    engine: RolloutEngine
    tasks: list[asyncio.Task[None]]


@contextlib.asynccontextmanager
async def running_controller(
    cloud: Cloud, *, public_url: str = "http://127.0.0.1:9", tick_s: float = 0.1
) -> AsyncIterator[Controller]:
    """Monitor, publisher and engine wired exactly as ``edgefed cloud serve`` wires them, as
    asyncio tasks; on the way out the tasks are cancelled and the MQTT client closed (what a
    controller that stops mid-rollout leaves behind)."""
    client = MqttClient.from_settings(cloud.settings, client_id=f"ctl-{uuid.uuid4().hex[:8]}")
    await client.__aenter__()
    topics = Topics(cloud.settings.fleet)
    monitor = FleetMonitor(client, topics, cloud.sessions, write_interval_s=0.5)
    publisher = DesiredStatePublisher(client, topics, store=cloud.store, public_url=public_url)
    engine = RolloutEngine(
        cloud.sessions, monitor, publisher, signing_key=cloud.state.signing_key, tick_s=tick_s
    )
    tasks = [asyncio.create_task(monitor.run()), asyncio.create_task(engine.run())]
    try:
        yield Controller(client, monitor, publisher, engine, tasks)
    finally:
        for task in tasks:
            task.cancel()
        done, stuck = await asyncio.wait(tasks, timeout=15)
        for task in done:  # retrieved, as gather(return_exceptions=True) did
            _ = task.cancelled() or task.exception()
        if stuck:  # a service ignoring cancellation: say where it is instead of hanging
            where = "\n".join(f"{t.get_name()}: {t.get_stack(limit=8)}" for t in stuck)
            raise AssertionError(f"controller tasks did not stop when cancelled:\n{where}")
        await asyncio.wait_for(client.aclose(), timeout=15)


@contextlib.asynccontextmanager
async def api_client(cloud: Cloud, ctl: Controller | None) -> AsyncIterator[httpx.AsyncClient]:
    """The real control API in process, with the running services (as ``cloud serve``)."""
    services = Services(rollouts=ctl.engine, fleet=ctl.monitor) if ctl else Services()
    app = create_app(cloud.settings, services=services)
    app.state.controller = cloud.state
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://controller",
        headers={"Authorization": f"Bearer {cloud.admin_token}"},
    ) as client:
        yield client


# --------------------------------------------------------------------------- simulated agents


@dataclass
class SimAgent:
    """An agent in miniature: loads what its desired state names (unless told to fail),
    refuses versions below one it activated, reports like the real agent."""

    settings: Any
    agent_id: str
    fail_versions: set[int] = field(default_factory=set)
    error_rate: dict[int, float] = field(default_factory=dict)
    caller_error_rate: dict[int, float] = field(default_factory=dict)
    """Share of requests refused as the caller's fault (``malformed``: e.g. a text too long)."""
    """Share of requests answered with an error, per version served."""
    latency_ms: dict[int, float] = field(default_factory=dict)
    """p50 latency per version served (default 10 ms)."""
    requests_per_beat: int = 10
    heartbeat_s: float = 0.1
    loaded: dict[str, int] = field(default_factory=dict)
    activated: dict[str, int] = field(default_factory=dict)
    received: list[DesiredState] = field(default_factory=list)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    generation: int = 0
    client: MqttClient | None = None
    _seq: int = 0
    _task: asyncio.Task[None] | None = None

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.fleet)

    async def start(self) -> None:
        offline = AgentStatus(agent_id=self.agent_id, state=AgentState.OFFLINE, reason="lost")
        self.client = MqttClient.from_settings(
            self.settings,
            client_id=f"sim-{self.agent_id}",
            will=Will(self.topics.agent_status(self.agent_id), offline.to_json()),
        )
        await self.client.__aenter__()
        await self.client.subscribe(self.topics.desired(self.agent_id), self._on_desired)
        await self._status()
        self._task = asyncio.create_task(self._beats())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.client is not None:
            await self.client.aclose()

    async def _status(self) -> None:
        assert self.client is not None
        status = AgentStatus(
            agent_id=self.agent_id,
            state=AgentState.ONLINE,
            models=[LoadedModel(name=n, version=v) for n, v in self.loaded.items()],
        )
        await self.client.publish(
            self.topics.agent_status(self.agent_id), status.to_json(), retain=True
        )

    async def _lifecycle(self, model: str, version: int, step: str, detail: str = "") -> None:
        assert self.client is not None
        self._seq += 1
        batch = Telemetry(
            agent_id=self.agent_id,
            seq=self._seq,
            records=[
                TelemetryRecord(
                    name=LIFECYCLE_RECORD,
                    ts=time.time(),
                    fields={
                        "model": model,
                        "version": version,
                        "step": step,
                        "detail": detail,
                        "reason": None,
                    },
                )
            ],
        )
        await self.client.publish(self.topics.telemetry(self.agent_id), batch.to_json())

    async def _on_desired(self, message: Message) -> None:
        if not message.payload:
            return
        state = decode(message.payload, message.content_type, DesiredState).message
        self.received.append(state)
        if state.generation <= self.generation:
            return  # replay protection, as the real agent
        self.generation = state.generation
        wanted = {m.name: m.version for m in state.models}
        for name, version in wanted.items():
            if self.loaded.get(name) == version:
                continue
            if version < self.activated.get(name, 0):
                await self._lifecycle(name, version, "rejected", "version went down")
            elif version in self.fail_versions:
                await self._lifecycle(name, version, "loading")
                await self._lifecycle(name, version, "failed", "the model cannot be loaded")
            else:
                self.loaded[name] = version
                self.activated[name] = max(self.activated.get(name, 0), version)
                await self._lifecycle(name, version, "loaded")
        for name in [n for n in self.loaded if n not in wanted]:
            del self.loaded[name]
        await self._status()

    async def _beats(self) -> None:
        assert self.client is not None
        seq = 0
        while True:
            await asyncio.sleep(self.heartbeat_s)
            latency: dict[str, LatencyFigures] = {}
            for name, version in self.loaded.items():
                n = self.requests_per_beat
                errors = round(n * self.error_rate.get(version, 0.0))
                refused = round(n * self.caller_error_rate.get(version, 0.0))
                counts = self.counts.setdefault(name, {})
                counts["ok"] = counts.get("ok", 0) + n - errors - refused
                if errors:
                    counts["internal"] = counts.get("internal", 0) + errors
                if refused:
                    counts["malformed"] = counts.get("malformed", 0) + refused
                p50 = self.latency_ms.get(version, 10.0)
                latency[name] = LatencyFigures(count=n, p50_ms=p50, p99_ms=p50 * 2)
            seq += 1
            beat = Heartbeat(
                agent_id=self.agent_id,
                seq=seq,
                resources=ResourceFigures(
                    cpu_percent=1.0, memory_used_bytes=1, memory_total_bytes=2
                ),
                models=[LoadedModel(name=n, version=v) for n, v in self.loaded.items()],
                latency=latency,
                requests={k: dict(v) for k, v in self.counts.items()},
            )
            with contextlib.suppress(Exception):
                await self.client.publish(
                    self.topics.heartbeat(self.agent_id), beat.to_json(), qos=0, wait=False
                )


@contextlib.asynccontextmanager
async def sim_agents(cloud: Cloud, *ids: str, **labels: str) -> AsyncIterator[dict[str, SimAgent]]:
    """Enrol and start simulated agents (each with ``labels``)."""
    agents = {}
    for agent_id in ids:
        cloud.enrol(agent_id, **labels)
        agents[agent_id] = SimAgent(cloud.settings, agent_id)
    for agent in agents.values():
        await agent.start()
    try:
        yield agents
    finally:
        for agent in agents.values():
            await agent.stop()


@dataclass
class DesiredSpy:
    """Every desired state published on the fleet's desired topics, by agent."""

    seen: list[DesiredState] = field(default_factory=list)

    def versions(self, agent_id: str, model: str = MODEL) -> list[int]:
        return [
            m.version
            for s in self.seen
            if s.agent_id == agent_id
            for m in s.models
            if m.name == model
        ]

    def generations(self, agent_id: str) -> list[int]:
        return [s.generation for s in self.seen if s.agent_id == agent_id]


@contextlib.asynccontextmanager
async def desired_spy(cloud: Cloud) -> AsyncIterator[DesiredSpy]:
    spy = DesiredSpy()

    async def on_desired(message: Message) -> None:
        if message.payload and not message.retain:
            spy.seen.append(decode(message.payload, message.content_type, DesiredState).message)

    prefix = Topics(cloud.settings.fleet).prefix
    async with MqttClient.from_settings(
        cloud.settings, client_id=f"spy-{uuid.uuid4().hex[:8]}"
    ) as c:
        await c.subscribe(f"{prefix}/agents/+/desired", on_desired)
        yield spy


async def eventually(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]], timeout: float = 30.0
) -> Any:
    """Poll ``check`` until it returns something truthy (its value) or fail after ``timeout``
    (a bound on waiting, not a timed assertion)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not reached within {timeout} s (last: {last!r})")


async def wait_status(
    cloud: Cloud, dep_id: int, *statuses: DeploymentStatus, timeout: float = 30.0
) -> Deployment:
    def check() -> Deployment | None:
        dep = cloud.deployment(dep_id)
        return dep if dep.status in statuses else None

    try:
        result: Deployment = await eventually(check, timeout)
    except AssertionError:
        dep = cloud.deployment(dep_id)
        kinds = [(e.kind, e.detail) for e in cloud.events(dep_id)]
        raise AssertionError(
            f"deployment {dep_id} is {dep.status} ({dep.reason}), not {statuses}; events {kinds}"
        ) from None
    return result


async def eventually_event(cloud: Cloud, dep_id: int, kind: str) -> RolloutEvent:
    result: RolloutEvent = await eventually(
        lambda: next((e for e in cloud.events(dep_id) if e.kind == kind), None)
    )
    return result


async def eventually_loaded(agents: dict[str, SimAgent], ids: list[str], version: int) -> None:
    await eventually(lambda: all(agents[a].loaded.get(MODEL) == version for a in ids))


def audit_records(cloud: Cloud, resource: str) -> list[AuditRecord]:
    with cloud.state.sessions() as s:
        return list(s.scalars(select(AuditRecord).where(AuditRecord.resource == resource)))


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The edge tests' tiny real ONNX artifacts (built once per session, ~10 s)."""
    from tests.edge.tiny_artifacts import build_tiny_artifacts

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return build_tiny_artifacts(tmp_path_factory.mktemp("rollout-tiny"))
