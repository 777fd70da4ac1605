"""The autoscaling loop end to end: real workers' load reports over a real mosquitto, the real
pool monitor and reactive autoscaler, and a scaler that starts and stops in-process workers
(``run_worker`` tasks, as the harness starts processes and Kubernetes pods): a burst scales the
pool up, quiet brings it back down. And the loop survives a scaler that fails."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefed.cloud.orchestration.pool_monitor import PoolMonitor
from edgefed.cloud.orchestration.scaler import WorkerScaler
from edgefed.cloud.orchestration.service import AutoscaleService
from edgefed.cloud.orchestration.signals import AutoscalerSettings
from edgefed.cloud.settings import CloudSettings
from edgefed.cloud.worker.pool import WorkerState, run_worker
from edgefed.common.artifact import SigningKey
from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import EdgefedError, PermanentError, TemporaryError
from edgefed.common.mqtt import MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import InferenceReply, InferenceRequest, WorkerLoad
from edgefed.common.settings import load_settings
from edgefed.common.topics import Topics
from tests.cloud.worker.test_worker_pool import MODEL, store, worker_settings

__all__ = ["store"]  # the module-scoped fixture of the worker tests: tiny signed artifacts

pytestmark = pytest.mark.timeout(120)
POOL = "gpu-a"


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s:g} s")
        await asyncio.sleep(0.05)


class InProcessScaler:
    """A WorkerScaler whose workers are ``run_worker`` tasks on this loop."""

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.workers: list[tuple[asyncio.Task[WorkerState], asyncio.Event]] = []
        self.sizes: list[int] = []

    async def replicas(self, pool: str) -> int:
        return len(self.workers)

    async def scale(self, pool: str, replicas: int) -> None:
        while len(self.workers) < replicas:
            stop = asyncio.Event()
            task = asyncio.create_task(run_worker(self.settings, stop=stop))
            self.workers.append((task, stop))
        while len(self.workers) > replicas:
            _task, stop = self.workers.pop()
            stop.set()
        self.sizes.append(replicas)

    async def aclose(self) -> None:
        for _task, stop in self.workers:
            stop.set()
        await asyncio.gather(*(t for t, _ in self.workers), return_exceptions=True)


async def test_a_burst_scales_the_pool_up_and_quiet_brings_it_back_down(
    broker: PrivateBroker, fleet: str, store: tuple[Path, SigningKey]
) -> None:
    settings = worker_settings(
        broker,
        fleet,
        store[0],
        load_report_s=0.2,
        metrics_port=None,
        max_batch_size=1,
        intra_op_threads=1,
    )
    autoscale = AutoscalerSettings(
        mode="reactive",
        min_replicas=1,
        max_replicas=3,
        interval_s=0.5,
        slo_p95_ms=20.0,
        target_queue_per_replica=2.0,
        scale_down_stabilization_s=2.0,
    )
    topics = Topics(fleet)
    scaler = InProcessScaler(settings)
    assert isinstance(scaler, WorkerScaler)
    bursting = True

    async def burst(requester: Requester) -> None:
        async def one(i: int) -> None:
            with contextlib.suppress(EdgefedError):
                await requester.request(
                    topics.worker_infer(POOL),
                    InferenceRequest(model=MODEL, texts=[f"burst {i} " * 8]),
                    InferenceReply,
                    timeout=30,
                )

        i = 0
        while bursting:  # 64 requests in flight, always: far more than one worker keeps up with
            await asyncio.gather(*(one(i + k) for k in range(64)))
            i += 64

    try:
        await scaler.scale(POOL, 1)
        async with MqttClient.from_settings(
            settings, client_id=f"asc-{uuid.uuid4().hex[:6]}"
        ) as client:
            monitor = PoolMonitor(client, topics)
            await monitor.start()
            await until(lambda: monitor.sample(POOL).replicas == 1, "the first worker ready")
            service = AutoscaleService({POOL: autoscale}, monitor, scaler)
            loop = asyncio.create_task(service.run())
            load = asyncio.create_task(burst(Requester(client, topics)))
            try:
                await until(lambda: len(scaler.workers) >= 2, "scaled up under the burst", 45)
                peak = len(scaler.workers)
                await until(lambda: len(monitor.workers(POOL)) >= 2, "a second worker reporting")
                bursting = False
                await load
                await until(lambda: len(scaler.workers) == 1, "scaled back down when quiet", 45)
            finally:
                bursting = False
                loop.cancel()
                load.cancel()
                await asyncio.gather(loop, load, return_exceptions=True)
            decisions = list(service.pools[POOL].decisions)
    finally:
        await scaler.aclose()
    assert 2 <= peak <= 3
    assert max(scaler.sizes) <= 3
    assert scaler.sizes[-1] == 1
    ups = [d for d in decisions if d.replicas >= 2]
    assert ups
    assert any(word in ups[0].reason for word in ("p95", "waiting"))


class FlakyScaler:
    """A scaler whose first calls fail the ways a Kubernetes API can (and one bug)."""

    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.size = 1
        self.calls = 0

    async def replicas(self, pool: str) -> int:
        return self.size

    async def scale(self, pool: str, replicas: int) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        self.size = replicas


async def test_a_failing_scaler_is_retried_next_interval_and_the_loop_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A monitor fed by hand: the reports say the pool is swamped (40 waiting at one worker).
    client = MqttClient.from_settings(
        load_settings(broker_url="mqtt://127.0.0.1:1", fleet="f"), client_id="unused"
    )
    monitor = PoolMonitor(client, Topics("f"))
    monitor.add(
        WorkerLoad(
            worker_id="w1",
            pool="p",
            seq=0,
            interval_s=60.0,
            arrivals=600,
            completed=300,
            queue_depth=40,
            p95_ms=900.0,
            cpu_cores=1.0,
            rss_bytes=200_000_000,
            ready=True,
        )
    )
    scaler = FlakyScaler(
        [
            TemporaryError("the API server is away"),
            PermanentError("deployment edgefed-worker-p not found"),
            RuntimeError("a bug in the scaler"),
        ]
    )
    settings = AutoscalerSettings(min_replicas=1, max_replicas=3, interval_s=0.05)
    service = AutoscaleService({"p": settings}, monitor, scaler)
    caplog.set_level(logging.INFO, logger="edgefed.cloud.orchestration.service")

    loop = asyncio.create_task(service.run())
    try:
        await until(lambda: scaler.size == 3, "scaled once the scaler works", 10)
        await until(lambda: service.pools["p"].last_error is None, "the error cleared", 10)
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)

    assert scaler.calls == 4
    errors = service.registry.get_sample_value("edgefed_autoscaler_errors_total", {"pool": "p"})
    assert errors == 3
    ups = service.registry.get_sample_value(
        "edgefed_autoscaler_scale_changes_total", {"pool": "p", "direction": "up"}
    )
    assert ups == 1
    text = caplog.text
    assert "the API server is away" in text
    assert "not found" in text
    assert "a bug in the scaler" in text
    assert "pool p scaled up from 1 to 3 workers" in text


async def test_without_a_scaler_decisions_are_recommendations_and_nothing_breaks() -> None:
    client = MqttClient.from_settings(
        load_settings(broker_url="mqtt://127.0.0.1:1", fleet="f"), client_id="unused"
    )
    monitor = PoolMonitor(client, Topics("f"))
    settings = AutoscalerSettings(min_replicas=2, max_replicas=4, interval_s=1.0)
    service = AutoscaleService({"p": settings}, monitor, None)

    first = await service.step("p")  # no worker reports at all yet

    assert not service.applying
    assert first is not None
    assert first.replicas == 2  # min_replicas, as a recommendation
    assert service.pools["p"].current is None
