"""The pool monitor turns workers' load reports into the autoscaler's sample: sums of rates and
queues, the highest p95, ready workers only; a worker that is killed (its last will) or falls
silent leaves the pool. Real mosquitto and real workers (one in-process, one an
``edgefed cloud worker`` process that is SIGKILLed) for the live test; reports built by hand
for the arithmetic."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from edgefed.cloud.orchestration.pool_monitor import PoolMonitor
from edgefed.common.artifact import SigningKey
from edgefed.common.broker import PrivateBroker
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import InferenceReply, InferenceRequest, WorkerLoad
from edgefed.common.settings import load_settings
from edgefed.common.topics import Topics
from tests.cloud.e2e.world import clean_env
from tests.cloud.worker.test_worker_pool import MODEL, store, worker_settings, workers

__all__ = ["store"]  # the module-scoped fixture of the worker tests: tiny signed artifacts

pytestmark = pytest.mark.timeout(90)


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s:g} s")
        await asyncio.sleep(0.05)


def report(worker: str, pool: str = "p", **figures: object) -> WorkerLoad:
    base: dict[str, object] = {
        "worker_id": worker,
        "pool": pool,
        "seq": 0,
        "interval_s": 1.0,
        "arrivals": 0,
        "completed": 0,
        "queue_depth": 0,
        "cpu_cores": 0.5,
        "rss_bytes": 100_000_000,
        "ready": True,
    }
    base.update(figures)
    return WorkerLoad.model_validate(base)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def offline_monitor(clock: Clock) -> PoolMonitor:
    """A monitor fed by hand (its client is never entered: nothing is subscribed)."""
    settings = load_settings(broker_url="mqtt://127.0.0.1:1", fleet="f")
    client = MqttClient.from_settings(settings, client_id="unused")
    return PoolMonitor(client, Topics("f"), clock=clock)


def test_a_sample_sums_rates_and_queues_counts_ready_workers_and_takes_the_highest_p95() -> None:
    clock = Clock()
    monitor = offline_monitor(clock)
    monitor.add(report("w1", arrivals=20, completed=18, queue_depth=3, p95_ms=40.0, interval_s=2))
    monitor.add(report("w2", arrivals=10, completed=10, queue_depth=1, p95_ms=90.0))
    monitor.add(report("w3", arrivals=0, completed=0, queue_depth=0, ready=False))
    monitor.add(report("other", pool="q", arrivals=500, queue_depth=50))

    sample = monitor.sample("p")

    assert sample.replicas == 2  # w3 is still loading
    assert sample.arrivals_per_s == pytest.approx(20 / 2 + 10 / 1)
    assert sample.served_per_s == pytest.approx(18 / 2 + 10 / 1)
    assert sample.queue_depth == 4
    assert sample.p95_ms == 90.0  # an upper bound of the pool's p95
    assert sample.at == clock.now


def test_a_worker_with_no_new_report_counts_at_its_latest_rate_and_a_window_restarts() -> None:
    clock = Clock()
    monitor = offline_monitor(clock)
    monitor.add(report("w1", arrivals=10, completed=10, interval_s=2.0, p95_ms=10.0))
    monitor.add(report("w1", arrivals=30, completed=30, interval_s=2.0, p95_ms=30.0))
    first = monitor.sample("p")
    clock.now += 1.0
    second = monitor.sample("p")  # no report in between: the latest one's rate holds

    assert first.arrivals_per_s == pytest.approx(40 / 4)
    assert first.p95_ms == 30.0
    assert second.arrivals_per_s == pytest.approx(30 / 2)


def test_a_worker_silent_for_three_report_intervals_is_dropped() -> None:
    clock = Clock()
    monitor = offline_monitor(clock)
    monitor.add(report("w1", interval_s=1.0))
    monitor.add(report("w2", interval_s=5.0))
    clock.now += 3.5

    sample = monitor.sample("p")

    assert [w.worker_id for w in monitor.workers("p")] == ["w2"]
    assert sample.replicas == 1


def test_a_goodbye_drops_the_worker_and_a_report_under_another_name_is_refused() -> None:
    clock = Clock()
    monitor = offline_monitor(clock)
    topics = Topics("f")
    monitor.receive(Message(topics.worker_load("p", "w1"), report("w1").to_json()))
    monitor.receive(Message(topics.worker_load("p", "w2"), report("w1").to_json()))
    monitor.receive(Message(topics.worker_load("p", "w3"), b"{not json"))
    assert [w.worker_id for w in monitor.workers("p")] == ["w1"]
    assert monitor.rejected == 2

    monitor.receive(Message(topics.worker_load("p", "w1"), b""))

    assert monitor.workers("p") == []
    assert monitor.sample("p").replicas == 0


async def test_the_monitor_sees_two_live_workers_and_drops_the_one_killed(
    broker: PrivateBroker, fleet: str, store: tuple[Path, SigningKey]
) -> None:
    settings = worker_settings(broker, fleet, store[0], load_report_s=0.2, metrics_port=None)
    topics = Topics(fleet)
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "edgefed.cli", "cloud", "worker", "--model", MODEL),
        env=clean_env(
            EDGEFED_BROKER_URL=broker.url,
            EDGEFED_FLEET=fleet,
            EDGEFED_CONTROLLER__DATA_DIR=str(store[0].parent),
            EDGEFED_WORKER__POOL="gpu-a",
            EDGEFED_WORKER__LOAD_REPORT_S="0.2",
            EDGEFED_WORKER__METRICS_PORT="0",
        ),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    wills: list[str] = []

    async def on_load(message: Message) -> None:
        if not message.payload:
            wills.append(message.topic)

    try:
        async with (
            MqttClient.from_settings(settings, client_id=f"mon-{uuid.uuid4().hex[:6]}") as client,
            MqttClient.from_settings(settings, client_id=f"obs-{uuid.uuid4().hex[:6]}") as obs,
        ):
            await obs.subscribe(topics.all_worker_load("gpu-a"), on_load)
            monitor = PoolMonitor(client, topics)
            await monitor.start()
            async with workers(settings, 1) as (inside,):
                await until(lambda: len(monitor.workers("gpu-a")) == 2, "two workers reporting")
                requester = Requester(client, topics)
                await asyncio.gather(
                    *(
                        requester.request(
                            topics.worker_infer("gpu-a"),
                            InferenceRequest(model=MODEL, texts=[f"t{i}"]),
                            InferenceReply,
                            timeout=20,
                        )
                        for i in range(40)
                    )
                )
                await asyncio.sleep(0.5)  # the reports that cover those requests
                both = monitor.sample("gpu-a")
                proc.send_signal(signal.SIGKILL)
                await asyncio.wait_for(proc.wait(), 10)
                # Its last will (an empty message) arrives long before 3 silent intervals.
                await until(
                    lambda: [w.worker_id for w in monitor.workers("gpu-a")] == [inside.worker_id],
                    "the killed worker dropped",
                    timeout_s=10,
                )
                after = monitor.sample("gpu-a")
                await until(lambda: bool(wills), "the killed worker's last will")
                killed = {w.worker_id for w in monitor.workers("gpu-a")} ^ {inside.worker_id}
                wills_while_running = list(wills)
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
    assert both.replicas == 2
    assert both.arrivals_per_s > 0
    assert both.p95_ms is not None
    assert after.replicas == 1
    assert killed == set()
    assert len(wills_while_running) == 1
    assert wills_while_running[0].startswith(
        f"{topics.prefix}/workers/gpu-a/load/worker-gpu-a-{proc.pid}-"
    )
