"""The fleet orchestrator end to end: a private mosquitto, ``edgefed cloud serve``, one cloud
worker and two ``edgefed edge run`` agents as real processes, each agent behind link proxies of
its own, a tiny model signed by the controller and deployed through its API.

What a user relies on: the fleet comes up serving (through the agents and the pool); the
agents' traffic, artifact downloads included, crosses their shaped links; an agent killed is
seen offline and serves again after a restart; a cut link stops an agent's traffic and a
restored one brings it back; every fault is recorded; nothing is left running afterwards.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from edgefed.common.errors import EdgefedError
from edgefed.common.schemas import AgentState, InferenceReply, InferenceRequest
from edgefed.simulation.fleet import Fleet
from edgefed.simulation.fleet_spec import AgentSpec, FleetSpec, ModelSpec, PoolSpec
from edgefed.simulation.linkproxy import LinkProfile

pytestmark = [pytest.mark.timeout(240), pytest.mark.asyncio(loop_scope="module")]

MODEL = "tiny"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def eventually(check: object, what: str, timeout_s: float = 60) -> None:
    """Poll ``check()`` until true (a wait for a state, not an assertion on time)."""
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.1)


async def answers(fleet: Fleet, name: str, timeout_s: float = 60) -> InferenceReply:
    """The first successful reply of agent ``name`` (retrying while it reconnects)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await fleet.infer(name, ["hello fleet"], model=MODEL, timeout_s=2)
        except EdgefedError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tiny_model_dir: Path) -> AsyncIterator[Fleet]:
    spec = FleetSpec(
        agents=[
            AgentSpec(name="near", device="raspberry-pi-5", site="lab"),
            AgentSpec(name="far", site="remote"),
        ],
        links={"remote": LinkProfile(delay_ms=5, bandwidth_mbps=200)},
        pools=[PoolSpec(name="default", workers=1)],
        models=[ModelSpec(name=MODEL, source=tiny_model_dir)],
        seed=7,
    )
    async with Fleet(spec) as running:
        yield running


async def test_the_fleet_comes_up_serving_through_agents_and_the_pool(fleet: Fleet) -> None:
    for name in ("near", "far"):
        reply = await fleet.infer(name, ["hello fleet"], model=MODEL)
        assert reply.version == 1
        assert reply.served_by == fleet.agent(name).agent_id
    assert fleet._requester is not None
    pool = await fleet._requester.request(
        fleet.topics.worker_infer("default"),
        InferenceRequest(model=MODEL, texts=["hello pool"]),
        InferenceReply,
        timeout=10,
    )
    assert pool.message.version == 1
    assert [e.kind for e in fleet.events][-1] == "fleet.ready"


async def test_agents_traffic_and_artifact_downloads_cross_their_own_links(
    fleet: Fleet, tiny_model_dir: Path
) -> None:
    model_bytes = (tiny_model_dir / "model.onnx").stat().st_size
    ports = set()
    for agent in fleet.agents.values():
        assert agent.controller_link.stats.bytes_down > model_bytes  # the artifact came this way
        assert agent.broker_link.stats.connections >= 1
        assert agent.config.broker_url == f"mqtt://127.0.0.1:{agent.broker_link.port}"
        ports |= {agent.broker_link.port, agent.controller_link.port}
    assert len(ports) == 4  # one proxy per agent per destination
    assert fleet.agent("far").broker_link.profile.delay_ms == 5
    assert fleet.agent("near").config.emulated_speed_factor == 2.0  # raspberry-pi-5


async def test_a_killed_agent_goes_offline_and_serves_again_after_a_restart(
    fleet: Fleet,
) -> None:
    agent = fleet.agent("near")
    await fleet.kill_agent("near")
    await eventually(
        lambda: fleet.statuses.get(agent.agent_id) == AgentState.OFFLINE, "last will seen"
    )
    with pytest.raises(EdgefedError):
        await fleet.infer("near", ["anyone?"], model=MODEL, timeout_s=1)
    assert (await fleet.infer("far", ["still here"], model=MODEL)).version == 1

    await fleet.restart_agent("near")
    reply = await answers(fleet, "near")
    assert reply.version == 1  # restored from its disk, no new download needed
    kinds = [e.kind for e in fleet.events if e.target == "near"]
    assert kinds[-2:] == ["agent.kill", "agent.restart"]


async def test_a_cut_link_stops_an_agents_traffic_until_restored(fleet: Fleet) -> None:
    agent = fleet.agent("far")
    await answers(fleet, "far")
    fleet.cut_link("remote")  # the site: every agent there
    assert all(link.cut_active for link in agent.links)
    with pytest.raises(EdgefedError):
        await fleet.infer("far", ["through a dead link?"], model=MODEL, timeout_s=1)
    await eventually(
        lambda: fleet.statuses.get(agent.agent_id) == AgentState.OFFLINE, "last will on cut"
    )
    fleet.restore_link("remote")
    assert (await answers(fleet, "far")).version == 1
    cut, restore = [e for e in fleet.events if e.kind.startswith("link.")][-2:]
    assert (cut.kind, restore.kind) == ("link.cut", "link.restore")
    assert cut.detail == "far"
    assert cut.t <= restore.t


async def test_faults_name_agents_the_fleet_has(fleet: Fleet) -> None:
    with pytest.raises(EdgefedError, match=r"no agent 'ghost'.*near, far"):
        await fleet.kill_agent("ghost")
    with pytest.raises(ValueError, match="emulated_speed_factor"):
        await fleet.slow_agent("far", 0)


async def test_the_fleet_stops_every_process_and_removes_its_state() -> None:
    spec = FleetSpec(agents=[AgentSpec(name="one")])
    async with Fleet(spec) as small:
        pids = small.pids()
        root = small.root
        assert len(pids) == 4  # broker, controller, agent, watchdog
        assert all(not gone(pid) for pid in pids)
    await eventually(lambda: all(gone(pid) for pid in pids), "every process stopped", 15)
    assert not root.exists()
