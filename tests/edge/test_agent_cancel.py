"""An edge agent stops when its task is cancelled, whatever it is doing, as the simulation
harness runs agents (``Agent.run`` as tasks on one event loop) and cancels them at exit: while
starting, restoring a model, downloading one, with its cloud broker unreachable, reconnecting,
on a link that delivers nothing, while serving requests, and when cancelled twice. Real
mosquitto, real ONNX Runtime on a tiny model, a real HTTP artifact server; links shaped by the
simulation's TCP proxy. The bound is a liveness check (a hang fails it), not a timing claim."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import threading
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefed.common.artifact import Manifest
from edgefed.common.broker import PrivateBroker, free_port
from edgefed.common.errors import EdgefedError
from edgefed.common.mqtt import MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import DesiredModel, DesiredState, InferenceReply, InferenceRequest
from edgefed.common.serving.runtime import OnnxModel
from edgefed.common.settings import Settings
from edgefed.common.topics import Topics
from edgefed.edge.agent import Agent
from edgefed.edge.config import AgentConfig, LocalEndpoint
from edgefed.simulation.linkproxy import LinkProfile, LinkProxy
from tests.conftest import fast_settings
from tests.loop_complaints import loop_complaints

from .controller_stub import ControllerStub, running_controller
from .random_artifacts import manifest_sha256
from .tiny_artifacts import TinyArtifacts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

STOP_BOUND_S = 10.0
"""Liveness bound after cancel (a stopping agent waits at most a few seconds for its links)."""
TARGET = "x86-avx2"
MODEL = "tiny-embed"
NOTHING_GETS_THROUGH = LinkProfile(delay_ms=60_000)


class ObservedAgent(Agent):
    """The real agent; its model loads (in a worker thread) wait for the test when asked to,
    so that a cancellation lands while one is in progress."""

    def __init__(self, config: AgentConfig, settings: Settings) -> None:
        super().__init__(config, settings)
        self.loading = threading.Event()
        self.hold_loads = False
        self.release_loads = threading.Event()

    def _loader(self, directory: Path, manifest: Manifest, desired: DesiredModel) -> OnnxModel:
        self.loading.set()
        if self.hold_loads:
            self.release_loads.wait(30)
        return super()._loader(directory, manifest, desired)


@dataclass
class Cloud:
    """A cloud broker reached through a shaped link, and an artifact server reached through
    another (both links can be cut or slowed like a device's uplink)."""

    broker: PrivateBroker
    broker_link: LinkProxy
    http_link: LinkProxy
    stub: ControllerStub
    tiny: TinyArtifacts
    topics: Topics
    tmp: Path

    @property
    def broker_url(self) -> str:
        return f"mqtt://127.0.0.1:{self.broker_link.port}"

    def config(self, name: str, broker_url: str | None = None) -> AgentConfig:
        return AgentConfig(
            agent_id=name,
            fleet=self.topics.fleet,
            controller_url=self.stub.url,
            broker_url=broker_url or self.broker_url,
            agent_token=self.stub.agent_token,
            trusted_keys=[self.tiny.key.verify_key.to_base64()],
            state_dir=self.tmp / name,
            providers=["CPUExecutionProvider"],
            local_endpoint=LocalEndpoint(enabled=False),
            heartbeat_s=0.2,
            telemetry_s=0.2,
            metrics_port=None,
        )

    def settings(self, config: AgentConfig) -> Settings:
        return fast_settings(config.broker_url, self.topics.fleet)

    def desired(self, agent_id: str, generation: int = 1) -> DesiredState:
        directory = self.stub.store / MODEL / "v1" / TARGET
        model = DesiredModel(
            name=MODEL,
            version=1,
            artifact_url=f"http://127.0.0.1:{self.http_link.port}/api/v1/artifacts/"
            f"{MODEL}/v1/{TARGET}",
            manifest_sha256=manifest_sha256(directory),
            providers=["CPUExecutionProvider"],
        )
        return DesiredState(agent_id=agent_id, generation=generation, models=[model])

    async def send_desired(self, agent_id: str) -> None:
        settings = fast_settings(self.broker.url, self.topics.fleet)
        async with MqttClient.from_settings(settings, client_id=f"ctl-{agent_id}") as ctl:
            await ctl.publish(
                self.topics.desired(agent_id), self.desired(agent_id).to_json(), retain=True
            )


@pytest.fixture
async def cloud(
    broker: PrivateBroker, tiny_artifacts: TinyArtifacts, topics: Topics, tmp_path: Path
) -> AsyncIterator[Cloud]:
    stub = ControllerStub(
        store=tmp_path / "store",
        fleet=topics.fleet,
        broker_url=broker.url,
        signing_keys=[tiny_artifacts.key.verify_key.to_base64()],
    )
    shutil.copytree(tiny_artifacts.embed.dir, stub.store / MODEL / "v1" / TARGET)
    with running_controller(stub):
        host, port = stub.url.removeprefix("http://").split(":")
        async with (
            LinkProxy(broker.host, broker.port) as broker_link,
            LinkProxy(host, int(port)) as http_link,
        ):
            yield Cloud(broker, broker_link, http_link, stub, tiny_artifacts, topics, tmp_path)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while not condition():  # noqa: ASYNC110 - agent state has no events to await
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"the test never reached its moment: {what}") from None


