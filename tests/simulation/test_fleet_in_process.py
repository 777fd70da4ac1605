"""In-process mode, for large fleets: agents are ``Agent`` objects on the harness's event loop,
each with its own MQTT connection through its own link proxy; they serve, a killed one is seen
offline (its links reset, so the broker fires the last will), and a slowed one changes at once."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from edgefed.common.errors import EdgefedError
from edgefed.common.schemas import AgentState
from edgefed.simulation.fleet import Fleet
from edgefed.simulation.fleet_spec import AgentSpec, FleetSpec, ModelSpec

pytestmark = pytest.mark.timeout(180)


async def test_in_process_agents_serve_die_restart_and_slow_down(tiny_model_dir: Path) -> None:
    spec = FleetSpec(
        mode="in-process",
        agents=[AgentSpec(name=f"a{i}", site=f"site{i % 2}") for i in range(4)],
        models=[ModelSpec(name="tiny", source=tiny_model_dir)],
    )
    async with Fleet(spec) as fleet:
        assert len(fleet.pids()) == 3  # broker, controller, watchdog: agents are not processes
        for name in fleet.agents:
            reply = await fleet.infer(name, ["hello"], model="tiny")
            assert reply.served_by == fleet.agent(name).agent_id
        ports = {link.port for a in fleet.agents.values() for link in a.links}
        assert len(ports) == 8

        victim = fleet.agent("a1")
        await fleet.kill_agent("a1")
        deadline = time.monotonic() + 30
        while fleet.statuses.get(victim.agent_id) != AgentState.OFFLINE:
            assert time.monotonic() < deadline, "the last will never came"
            await asyncio.sleep(0.1)
        with pytest.raises(EdgefedError):
            await fleet.infer("a1", ["anyone?"], model="tiny", timeout_s=1)
        await fleet.restart_agent("a1")
        assert (await fleet.infer("a1", ["back"], model="tiny")).version == 1

        await fleet.slow_agent("a2", 3.0)
        agent = fleet.agent("a2").agent
        assert agent is not None
        assert agent.batcher.slowdown == 3.0
        assert fleet.agent("a2").config.emulated_speed_factor == 3.0
    assert all(a.task is not None and a.task.done() for a in fleet.agents.values())
