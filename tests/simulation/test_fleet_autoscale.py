"""A fleet whose pool has ``autoscale``: the harness runs the controller's autoscaler on its own
loop (a pool monitor on the fleet's broker, the real reactive autoscaler) and resizes the pool's
``edgefed cloud worker`` processes. Real processes: broker, controller, workers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import pytest

from edgefed.cloud.orchestration.signals import AutoscalerSettings
from edgefed.common.mqtt import MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import InferenceReply, InferenceRequest
from edgefed.simulation.fleet import Fleet
from edgefed.simulation.fleet_spec import FleetSpec, ModelSpec, PoolSpec

pytestmark = pytest.mark.timeout(180)
MODEL = "tiny"


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s:g} s")
        await asyncio.sleep(0.2)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_an_autoscaled_pool_is_brought_to_its_minimum_by_the_harness(
    tiny_model_dir: Path,
) -> None:
    autoscale = AutoscalerSettings(min_replicas=2, max_replicas=3, interval_s=0.5)
    spec = FleetSpec(
        pools=[PoolSpec(name="default", workers=1, autoscale=autoscale)],
        models=[ModelSpec(name=MODEL, source=tiny_model_dir, deploy=False)],
    )
    async with Fleet(spec) as fleet:
        scaler = fleet.worker_processes

        async def two_ready() -> bool:
            return await scaler.ready("default") == 2

        await until(two_ready, "the pool at its minimum of 2 ready workers")
        async with MqttClient.from_settings(
            fleet.settings, client_id=f"t-{uuid.uuid4().hex[:6]}"
        ) as client:
            reply = await Requester(client, fleet.topics).request(
                fleet.topics.worker_infer("default"),
                InferenceRequest(model=MODEL, texts=["scaled"]),
                InferenceReply,
                timeout=20,
            )
        assert fleet.autoscaler is not None
        decisions = list(fleet.autoscaler.pools["default"].decisions)
        events = [(e.kind, e.target, e.detail) for e in fleet.events]
        pids = [c.pid for c in fleet.workers["default"] if c.pid is not None]
    assert reply.message.version == 1
    assert decisions[0].replicas == 2
    assert ("pool.scale", "default", "1 -> 2 workers") in events
    assert len(pids) == 2
    assert all(gone(pid) for pid in pids)
