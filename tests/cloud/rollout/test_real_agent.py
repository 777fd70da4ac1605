"""Rollouts to the REAL edge agent (edgefed.edge.agent: join, download over HTTP, verify the
controller's signature, load in ONNX Runtime, report), next to a simulated one: a canary that
passes, and a canary whose version fails to load and is rolled forward to the old content."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from edgefed.cloud.registry.models import DeploymentStatus
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.schemas import Telemetry, decode
from edgefed.common.topics import Topics
from edgefed.edge.agent import Agent
from edgefed.edge.config import AgentConfig
from edgefed.edge.join import join
from tests.conftest import fast_settings
from tests.edge.controller_stub import ControllerStub
from tests.edge.controller_stub import running_controller as serving_artifacts

from .conftest import (
    MODEL,
    TARGET,
    Cloud,
    api_client,
    desired_spy,
    running_controller,
    sim_agents,
)
from .conftest import wait_status as wait

pytestmark = pytest.mark.integration
S = DeploymentStatus


@contextlib.asynccontextmanager
async def real_agent(config: AgentConfig, cloud: Cloud) -> AsyncIterator[Agent]:
    agent = Agent(
        AgentConfig.load(config.state_dir),
        fast_settings(cloud.settings.broker_url or "", cloud.settings.fleet),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    await asyncio.wait_for(agent.ready.wait(), 60)
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_canaries_on_the_real_agent_pass_and_a_version_that_cannot_load_is_rolled_back(
    cloud: Cloud, tiny_artifacts: Any, tmp_path: Path
) -> None:
    src = tiny_artifacts.embed.dir
    cloud.add_model()
    cloud.publish_version(1, src=src)
    cloud.publish_version(2, src=src)
    cloud.publish_version(3, src=src, corrupt=True)
    stub = ControllerStub(
        store=cloud.store,
        fleet=cloud.settings.fleet,
        broker_url=cloud.settings.broker_url or "",
        signing_keys=[cloud.state.signing_key.verify_key.to_base64()],
        join_tokens={"join-me"},
    )
    lifecycle: list[tuple[int, str]] = []

    async def on_telemetry(message: Message) -> None:
        for record in decode(message.payload, message.content_type, Telemetry).message.records:
            if record.name == "model.lifecycle":
                lifecycle.append((int(record.fields["version"] or 0), str(record.fields["step"])))

    with serving_artifacts(stub):
        config = join(stub.url, "join-me", tmp_path / "agent", labels={"site": "a"})
        config = config.model_copy(
            update={
                "heartbeat_s": 0.3,
                "telemetry_s": 0.2,
                "metrics_port": 0,
                "local_endpoint": config.local_endpoint.model_copy(update={"port": 0}),
            }
        )
        config.save()
        real_id = config.agent_id
        cloud.enrol(real_id, site="a")  # the stub enrolled it; the registry must know it too
        async with (
            running_controller(cloud, public_url=stub.url) as ctl,
            api_client(cloud, ctl) as api,
            MqttClient.from_settings(cloud.settings, client_id="lifecycle-watch") as watch,
            sim_agents(cloud, "b1", site="a") as sims,
            desired_spy(cloud) as spy,
            real_agent(config, cloud) as agent,
        ):
            await watch.subscribe(Topics(cloud.settings.fleet).telemetry(real_id), on_telemetry)

            async def deploy(version: int, *until: S, **strategy: Any) -> Any:
                r = await api.post(
                    "/api/v1/deployments",
                    json={
                        "model": MODEL,
                        "version": version,
                        "target": TARGET,
                        "selector": {"labels": {"site": "a"}},
                        "strategy": strategy,
                    },
                )
                assert r.status_code == 201, r.text
                return await wait(cloud, r.json()["id"], *until, timeout=60)

            first = await deploy(1, S.COMPLETED, soak_s=0)
            good = await deploy(2, S.COMPLETED, kind="canary", canary_count=1, soak_s=1)
            bad = await deploy(
                3, S.ROLLED_BACK, S.COMPLETED, kind="canary", canary_count=1, soak_s=30
            )
            assert bad.status == S.ROLLED_BACK, bad.reason
            await wait_until(lambda: (4, "loaded") in lifecycle)
            served = {m.name: m.version for m in agent.table.loaded()}

    assert first.status == S.COMPLETED
    assert [da.agent_id for da in good.agents if da.canary] == [real_id]  # online first, by id
    assert (2, "loaded") in lifecycle
    assert [da.agent_id for da in bad.agents if da.canary] == [real_id]
    assert (3, "failed") in lifecycle or (3, "rejected") in lifecycle
    assert bad.reason.startswith("load gate:")
    assert bad.rollback_version == 4
    assert cloud.versions()[4].parent_version == 2
    assert spy.versions(real_id) == [1, 2, 3, 4]
    assert spy.versions("b1") == [1, 2]  # the non-canary agent never got v3
    assert sims["b1"].loaded == {MODEL: 2}
    assert served == {MODEL: 4}  # the real agent serves the rollback version (v2's content)


async def wait_until(check: Any, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "not reached"
        await asyncio.sleep(0.05)
