"""The agent's /readyz and /livez as the kubelet sees them: a real agent against a real mosquitto,
the controller stand-in and real ONNX Runtime on a tiny exported model."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from edgefed.common.broker import PrivateBroker
from edgefed.common.schemas import DesiredModel, DesiredState
from edgefed.common.topics import Topics
from edgefed.edge.agent import Agent
from edgefed.edge.config import AgentConfig
from edgefed.edge.join import join
from tests.conftest import fast_settings

from .controller_stub import ControllerStub, running_controller
from .random_artifacts import manifest_sha256
from .test_agent import TARGET, Fleet, controller_side, publish_desired
from .tiny_artifacts import TinyArtifacts

pytestmark = pytest.mark.integration


@pytest.fixture
def probed_fleet(tmp_path: Path, tiny_artifacts: TinyArtifacts, fleet: str) -> Iterator[Fleet]:
    """A cloud broker, the controller stand-in and a joined agent with its HTTP port on."""
    cloud = PrivateBroker(data_dir=tmp_path / "cloud", persistence=True)
    cloud.start()
    stub = ControllerStub(
        store=tmp_path / "store",
        fleet=fleet,
        broker_url=cloud.url,
        signing_keys=[tiny_artifacts.key.verify_key.to_base64()],
        join_tokens={"join-me"},
    )
    with running_controller(stub):
        config = join(stub.url, "join-me", tmp_path / "state")
        config = config.model_copy(
            update={
                "metrics_port": 0,
                "local_endpoint": config.local_endpoint.model_copy(update={"enabled": False}),
            }
        )
        config.save()
        settings = fast_settings(cloud.url, fleet)
        yield Fleet(
            cloud, stub, config, settings, Topics(fleet), tiny_artifacts.key, tiny_artifacts
        )
    cloud.close()


async def probe(client: httpx.AsyncClient, path: str) -> tuple[int, dict[str, Any]]:
    response = await client.get(path)
    return response.status_code, json.loads(response.content)


async def until_readyz(
    client: httpx.AsyncClient, wanted_status: int, reason: str | None = None
) -> dict[str, Any]:
    """Poll /readyz until it answers ``wanted_status`` (and names ``reason``); 30 s at most."""
    deadline = time.monotonic() + 30
    status, body = await probe(client, "/readyz")
    while status != wanted_status or (reason is not None and reason not in body["reasons"]):
        if time.monotonic() > deadline:
            raise AssertionError(f"/readyz stayed {status} {body}, wanted {wanted_status} {reason}")
        await asyncio.sleep(0.1)
        status, body = await probe(client, "/readyz")
    return body


def desired_embed(f: Fleet, version: int) -> DesiredState:
    """Generation ``version`` asking for tiny-embed v``version`` (published in the store or not)."""
    model = DesiredModel(
        name="tiny-embed",
        version=version,
        artifact_url=f.stub.artifact_url("tiny-embed", version, TARGET),
        manifest_sha256=manifest_sha256(f.tiny.embed.dir),
        providers=["CPUExecutionProvider"],
    )
    return DesiredState(agent_id=f.config.agent_id, generation=version, models=[model])


async def test_readyz_follows_the_desired_models_and_the_broker_while_livez_stays_up(
    probed_fleet: Fleet,
) -> None:
    f = probed_fleet
    f.publish_artifact(f.tiny.embed.dir, "tiny-embed", 1)
    agent = Agent(AgentConfig.load(f.config.state_dir), f.settings)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        async with controller_side(f) as (ctl, _requester):
            await asyncio.wait_for(agent.ready.wait(), 60)
            assert agent.metrics_port is not None
            base = f"http://127.0.0.1:{agent.metrics_port}"
            async with httpx.AsyncClient(base_url=base, timeout=5) as client:
                # No desired state yet: ready once connected and subscribed.
                assert (await until_readyz(client, 200))["status"] == "ready"

                # v1 is in the store: not ready until it is loaded and warmed, then ready.
                await publish_desired(ctl, f, desired_embed(f, 1))
                await f.wait_for("loaded", 1)
                await until_readyz(client, 200)

                # v2 is not in the store: v1 keeps serving, the agent is not ready for v2.
                await publish_desired(ctl, f, desired_embed(f, 2))
                body = await until_readyz(client, 503, "model tiny-embed: v2 desired, v1 serving")
                assert body["status"] == "unavailable"
                assert agent.table.loaded()[0].version == 1

                # The broker goes away: not ready, still alive, metrics still served.
                f.cloud.close()
                await until_readyz(client, 503, "not connected to the cloud broker")
                assert await probe(client, "/livez") == (200, {"status": "alive", "reasons": []})
                metrics = await client.get("/metrics")
                assert metrics.status_code == 200
                assert 'edgefed_agent_model_version{model="tiny-embed"} 1.0' in metrics.text
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
