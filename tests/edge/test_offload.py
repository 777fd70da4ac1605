"""The agent's offload decision end to end: a real agent (its local and cloud links on real
mosquitto), a real cloud worker pool serving the full model and the tail, real ONNX Runtime on a
tiny 4-layer BERT split at k=1, placements sent in the retained desired state.

A spy subscribes to the pool's topic without the shared subscription, so it sees every request
the pool gets: whole requests carry texts, tail requests carry only the activation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from edgefed.cloud.compress.export import export_onnx
from edgefed.cloud.compress.publish import graph_specs
from edgefed.cloud.settings import load_cloud_settings
from edgefed.cloud.split import export_split, sign_split
from edgefed.cloud.worker.pool import WorkerState, run_worker
from edgefed.common.artifact import verify, write_artifact
from edgefed.common.errors import RemoteError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import (
    DesiredModel,
    DesiredState,
    Heartbeat,
    InferenceReply,
    InferenceRequest,
    Placement,
    decode,
)
from edgefed.common.serving.runtime import OnnxModel
from edgefed.edge.agent import Agent
from edgefed.edge.config import AgentConfig, OffloadConfig
from tests.cloud.split.tiny_split import build
from tests.conftest import fast_settings

from .random_artifacts import manifest_sha256
from .test_agent import TARGET, Fleet, controller_side, edge_fleet, running_agent
from .tiny_artifacts import TinyArtifacts

__all__ = ["edge_fleet"]  # the fixture, imported to be used here

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

NAME = "tiny-bert"
HEAD = f"{NAME}.k1.head"
TAIL = f"{NAME}.k1.tail"
POOL = "gpu"
TEXTS = [
    "Hi there.",
    "Fresh bread smells wonderful early in the morning, every single day.",
    "Split models send activations, not texts.",
]


@dataclass(frozen=True)
class SplitWorld:
    """Signed artifacts of the tiny BERT: full model, head and tail at k=1 (built once)."""

    dirs: dict[str, Path]
    full: OnnxModel


@pytest.fixture(scope="module")
def split_world(
    tmp_path_factory: pytest.TempPathFactory, tiny_artifacts: TinyArtifacts
) -> SplitWorld:
    root = tmp_path_factory.mktemp("offload")
    key = tiny_artifacts.key  # the key the agents of `edge_fleet` trust
    build("bert", root / "model")
    full_dir = export_onnx(root / "model", root / "full", "feature-extraction")
    inputs, outputs, opset = graph_specs(full_dir / "model.onnx")
    write_artifact(
        full_dir,
        name=NAME,
        version=1,
        task="feature-extraction",
        target="fp32",
        signing_key=key,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
    )
    pair = export_split(root / "model", root / "k1", 1, task="feature-extraction")
    signed = sign_split(pair, NAME, 1, key, "fp32", store=root / "signed")
    full = OnnxModel.load(
        full_dir, verify(full_dir, key.verify_key), providers=["CPUExecutionProvider"]
    )
    return SplitWorld({NAME: full_dir, HEAD: signed.head_dir, TAIL: signed.tail_dir}, full)


@dataclass
class PoolSpy:
    """Every request published to the pool: (model, whether it carried texts)."""

    seen: list[tuple[str, bool]] = field(default_factory=list)

    async def on_message(self, msg: Message) -> None:
        request = decode(msg.payload, msg.content_type, InferenceRequest)
        self.seen.append((request.message.model, request.message.texts is not None))

    @property
    def raw(self) -> list[str]:
        """Requests that carried the raw input (texts)."""
        return [model for model, texts in self.seen if texts]


@dataclass
class Harness:
    f: Fleet
    agent: Agent
    worker: WorkerState
    spy: PoolSpy
    ctl: MqttClient
    cloud: Requester
    """A requester on the cloud broker (the gateway's side of the agent)."""
    app: Requester
    """A local application on the agent's local endpoint."""

    async def desire(
        self, models: list[str], placements: dict[str, Placement] | None = None
    ) -> None:
        """Publish a desired state with ``models`` and ``placements`` and wait until the agent
        serves them and has the placements in force."""
        self.f.generation += 1
        entries = [
            DesiredModel(
                name=name,
                version=1,
                artifact_url=self.f.stub.artifact_url(name, 1, TARGET),
                manifest_sha256=manifest_sha256(self.f.stub.store / name / "v1" / TARGET),
                providers=["CPUExecutionProvider"],
                role="head" if name.endswith(".head") else "full",
                split_point=1 if name.endswith(".head") else None,
            )
            for name in models
        ]
        wanted = placements or {}
        state = DesiredState(
            agent_id=self.f.config.agent_id,
            generation=self.f.generation,
            models=entries,
            placements=wanted,
        )
        await self.ctl.publish(
            self.f.topics.desired(self.f.config.agent_id), state.to_json(), retain=True
        )
        await until(
            lambda: (
                set(self.agent.table.names()) == set(models)
                and self.agent.offloader.placements == wanted
            )
        )

    async def local(self, texts: list[str] | None = None) -> InferenceReply:
        return await _infer(self.app, self.f, texts)

    async def from_cloud(self, texts: list[str] | None = None) -> InferenceReply:
        return await _infer(self.cloud, self.f, texts)


async def _infer(requester: Requester, f: Fleet, texts: list[str] | None) -> InferenceReply:
    reply = await requester.request(
        f.topics.agent_infer(f.config.agent_id),
        InferenceRequest(model=NAME, texts=texts or ["hello edge"]),
        InferenceReply,
        timeout=20,
    )
    return reply.message


async def until(condition: Callable[[], bool], what: str = "the agent to catch up") -> None:
    for _ in range(600):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"waited 30 s for {what}")


