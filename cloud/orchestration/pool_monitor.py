"""The pool monitor: cloud workers' load reports turned into one sample per pool.

Workers publish a :class:`~edgefed.common.schemas.WorkerLoad` every few seconds on
``workers/<pool>/load/<worker>``; the monitor keeps, per worker, the latest report and the
counts received since the pool was last sampled. :meth:`PoolMonitor.sample` then builds the
autoscaler's :class:`~edgefed.cloud.orchestration.signals.PoolSample`:

* ``arrivals_per_s`` / ``served_per_s``: per worker, the counts received since the last sample
  over the seconds those reports cover (a worker whose next report has not come yet counts at
  its latest rate), summed over the pool's workers;
* ``queue_depth``: the sum of the workers' latest queue depths;
* ``p95_ms``: the **maximum** of the workers' p95 over the window. If every worker's p95 is at
  most M, at most 5 % of each worker's requests, hence of the pool's, took longer than M: the
  maximum is an upper bound of the pool's true p95 that needs no latency histograms on the
  wire, so the autoscaler never misses an SLO violation. A completion-weighted mean of p95s
  bounds nothing and hides one slow worker, which the broker keeps feeding its share;
* ``replicas``: workers whose latest report says ready.

A worker leaves the pool when its empty goodbye (or last will) arrives, or when it has been
silent for ``stale_after`` of its report intervals (3 by default): a worker on the other side
of a broken link, or whose will was lost while the monitor was disconnected, cannot hold a
replica forever. A pool with no reporting worker samples as zero of everything.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from edgefed.cloud.orchestration.signals import PoolSample, ResourceUsage
from edgefed.common.errors import PayloadError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.schemas import WorkerLoad, decode
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)

STALE_AFTER_REPORTS = 3.0
"""A worker silent for this many of its report intervals is dropped."""
USAGE_HISTORY = 2_000
"""Resource samples kept per worker (for vertical hints)."""


@dataclass
class WorkerView:
    """What the monitor knows of one worker."""

    worker_id: str
    pool: str
    latest: WorkerLoad
    seen_at: float
    """When its latest report arrived (monitor's monotonic clock)."""
    arrivals: int = 0
    completed: int = 0
    covered_s: float = 0.0
    """Seconds covered by the reports received since the pool's last sample."""
    p95_ms: float | None = None
    """Highest p95 among those reports."""
    usage: deque[ResourceUsage] = field(default_factory=lambda: deque(maxlen=USAGE_HISTORY))

    def stale(self, now: float, factor: float) -> bool:
        return now - self.seen_at > factor * max(self.latest.interval_s, 1e-3)


class PoolMonitor:
    """Listens to the load reports of every pool of a fleet (``async with``-free: the MQTT
    client's owner opens and closes it; :meth:`start` subscribes)."""

    def __init__(
        self,
        client: MqttClient,
        topics: Topics,
        *,
        stale_after: float = STALE_AFTER_REPORTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not stale_after > 1:
            raise ValueError("stale_after must be above 1 report interval")
        self.client = client
        self.topics = topics
        self.stale_after = stale_after
        self._clock = clock
        self._workers: dict[str, dict[str, WorkerView]] = {}
        self.rejected = 0
        """Reports that could not be read (logged once each)."""

    async def start(self) -> None:
        """Subscribe to every pool's load reports (returns once the broker granted it)."""
        await self.client.subscribe(self.topics.all_worker_load(), self._on_message, qos=1)

    # ------------------------------------------------------------------ reports in

    async def _on_message(self, message: Message) -> None:
        self.receive(message)

    def receive(self, message: Message) -> None:
        """Take one message from a load topic: a report, or an empty goodbye."""
        where = self.topics.worker_load_of(message.topic)
        if where is None:
            return
        pool, worker_id = where
        if not message.payload:
            if self._workers.get(pool, {}).pop(worker_id, None) is not None:
                log.info("worker %s of pool %s is gone", worker_id, pool)
            return
        try:
            load = decode(message.payload, message.content_type, WorkerLoad).message
        except PayloadError as exc:
            self.rejected += 1
            log.warning("unreadable load report on %s: %s", message.topic, exc.message)
            return
        if (load.pool, load.worker_id) != (pool, worker_id):
            self.rejected += 1
            log.warning(
                "load report on %s names worker %s of pool %s: ignored",
                message.topic,
                load.worker_id,
                load.pool,
            )
            return
        self.add(load)

    def add(self, load: WorkerLoad) -> None:
        """Record one report (also what :meth:`receive` does for a message)."""
        now = self._clock()
        workers = self._workers.setdefault(load.pool, {})
        view = workers.get(load.worker_id)
        if view is None:
            view = WorkerView(load.worker_id, load.pool, load, now)
            workers[load.worker_id] = view
            log.info("worker %s of pool %s reports its load", load.worker_id, load.pool)
        view.latest = load
        view.seen_at = now
        view.arrivals += load.arrivals
        view.completed += load.completed
        view.covered_s += load.interval_s
        if load.p95_ms is not None:
            view.p95_ms = load.p95_ms if view.p95_ms is None else max(view.p95_ms, load.p95_ms)
        view.usage.append(
            ResourceUsage(at=now, cpu_cores=load.cpu_cores, memory_bytes=load.rss_bytes)
        )

    # ------------------------------------------------------------------ what the autoscaler reads

    def pools(self) -> list[str]:
        return sorted(self._workers)

    def workers(self, pool: str) -> list[WorkerView]:
        """The pool's live workers (silent ones are dropped here)."""
        self._drop_stale(pool, self._clock())
        return [self._workers[pool][w] for w in sorted(self._workers.get(pool, {}))]

    def sample(self, pool: str, now: float | None = None) -> PoolSample:
        """The pool over the window since its previous sample; starts the next window."""
        now = self._clock() if now is None else now
        self._drop_stale(pool, now)
        views = list(self._workers.get(pool, {}).values())
        arrivals = served = 0.0
        p95: float | None = None
        for view in views:
            latest = view.latest
            if view.covered_s > 0:
                arrivals += view.arrivals / view.covered_s
                served += view.completed / view.covered_s
                window_p95 = view.p95_ms
            else:  # no report since the last sample: its latest rate still holds
                arrivals += latest.arrivals / latest.interval_s
                served += latest.completed / latest.interval_s
                window_p95 = latest.p95_ms
            if window_p95 is not None:
                p95 = window_p95 if p95 is None else max(p95, window_p95)
            view.arrivals = view.completed = 0
            view.covered_s = 0.0
            view.p95_ms = None
        return PoolSample(
            at=now,
            replicas=sum(1 for v in views if v.latest.ready),
            arrivals_per_s=arrivals,
            queue_depth=sum(v.latest.queue_depth for v in views),
            p95_ms=p95,
            served_per_s=served,
        )

    def usage(self, pool: str) -> list[ResourceUsage]:
        """Resource samples of the pool's live workers, oldest first (for vertical hints)."""
        out = [u for view in self.workers(pool) for u in view.usage]
        return sorted(out, key=lambda u: u.at)

    def _drop_stale(self, pool: str, now: float) -> None:
        workers = self._workers.get(pool, {})
        for worker_id in [w for w, v in workers.items() if v.stale(now, self.stale_after)]:
            del workers[worker_id]
            log.info(
                "worker %s of pool %s dropped: silent for %.0f report intervals",
                worker_id,
                pool,
                self.stale_after,
            )