async def cancel_and_wait(task: asyncio.Task[None], *, twice: bool = False) -> None:
    """Cancel ``task`` (twice: again while it cleans up) and require it to end, cancelled."""
    task.cancel()
    if twice:
        await asyncio.sleep(0.05)
        task.cancel()
    done, _ = await asyncio.wait([task], timeout=STOP_BOUND_S)
    assert task in done, f"the agent did not stop within {STOP_BOUND_S} s of its cancellation"
    assert task.cancelled(), f"the agent ended otherwise: {task.exception()!r}"


async def serve_model(cloud: Cloud, name: str) -> tuple[ObservedAgent, asyncio.Task[None]]:
    """An agent that fetched, loaded and serves the tiny model."""
    config = cloud.config(name)
    agent = ObservedAgent(config, cloud.settings(config))
    task = asyncio.create_task(agent.run(asyncio.Event()), name=f"agent-{name}")
    await cloud.send_desired(name)
    await until(lambda: MODEL in agent.table.names(), "model loaded")
    return agent, task


Moment = Callable[[Cloud, AsyncExitStack], Awaitable[asyncio.Task[None]]]
"""Brings an agent to a moment of its life; returns its task (cleanups go on the stack)."""

# ------------------------------------------------------------------ the moments


async def while_starting(cloud: Cloud, _stack: AsyncExitStack) -> asyncio.Task[None]:
    config = cloud.config("starting")
    agent = Agent(config, cloud.settings(config))
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(0)  # it has begun: opened its HTTP client, not yet restored
    return task


async def while_restoring(cloud: Cloud, stack: AsyncExitStack) -> asyncio.Task[None]:
    first, task = await serve_model(cloud, "restoring")
    await cancel_and_wait(task)
    agent = ObservedAgent(first.config, first.settings)  # restart on the same device
    agent.hold_loads = True
    task = asyncio.create_task(agent.run())
    await until(agent.loading.is_set, "model restore in progress")
    task.add_done_callback(lambda _: agent.release_loads.set())
    stack.callback(agent.release_loads.set)
    return task


async def while_downloading(cloud: Cloud, _stack: AsyncExitStack) -> asyncio.Task[None]:
    cloud.http_link.profile = LinkProfile(bandwidth_mbps=0.05)
    config = cloud.config("downloading")
    agent = Agent(config, cloud.settings(config))
    task = asyncio.create_task(agent.run())
    await cloud.send_desired(config.agent_id)
    await until(
        lambda: any(p.endswith("/model.onnx") for _, p, _ in cloud.stub.requests),
        "model download started",
    )
    await asyncio.sleep(0.2)
    return task


async def while_the_broker_is_unreachable(
    cloud: Cloud, stack: AsyncExitStack
) -> asyncio.Task[None]:
    config = cloud.config("no-broker", broker_url=f"mqtt://127.0.0.1:{free_port()}")
    agent = Agent(config, cloud.settings(config))
    task = asyncio.create_task(agent.run())
    await agent.ready.wait()
    await asyncio.sleep(0.5)  # a few connection attempts
    return task


async def while_reconnecting(cloud: Cloud, _stack: AsyncExitStack) -> asyncio.Task[None]:
    config = cloud.config("reconnecting")
    agent = Agent(config, cloud.settings(config))
    task = asyncio.create_task(agent.run())
    await until(lambda: agent.cloud is not None and agent.cloud.connected, "connected")
    cloud.broker_link.cut()
    await until(lambda: agent.cloud is not None and not agent.cloud.connected, "link lost")
    await asyncio.sleep(0.3)  # in the reconnect backoff
    return task


async def while_the_link_delivers_nothing(
    cloud: Cloud, stack: AsyncExitStack
) -> asyncio.Task[None]:
    config = cloud.config("blackholed")
    agent = Agent(config, cloud.settings(config))
    task = asyncio.create_task(agent.run())
    await until(lambda: agent.cloud is not None and agent.cloud.connected, "connected")
    cloud.broker_link.profile = NOTHING_GETS_THROUGH  # still connected; nothing acknowledged
    await asyncio.sleep(0.5)  # heartbeats and telemetry wait for their PUBACKs
    return task