@contextlib.asynccontextmanager
async def pool_worker(f: Fleet, tmp: Path) -> AsyncIterator[WorkerState]:
    """One worker of pool ``gpu`` serving the full model and the tail from the stub's store."""
    f.tiny.key.verify_key.save(tmp / "trusted.pub")
    settings = load_cloud_settings(
        broker_url=f.cloud.url,
        fleet=f.topics.fleet,
        mqtt=f.settings.mqtt.model_dump(),
        controller={"data_dir": tmp},
        worker={
            "models": [NAME, TAIL],
            "pool": POOL,
            "target": TARGET,
            "artifact_store": str(f.stub.store),
            "trusted_keys": [str(tmp / "trusted.pub")],
        },
    )
    stop = asyncio.Event()
    state = WorkerState(worker_id="", pool=POOL)
    task = asyncio.create_task(run_worker(settings, stop=stop, state=state))
    try:
        ready = asyncio.create_task(state.ready.wait())
        await asyncio.wait([ready, task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        assert state.ready.is_set()
        yield state
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)


@contextlib.asynccontextmanager
async def harness(
    f: Fleet, world: SplitWorld, tmp: Path, **offload: object
) -> AsyncIterator[Harness]:
    config = AgentConfig.load(f.config.state_dir)
    config.offload = OffloadConfig.model_validate(offload)
    config.save()
    for name, directory in world.dirs.items():
        f.publish_artifact(directory, name, 1)
    spy = PoolSpy()
    async with (
        controller_side(f) as (ctl, cloud),
        pool_worker(f, tmp) as worker,
        running_agent(f) as agent,
    ):
        await ctl.subscribe(f.topics.worker_infer(POOL), spy.on_message)
        assert agent.local_url is not None
        app_settings = fast_settings(agent.local_url, f.topics.fleet)
        async with MqttClient.from_settings(
            app_settings, client_id=f"app-{uuid.uuid4().hex[:6]}"
        ) as app:
            yield Harness(f, agent, worker, spy, ctl, cloud, Requester(app, f.topics))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cosines: np.ndarray = (
        (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    )
    return cosines


def _embeddings(reply: InferenceReply) -> np.ndarray:
    return np.asarray([r["embedding"] for r in reply.outputs["results"]], dtype=np.float64)


# --------------------------------------------------------------------------- tests


async def test_a_cloud_placement_goes_to_the_pool_and_a_new_edge_placement_applies_live(
    edge_fleet: Fleet, split_world: SplitWorld, tmp_path: Path
) -> None:
    async with harness(edge_fleet, split_world, tmp_path) as h:
        await h.desire([NAME], {NAME: Placement(mode="cloud", pool=POOL, expected_ms=5)})
        on_cloud = await h.local()
        await h.desire([NAME], {NAME: Placement(mode="edge", expected_ms=5)})
        on_edge = [await h.local() for _ in range(3)]
        metrics = h.agent.metrics.render().decode()

    assert on_cloud.served_by == h.worker.worker_id
    assert {r.served_by for r in on_edge} == {edge_fleet.config.agent_id}
    assert h.spy.raw == [NAME]  # the one request placed on the cloud, nothing after the change
    assert 'placement_in_force{mode="edge",model="tiny-bert"} 1.0' in metrics
    assert 'offload_requests_total{target="cloud-pool"} 1.0' in metrics


async def test_a_split_placement_runs_the_head_here_and_the_tail_on_the_pool(
    edge_fleet: Fleet, split_world: SplitWorld, tmp_path: Path
) -> None:
    full = np.asarray(
        [r["embedding"] for r in split_world.full.run_texts(TEXTS, {})], dtype=np.float64
    )
    async with harness(edge_fleet, split_world, tmp_path) as h:
        await h.desire([HEAD], {NAME: Placement(mode="split", split_point=1, pool=POOL)})
        local = await h.local(TEXTS)
        from_cloud = await h.from_cloud(TEXTS)  # only the head is here: split, not offloaded

    both = f"{edge_fleet.config.agent_id}+{h.worker.worker_id}"
    assert local.served_by == from_cloud.served_by == both
    assert _cosines(_embeddings(local), full).min() > 0.99
    assert _cosines(_embeddings(from_cloud), full).min() > 0.99
    assert h.spy.seen == [(TAIL, False), (TAIL, False)]  # activations only, never the texts
    assert set(local.timings_ms) >= {"head", "tail_compute"}


async def test_raw_input_kept_on_the_device_never_reaches_the_pool_when_the_local_model_fails(
    edge_fleet: Fleet, split_world: SplitWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keep = Placement(mode="edge", keep_raw_input_on_device=True)
    async with harness(edge_fleet, split_world, tmp_path, enabled=True, pools=[POOL]) as h:
        await h.desire([NAME], {NAME: keep})

        def broken(*_args: object) -> list[list[dict[str, object]]]:
            raise RuntimeError("the accelerator fell off the bus")

        monkeypatch.setattr(h.agent.table.get(NAME), "run_text_batch", broken)
        refused = []
        for _ in range(2):  # no head: nowhere else the raw input may go
            with pytest.raises(RemoteError) as caught:
                await h.local()
            refused.append(caught.value)
        await h.desire([NAME, HEAD], {NAME: keep})  # now a head: split takes over
        answered = [await h.local() for _ in range(4)]

    assert all(e.code in ("internal", "unavailable") for e in refused), refused
    assert all(r.served_by.endswith(f"+{h.worker.worker_id}") for r in answered)
    assert h.spy.raw == []  # the pool never saw a text
    assert {model for model, _ in h.spy.seen} == {TAIL}


async def test_a_local_model_that_became_slow_loses_its_requests_to_the_pool(
    edge_fleet: Fleet, split_world: SplitWorld, tmp_path: Path
) -> None:
    agent_id = edge_fleet.config.agent_id
    async with harness(edge_fleet, split_world, tmp_path, enabled=True, pools=[POOL]) as h:
        await h.desire([NAME], {NAME: Placement(mode="edge", expected_ms=5)})
        first = await h.local()
        h.agent.batcher.slowdown = 300  # the device is now hundreds of times slower
        served = [(await h.local()).served_by for _ in range(12)]

    assert first.served_by == agent_id  # the placement is the first choice
    assert h.worker.worker_id in served[:3]  # one slow answer is enough to move
    assert served[-8:] == [h.worker.worker_id] * 8


async def test_requests_from_the_cloud_link_are_served_here_never_offloaded(
    edge_fleet: Fleet, split_world: SplitWorld, tmp_path: Path
) -> None:
    async with harness(edge_fleet, split_world, tmp_path, enabled=True, pools=[POOL]) as h:
        await h.desire([NAME], {NAME: Placement(mode="cloud", pool=POOL, expected_ms=1)})
        from_cloud = [await h.from_cloud() for _ in range(3)]
        raw_before_local = list(h.spy.raw)
        local = await h.local()

    assert {r.served_by for r in from_cloud} == {edge_fleet.config.agent_id}
    assert raw_before_local == []
    assert local.served_by == h.worker.worker_id  # local apps' requests would have gone there


async def test_a_placement_naming_a_head_not_installed_falls_back_with_a_logged_reason(
    edge_fleet: Fleet, split_world: SplitWorld, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edgefed.edge.offload")
    async with harness(edge_fleet, split_world, tmp_path) as h:
        await h.desire([NAME], {NAME: Placement(mode="split", split_point=3, pool=POOL)})
        answered = [await h.local() for _ in range(3)]
        metrics = h.agent.metrics.render().decode()

    assert {r.served_by for r in answered} == {edge_fleet.config.agent_id}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "tiny-bert.k3.head is not installed" in w and "falling back to edge" in w for w in warnings
    ), warnings
    assert 'placement_in_force{mode="edge",model="tiny-bert"} 1.0' in metrics


async def test_placements_survive_a_restart_without_the_cloud(
    edge_fleet: Fleet, split_world: SplitWorld, tmp_path: Path
) -> None:
    f = edge_fleet
    placement = Placement(mode="cloud", pool=POOL, expected_ms=5)
    async with harness(f, split_world, tmp_path) as h:
        await h.desire([NAME], {NAME: placement})
    f.cloud.kill()  # no cloud, no desired state: only what is on the device
    async with running_agent(f) as agent:
        in_force = agent.offloader.placements
        assert agent.local_url is not None
        app_settings = fast_settings(agent.local_url, f.topics.fleet)
        async with MqttClient.from_settings(app_settings, client_id="app-after") as app:
            reply = await _infer(Requester(app, f.topics), f, None)
        plan = agent.offloader.plan(NAME)

    assert in_force == {NAME: placement}
    assert plan is not None
    assert plan.first == "cloud"
    assert reply.served_by == f.config.agent_id  # the pool is out of reach: served here


async def test_the_heartbeat_carries_the_measured_link_after_a_large_download(
    edge_fleet: Fleet, split_world: SplitWorld, tmp_path: Path
) -> None:
    beats: asyncio.Queue[Heartbeat] = asyncio.Queue()

    async def on_beat(msg: Message) -> None:
        if msg.payload != b"{}":  # the round-trip probe
            await beats.put(decode(msg.payload, msg.content_type, Heartbeat).message)

    async with harness(edge_fleet, split_world, tmp_path) as h:
        await h.ctl.subscribe(edge_fleet.topics.heartbeat(edge_fleet.config.agent_id), on_beat)
        await h.desire([NAME])  # a few MB of model
        while True:
            beat = await asyncio.wait_for(beats.get(), 10)
            if beat.link is not None and beat.link.bandwidth_mbps is not None:
                break

    assert beat.link is not None
    assert beat.link.bandwidth_mbps is not None
    assert beat.link.bandwidth_mbps > 0
    assert beat.link.rtt_ms >= 0
    assert beat.link.samples >= 2  # at least one probe and the download
