"""The whole agent against a real mosquitto, a real HTTP controller stand-in and real ONNX
Runtime on tiny exported models: join, reconcile, serve, swap, refuse, restart, go offline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edgefed.common.artifact import SigningKey, generate_signing_key
from edgefed.common.broker import PrivateBroker, free_port
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import (
    DesiredModel,
    DesiredState,
    InferenceReply,
    InferenceRequest,
    Telemetry,
    TelemetryRecord,
    decode,
)
from edgefed.common.settings import Settings
from edgefed.common.topics import Topics
from edgefed.edge.agent import Agent
from edgefed.edge.config import AgentConfig
from edgefed.edge.join import join
from tests.conftest import fast_settings, wait_broker_saved

from .controller_stub import ControllerStub, running_controller
from .random_artifacts import flip_byte, manifest_sha256
from .tiny_artifacts import TinyArtifacts, resign

pytestmark = pytest.mark.integration
TARGET = "x86-avx2"


@dataclass
class Fleet:
    """A cloud broker, a controller stand-in with an artifact store, and a joined agent."""

    cloud: PrivateBroker
    stub: ControllerStub
    config: AgentConfig
    settings: Settings
    topics: Topics
    key: SigningKey
    tiny: TinyArtifacts
    records: asyncio.Queue[TelemetryRecord] = field(default_factory=asyncio.Queue)
    generation: int = 0

    def publish_artifact(self, src: Path, name: str, version: int) -> Path:
        dest = self.stub.store / name / f"v{version}" / TARGET
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(src, dest)
        return dest

    def desired(self, name: str, version: int, **kw: Any) -> DesiredState:
        self.generation += 1
        directory = self.stub.store / name / f"v{version}" / TARGET
        model = DesiredModel(
            name=name,
            version=version,
            artifact_url=self.stub.artifact_url(name, version, TARGET),
            manifest_sha256=manifest_sha256(directory),
            providers=["CPUExecutionProvider"],
            **kw,
        )
        return DesiredState(
            agent_id=self.config.agent_id, generation=self.generation, models=[model]
        )

    async def wait_for(self, step: str, version: int | None = None) -> TelemetryRecord:
        while True:
            record = await asyncio.wait_for(self.records.get(), 30)
            if record.name != "model.lifecycle" or record.fields.get("step") != step:
                continue
            if version is None or record.fields.get("version") == version:
                return record


@pytest.fixture
def edge_fleet(tmp_path: Path, tiny_artifacts: TinyArtifacts, fleet: str) -> Iterator[Fleet]:
    cloud = PrivateBroker(data_dir=tmp_path / "cloud", persistence=True)
    cloud.start()
    key = tiny_artifacts.key
    stub = ControllerStub(
        store=tmp_path / "store",
        fleet=fleet,
        broker_url=cloud.url,
        signing_keys=[key.verify_key.to_base64()],
        join_tokens={"join-me"},
    )
    with running_controller(stub):
        config = join(stub.url, "join-me", tmp_path / "state", labels={"site": "test"})
        config = config.model_copy(
            update={
                "heartbeat_s": 0.5,
                "telemetry_s": 0.5,
                "metrics_port": 0,
                "local_endpoint": config.local_endpoint.model_copy(update={"port": 0}),
            }
        )
        config.save()
        settings = fast_settings(cloud.url, fleet)
        yield Fleet(cloud, stub, config, settings, Topics(fleet), key, tiny_artifacts)
    cloud.close()


@contextlib.asynccontextmanager
async def controller_side(f: Fleet) -> AsyncIterator[tuple[MqttClient, Requester]]:
    async def on_telemetry(msg: Message) -> None:
        batch = decode(msg.payload, msg.content_type, Telemetry).message
        for record in batch.records:
            await f.records.put(record)

    async with MqttClient.from_settings(f.settings, client_id="controller") as ctl:
        await ctl.subscribe(f.topics.telemetry(f.config.agent_id), on_telemetry)
        yield ctl, Requester(ctl, f.topics)


@contextlib.asynccontextmanager
async def running_agent(f: Fleet) -> AsyncIterator[Agent]:
    agent = Agent(AgentConfig.load(f.config.state_dir), f.settings)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.wait_for(agent.ready.wait(), 60)
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def publish_desired(ctl: MqttClient, f: Fleet, state: DesiredState) -> None:
    await ctl.publish(f.topics.desired(f.config.agent_id), state.to_json(), retain=True)


async def embed(requester: Requester, f: Fleet, text: str = "hello edge") -> InferenceReply:
    reply = await requester.request(
        f.topics.agent_infer(f.config.agent_id),
        InferenceRequest(model="tiny-embed", texts=[text]),
        InferenceReply,
        timeout=10,
    )
    return reply.message


async def test_a_joined_agent_fetches_verifies_and_serves_its_desired_model(
    edge_fleet: Fleet,
) -> None:
    f = edge_fleet
    f.publish_artifact(f.tiny.embed.dir, "tiny-embed", 1)
    async with controller_side(f) as (ctl, requester), running_agent(f) as agent:
        await publish_desired(ctl, f, f.desired("tiny-embed", 1))
        loaded = await f.wait_for("loaded", 1)
        reply = await embed(requester, f)

    assert loaded.fields["model"] == "tiny-embed"
    assert reply.version == 1
    assert reply.served_by == f.config.agent_id
    assert len(reply.outputs["results"][0]["embedding"]) == 32
    assert agent.table.names() == ["tiny-embed"]
    downloads = [p for m, p, _ in f.stub.requests if m == "GET"]
    assert any(p.endswith("/model.onnx") for p in downloads)


async def test_a_new_version_swaps_in_while_requests_keep_being_answered(edge_fleet: Fleet) -> None:
    f = edge_fleet
    f.publish_artifact(f.tiny.embed.dir, "tiny-embed", 1)
    v2 = f.stub.store / "v2-src"
    resign(f.tiny.embed.dir, v2, key=f.key, version=2)
    f.publish_artifact(v2, "tiny-embed", 2)
    async with controller_side(f) as (ctl, requester), running_agent(f):
        await publish_desired(ctl, f, f.desired("tiny-embed", 1))
        await f.wait_for("loaded", 1)
        versions: list[int] = []
        failures: list[BaseException] = []
        swapping = True

        async def load() -> None:
            while swapping:
                try:
                    versions.append((await embed(requester, f)).version)
                except Exception as exc:  # noqa: BLE001 - counted: none may fail
                    failures.append(exc)

        clients = [asyncio.create_task(load()) for _ in range(4)]
        await asyncio.sleep(0.3)
        await publish_desired(ctl, f, f.desired("tiny-embed", 2))
        await f.wait_for("loaded", 2)
        await asyncio.sleep(0.3)
        swapping = False
        await asyncio.gather(*clients)

    assert failures == []
    assert 1 in versions
    assert versions[-1] == 2
    assert versions == sorted(versions)  # never back to v1 once v2 answered


@pytest.mark.parametrize("attack", ["flipped-byte", "unsigned", "other-key", "older-version"])
async def test_a_bad_artifact_is_refused_with_its_reason_and_the_old_model_keeps_serving(
    edge_fleet: Fleet, attack: str
) -> None:
    f = edge_fleet
    f.publish_artifact(f.tiny.embed.dir, "tiny-embed", 2 if attack == "older-version" else 1)
    installed = 2 if attack == "older-version" else 1
    bad_version = 1 if attack == "older-version" else 2
    src = f.stub.store / "bad-src"
    signer = generate_signing_key() if attack == "other-key" else f.key
    resign(f.tiny.embed.dir, src, key=signer, version=bad_version)
    if installed == 2:
        resign(f.tiny.embed.dir, f.stub.store / "v2-src", key=f.key, version=2)
        f.publish_artifact(f.stub.store / "v2-src", "tiny-embed", 2)
    bad = f.publish_artifact(src, "tiny-embed", bad_version)
    async with controller_side(f) as (ctl, requester), running_agent(f):
        await publish_desired(ctl, f, f.desired("tiny-embed", installed))
        await f.wait_for("loaded", installed)
        state = f.desired("tiny-embed", bad_version)  # computed over the artifact as served
        if attack == "flipped-byte":
            flip_byte(bad / "model.onnx")
        elif attack == "unsigned":
            (bad / "manifest.sig").unlink()
        await publish_desired(ctl, f, state)
        refused = await f.wait_for("rejected")
        reply = await embed(requester, f)

    expected = {
        "flipped-byte": "hash-mismatch",
        "unsigned": "missing-signature",
        "other-key": "untrusted-signer",
        "older-version": "version-too-low",
    }[attack]
    assert refused.fields["reason"] == expected
    assert reply.version == installed


async def test_the_cloud_link_is_cut_local_requests_are_answered_and_telemetry_waits(
    edge_fleet: Fleet,
) -> None:
    f = edge_fleet
    f.publish_artifact(f.tiny.embed.dir, "tiny-embed", 1)
    async with controller_side(f) as (ctl, _), running_agent(f) as agent:
        await publish_desired(ctl, f, f.desired("tiny-embed", 1))
        await f.wait_for("loaded", 1)
        assert agent.local_url is not None
        local_settings = fast_settings(agent.local_url, f.topics.fleet)
        async with MqttClient.from_settings(local_settings, client_id="local-app") as app:
            local = Requester(app, f.topics)
            await wait_broker_saved(f.cloud, time.time())  # the controller's session survives
            f.cloud.kill()
            answered = [
                await embed(local, f, f"offline {i}") for i in range(5)
            ]  # served while the cloud is gone
            await asyncio.sleep(1.5)  # summaries are written to the outbox meanwhile
            assert len(agent.outbox) > 0
            f.cloud.start()
            while True:
                record = await asyncio.wait_for(f.records.get(), 30)
                if record.name == "requests.summary" and record.fields["cloud_connected"] is False:
                    break
    assert all(r.version == 1 for r in answered)
    assert record.fields["served"] >= 1


async def test_a_killed_agent_serves_its_installed_model_again_without_the_controller(
    edge_fleet: Fleet,
) -> None:
    f = edge_fleet
    f.publish_artifact(f.tiny.embed.dir, "tiny-embed", 1)
    port = free_port()
    config = AgentConfig.load(f.config.state_dir)
    config.local_endpoint.port = port
    config.save()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    env["EDGEFED_MQTT__BACKOFF_MAX_S"] = "0.5"
    command = [sys.executable, "-m", "edgefed.cli", "edge", "run", "--state-dir"]
    command.append(str(f.config.state_dir))
    async with controller_side(f) as (ctl, _):
        proc = await asyncio.create_subprocess_exec(*command, env=env)
        try:
            await publish_desired(ctl, f, f.desired("tiny-embed", 1))
            await f.wait_for("loaded", 1)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
    f.cloud.kill()  # no cloud, no controller: only what is on the device
    proc = await asyncio.create_subprocess_exec(*command, env=env)
    try:
        local_settings = fast_settings(f"mqtt://127.0.0.1:{port}", f.topics.fleet)
        for _ in range(100):  # the restarted agent starts its local endpoint on its own
            try:
                async with MqttClient.from_settings(local_settings, client_id="app") as app:
                    reply = await embed(Requester(app, f.topics), f, "after a crash")
                break
            except Exception:  # noqa: BLE001 - not up yet
                await asyncio.sleep(0.2)
        else:
            pytest.fail("the restarted agent never answered on its local endpoint")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
    assert reply.version == 1


async def test_the_agent_announces_itself_and_sends_heartbeats_with_its_figures(
    edge_fleet: Fleet,
) -> None:
    from edgefed.common.schemas import AgentState, AgentStatus, Heartbeat

    f = edge_fleet
    f.publish_artifact(f.tiny.embed.dir, "tiny-embed", 1)
    statuses: asyncio.Queue[AgentStatus] = asyncio.Queue()
    beats: asyncio.Queue[Heartbeat] = asyncio.Queue()

    async def on_status(msg: Message) -> None:
        await statuses.put(decode(msg.payload, msg.content_type, AgentStatus).message)

    async def on_beat(msg: Message) -> None:
        if msg.payload != b"{}":  # the round-trip probe
            await beats.put(decode(msg.payload, msg.content_type, Heartbeat).message)

    async with controller_side(f) as (ctl, requester):
        await ctl.subscribe(f.topics.agent_status(f.config.agent_id), on_status)
        await ctl.subscribe(f.topics.heartbeat(f.config.agent_id), on_beat)
        async with running_agent(f):
            await publish_desired(ctl, f, f.desired("tiny-embed", 1))
            await f.wait_for("loaded", 1)
            await embed(requester, f)
            while True:
                beat = await asyncio.wait_for(beats.get(), 10)
                if beat.models and beat.latency:
                    break
            online = await asyncio.wait_for(statuses.get(), 10)
        while True:
            last = await asyncio.wait_for(statuses.get(), 10)
            if last.state is AgentState.OFFLINE:
                break
    assert online.state is AgentState.ONLINE
    assert online.labels == {"site": "test"}
    assert beat.resources.memory_total_bytes > 0
    assert [m.name for m in beat.models] == ["tiny-embed"]
    assert beat.latency["tiny-embed"].count >= 1
    assert last.reason == "agent stopped"