async def while_serving(cloud: Cloud, stack: AsyncExitStack) -> asyncio.Task[None]:
    agent, task = await serve_model(cloud, "serving")
    agent.batcher.slowdown = 20.0  # a slow device: requests queue up
    settings = fast_settings(cloud.broker.url, cloud.topics.fleet)
    app = await stack.enter_async_context(
        MqttClient.from_settings(settings, client_id="app-serving")
    )
    requester = Requester(app, cloud.topics)

    async def ask(i: int) -> None:
        with contextlib.suppress(EdgefedError):
            await requester.request(
                cloud.topics.agent_infer("serving"),
                InferenceRequest(model=MODEL, texts=[f"text {i}"]),
                InferenceReply,
                timeout=5,
            )

    asking = [asyncio.create_task(ask(i)) for i in range(20)]

    async def stop_asking() -> None:
        for t in asking:
            t.cancel()
        await asyncio.gather(*asking, return_exceptions=True)

    stack.push_async_callback(stop_asking)
    await until(lambda: sum(agent.batcher.queue_depth().values()) > 0, "requests queued")
    return task


MOMENTS: dict[str, Moment] = {
    "starting": while_starting,
    "restoring a model": while_restoring,
    "downloading a model": while_downloading,
    "broker unreachable": while_the_broker_is_unreachable,
    "reconnect backoff": while_reconnecting,
    "link delivers nothing": while_the_link_delivers_nothing,
    "serving requests": while_serving,
}


@pytest.mark.parametrize("twice", [False, True], ids=["cancelled", "cancelled-twice"])
@pytest.mark.parametrize("moment", list(MOMENTS))
async def test_an_agent_cancelled_at_any_moment_stops_and_leaves_nothing_behind(
    cloud: Cloud, moment: str, twice: bool
) -> None:
    with loop_complaints() as complaints:
        async with AsyncExitStack() as stack:
            task = await MOMENTS[moment](cloud, stack)
            await cancel_and_wait(task, twice=twice)
            del task
    assert [f"{c.get('message')}: {c.get('exception')!r}" for c in complaints] == []


async def test_a_fleet_of_agents_cancelled_together_all_stop(cloud: Cloud) -> None:
    """As the harness exits: several agents on one loop, some serving, one on a cut link, one
    without a broker, cancelled in the same instant."""
    tasks = [(await serve_model(cloud, f"fleet-{i}"))[1] for i in range(3)]
    async with AsyncExitStack() as stack:
        tasks.append(await while_the_broker_is_unreachable(cloud, stack))
    with loop_complaints() as complaints:
        for task in tasks:
            task.cancel()
        done, _ = await asyncio.wait(tasks, timeout=STOP_BOUND_S)
        assert len(done) == len(tasks), f"{len(tasks) - len(done)} agents did not stop"
        assert all(t.cancelled() for t in tasks)
        del done, tasks
    assert [f"{c.get('message')}: {c.get('exception')!r}" for c in complaints] == []


_BARE_AGENT = """
import asyncio, sys, tempfile
from pathlib import Path
from edgefed.common.artifact import generate_signing_key
from edgefed.common.settings import load_settings
from edgefed.edge.agent import Agent
from edgefed.edge.config import AgentConfig, LocalEndpoint

async def main(url: str, how: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = AgentConfig(
            agent_id="agent-1", fleet="t", controller_url="http://127.0.0.1:9", broker_url=url,
            trusted_keys=[generate_signing_key().verify_key.to_base64()], state_dir=Path(tmp),
            metrics_port=None, local_endpoint=LocalEndpoint(enabled=False),
            heartbeat_s=0.2, telemetry_s=0.2,
        )
        agent = Agent(config, load_settings(broker_url=url, fleet="t"))
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await agent.ready.wait()
        await asyncio.sleep(1.0)
        stop.set() if how == "stop" else task.cancel()
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), 10)
    print("stopped")

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("how", ["stop", "cancel"])
async def test_a_bare_agent_without_its_broker_stops_without_complaints(how: str) -> None:
    """A user starts an agent whose cloud broker is down and stops it (SIGTERM's path, or the
    cancellation of its task): it stops, and prints no "Future exception was never retrieved"
    (the process of its own is what shows it: the message comes when the future is collected)."""
    url = f"mqtt://127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _BARE_AGENT, url, how, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "stopped"
    assert "never retrieved" not in err.decode(), err.decode()
