"""The autoscaling loop resizing a worker Deployment through the Kubernetes adapter. No real API
server can run here, so the API server is emulated (kmock's KubernetesEmulator over real HTTP on
loopback, see ``kube_emulator.py``). The pool monitor is the real one, fed load reports by hand.
A Deployment that does not exist yet is an error the loop logs and retries until an operator
creates it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from edgefed.cloud.orchestration.kube import KubernetesWorkerScaler
from edgefed.cloud.orchestration.pool_monitor import PoolMonitor
from edgefed.cloud.orchestration.service import AutoscaleService
from edgefed.cloud.orchestration.signals import AutoscalerSettings
from edgefed.common.mqtt import MqttClient
from edgefed.common.schemas import WorkerLoad
from edgefed.common.settings import load_settings
from edgefed.common.topics import Topics

from .kube_emulator import DEPLOYMENTS, Cluster, deployment_manifest, running_cluster

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for c in running_cluster(tmp_path):
        yield c


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s:g} s")
        await asyncio.sleep(0.05)


def swamped_monitor() -> PoolMonitor:
    client = MqttClient.from_settings(
        load_settings(broker_url="mqtt://127.0.0.1:1", fleet="f"), client_id="unused"
    )
    monitor = PoolMonitor(client, Topics("f"))
    monitor.add(
        WorkerLoad(
            worker_id="w1",
            pool="gpu",
            seq=0,
            interval_s=60.0,
            arrivals=1200,
            completed=600,
            queue_depth=12,
            p95_ms=400.0,
            cpu_cores=1.0,
            rss_bytes=200_000_000,
            ready=True,
        )
    )
    return monitor


async def test_the_loop_patches_the_pools_deployment_once_it_exists(cluster: Cluster) -> None:
    settings = AutoscalerSettings(
        min_replicas=1, max_replicas=6, interval_s=0.1, target_queue_per_replica=4.0
    )
    async with cluster.adapter() as kube:
        service = AutoscaleService(
            {"gpu": settings}, swamped_monitor(), KubernetesWorkerScaler(kube)
        )
        loop = asyncio.create_task(service.run())
        try:
            await until(lambda: service.pools["gpu"].last_error is not None, "a failed interval")
            missing = service.pools["gpu"].last_error
            cluster.put(
                DEPLOYMENTS, "edgefed", deployment_manifest("edgefed-worker-gpu", replicas=1)
            )
            await until(
                lambda: cluster.deployment("edgefed-worker-gpu")["spec"]["replicas"] > 1,
                "the Deployment scaled up",
            )
            await until(lambda: service.pools["gpu"].last_error is None, "the error cleared")
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
    assert missing is not None
    assert "edgefed-worker-gpu" in missing
    replicas = cluster.deployment("edgefed-worker-gpu")["spec"]["replicas"]
    assert replicas == 3  # queue 12 at 1 worker vs 4 per worker; p95 400 ms vs 200 ms: max(3, 2)
    assert service.pools["gpu"].current == 3
