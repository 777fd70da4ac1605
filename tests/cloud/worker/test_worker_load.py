"""What a cloud worker tells the autoscaler and Kubernetes: load reports whose counts match the
requests it was sent, and probes that say ready only once it can serve. Real mosquitto, real
ONNX Runtime, tiny signed artifacts, in-process workers (``run_worker``)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import pytest

from edgefed.cloud.settings import CloudSettings
from edgefed.cloud.worker.pool import WorkerState, run_worker
from edgefed.common.artifact import SigningKey
from edgefed.common.broker import PrivateBroker, free_port
from edgefed.common.errors import EdgefedError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import InferenceReply, InferenceRequest, WorkerLoad, decode
from edgefed.common.topics import Topics
from tests.cloud.worker.test_worker_pool import MODEL, store, worker_settings, workers

__all__ = ["store"]  # the module-scoped fixture, shared with the pool tests

pytestmark = pytest.mark.timeout(90)


async def until(condition: object, what: str, timeout_s: float = 20.0) -> None:
    """Wait for ``condition()`` to hold (polling), failing with ``what`` after the deadline."""
    assert callable(condition)
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s:g} s")
        await asyncio.sleep(0.05)


async def test_a_worker_reports_every_request_it_was_sent_in_its_load_reports(
    broker: PrivateBroker, fleet: str, store: tuple[Path, SigningKey]
) -> None:
    settings = worker_settings(broker, fleet, store[0], load_report_s=0.2, metrics_port=0)
    topics = Topics(fleet)
    reports: list[WorkerLoad] = []

    async def on_load(message: Message) -> None:
        if message.payload:
            reports.append(decode(message.payload, message.content_type, WorkerLoad).message)

    async with MqttClient.from_settings(settings, client_id=f"obs-{uuid.uuid4().hex[:6]}") as obs:
        await obs.subscribe(topics.all_worker_load("gpu-a"), on_load)
        async with workers(settings, 1) as (state,):
            requester = Requester(obs, topics)
            await asyncio.gather(
                *(
                    requester.request(
                        topics.worker_infer("gpu-a"),
                        InferenceRequest(model=MODEL, texts=[f"text {i}"]),
                        InferenceReply,
                        timeout=20,
                    )
                    for i in range(25)
                )
            )
            with pytest.raises(EdgefedError, match="not-served"):
                await requester.request(
                    topics.worker_infer("gpu-a"),
                    InferenceRequest(model="not-served", texts=["x"]),
                    InferenceReply,
                    timeout=10,
                )
            await until(lambda: sum(r.completed for r in reports) >= 26, "26 answers reported")
            assert state.metrics_port is not None
            async with httpx.AsyncClient(trust_env=False) as http:
                metrics = (await http.get(f"http://127.0.0.1:{state.metrics_port}/metrics")).text

    assert sum(r.arrivals for r in reports) == 26
    assert sum(r.completed for r in reports) == 26
    assert sum(r.failed for r in reports) == 1
    assert {r.worker_id for r in reports} == {state.worker_id}
    assert {r.pool for r in reports} == {"gpu-a"}
    assert [r.seq for r in reports] == sorted(r.seq for r in reports)
    busy = [r for r in reports if r.completed > r.failed]
    assert busy
    assert all(r.p95_ms is not None and r.p95_ms > 0 for r in busy)
    assert all(r.rss_bytes > 10_000_000 and r.cpu_cores >= 0 for r in reports)
    assert reports[-1].ready
    assert 'edgefed_worker_requests_total{outcome="ok"} 25.0' in metrics
    assert "edgefed_worker_request_latency_seconds_bucket" in metrics


async def test_a_stopping_worker_says_goodbye_on_its_load_topic(
    broker: PrivateBroker, fleet: str, store: tuple[Path, SigningKey]
) -> None:
    settings = worker_settings(broker, fleet, store[0], load_report_s=60, metrics_port=None)
    topics = Topics(fleet)
    goodbyes: list[str] = []

    async def on_load(message: Message) -> None:
        if not message.payload:
            goodbyes.append(message.topic)

    async with MqttClient.from_settings(settings, client_id=f"obs-{uuid.uuid4().hex[:6]}") as obs:
        await obs.subscribe(topics.all_worker_load("gpu-a"), on_load)
        async with workers(settings, 1) as (state,):
            pass
        await until(lambda: bool(goodbyes), "the stopped worker's goodbye arrived")
    assert goodbyes == [topics.worker_load("gpu-a", state.worker_id)]


async def test_readyz_is_503_until_the_models_are_loaded_and_the_pool_subscribed(
    fleet: str, store: tuple[Path, SigningKey], tmp_path: Path
) -> None:
    port = free_port()
    absent = PrivateBroker(port=port, data_dir=tmp_path / "broker")  # not started yet
    settings: CloudSettings = worker_settings(absent, fleet, store[0], metrics_port=0)
    settings = settings.model_copy(
        update={"mqtt": settings.mqtt.model_copy(update={"connect_timeout_s": 60.0})}
    )
    stop = asyncio.Event()
    state = WorkerState(worker_id="", pool="gpu-a")
    task = asyncio.create_task(run_worker(settings, stop=stop, state=state))
    seen: list[tuple[int, list[str]]] = []
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as http:

            async def probe(path: str) -> tuple[int, list[str]]:
                r = await http.get(f"http://127.0.0.1:{state.metrics_port}{path}")
                return r.status_code, r.json()["reasons"]

            await until(lambda: state.metrics_port is not None or task.done(), "probes served")
            seen.append(await probe("/readyz"))
            await until(lambda: bool(state.models) or task.done(), "models loaded")
            await asyncio.sleep(0.3)  # the broker is still absent: no subscription possible
            seen.append(await probe("/readyz"))
            live_before = await probe("/livez")
            with absent:  # the broker comes up; the worker connects and subscribes
                await until(lambda: state.ready.is_set() or task.done(), "worker ready", 60)
                ready = await probe("/readyz")
                live_after = await probe("/livez")
                stop.set()
                await asyncio.wait_for(task, 30)
    finally:
        stop.set()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert seen[0][0] == 503
    assert seen[0][1] in (["loading models"], ["no connection to the broker"])
    assert seen[1] == (503, ["no connection to the broker"])
    assert ready == (200, [])
    assert live_before == live_after == (200, [])
