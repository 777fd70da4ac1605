"""What a cloud worker did between two load reports: the autoscaler's raw material.

Every ``load_report_s`` the worker publishes a :class:`~edgefed.common.schemas.WorkerLoad` on
``workers/<pool>/load/<worker>`` (QoS 0: the next report comes soon, and a stale one is worth
nothing). The counts cover exactly the interval since the previous report, so the pool monitor
can turn them into rates whatever its own sampling interval is. The worker's last will is an
empty message on the same topic, so a crashed worker leaves the pool at once; a worker that
stops publishes the same empty goodbye itself (a clean DISCONNECT discards the will).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import numpy as np
import psutil

from edgefed.common.errors import MessagingError
from edgefed.common.mqtt import MqttClient, Will
from edgefed.common.schemas import WorkerLoad
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)

MAX_LATENCY_SAMPLES = 20_000
"""Latencies kept per interval for its p95; beyond, a uniform reservoir sample of them."""


def gone_will(topics: Topics, pool: str, worker_id: str) -> Will:
    """The worker's last will: an empty message on its load topic (the monitor drops it)."""
    return Will(topics.worker_load(pool, worker_id), b"", qos=1, retain=False)


class LoadMeter:
    """Counts arrivals and answers, and collects latencies, until :meth:`report` resets them.

    Lives on the worker's event loop (no locks); ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        process: psutil.Process | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._process = process or psutil.Process()
        self._rng = rng or random.Random()  # noqa: S311 - sampling, not cryptography
        self._seq = 0
        self._since = clock()
        self._cpu = self._cpu_seconds()
        self._reset()

    def _reset(self) -> None:
        self.arrivals = 0
        self.completed = 0
        self.failed = 0
        self._ok = 0
        self._latencies: list[float] = []

    def _cpu_seconds(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def arrived(self) -> None:
        """A request was handed to the worker's service."""
        self.arrivals += 1

    def done(self, _model: str, outcome: str, seconds: float) -> None:
        """A request was answered (the service's ``on_done`` callback)."""
        self.completed += 1
        if outcome != "ok":
            self.failed += 1
            return
        self._ok += 1
        if len(self._latencies) < MAX_LATENCY_SAMPLES:
            self._latencies.append(seconds)
        else:  # reservoir sampling keeps every answer equally likely to be in the sample
            slot = self._rng.randrange(self._ok)
            if slot < MAX_LATENCY_SAMPLES:
                self._latencies[slot] = seconds

    def report(self, *, worker_id: str, pool: str, queue_depth: int, ready: bool) -> WorkerLoad:
        """The figures of the interval that ends now; the counts start again from zero."""
        now = self._clock()
        cpu = self._cpu_seconds()
        interval = max(now - self._since, 1e-6)
        p95 = (
            float(np.percentile(np.asarray(self._latencies), 95)) * 1000
            if self._latencies
            else None
        )
        load = WorkerLoad(
            worker_id=worker_id,
            pool=pool,
            seq=self._seq,
            interval_s=interval,
            arrivals=self.arrivals,
            completed=self.completed,
            failed=self.failed,
            queue_depth=max(0, queue_depth),
            p95_ms=p95,
            cpu_cores=max(0.0, cpu - self._cpu) / interval,
            rss_bytes=int(self._process.memory_info().rss),
            ready=ready,
        )
        self._seq += 1
        self._since = now
        self._cpu = cpu
        self._reset()
        return load


async def publish_loads(
    client: MqttClient,
    topic: str,
    every_s: float,
    snapshot: Callable[[], WorkerLoad],
) -> None:
    """Publish ``snapshot()`` on ``topic`` every ``every_s`` until cancelled. A report that
    cannot leave (broker away) is dropped: its interval is simply missing at the monitor."""
    while True:
        await asyncio.sleep(every_s)
        load = snapshot()
        try:
            await client.publish(topic, load.to_json(), qos=0)
        except MessagingError as exc:
            log.debug("load report %d not sent: %s", load.seq, exc)


async def say_goodbye(client: MqttClient, topic: str, timeout_s: float = 2.0) -> None:
    """The empty message that tells the pool monitor this worker is gone (best effort)."""
    try:
        await client.publish(topic, b"", qos=1, timeout=timeout_s)
    except MessagingError as exc:
        log.info("could not say goodbye on %s: %s", topic, exc)
