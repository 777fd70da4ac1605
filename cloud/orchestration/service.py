"""The autoscaling loop: sample each pool, decide, resize through a
:class:`~edgefed.cloud.orchestration.scaler.WorkerScaler`.

For every pool of ``[controller.autoscaler.POOL]``, every ``interval_s``: the pool monitor's
sample of the interval (with the scaler's current size as ``desired_replicas``) goes to the
pool's autoscaler (:func:`~edgefed.cloud.orchestration.autoscaler.make_autoscaler`), whose
decision is applied with ``scaler.scale`` when it differs from ``scaler.replicas``. Every change
is logged with its reason; the last decisions, the last sample and the vertical hints
(:func:`~edgefed.cloud.orchestration.vertical.recommend_resources` over the workers' CPU and
memory) are kept for ``GET /api/v1/autoscaler``, and Prometheus gauges show the same.

Without a scaler (no Kubernetes, and not the simulation harness) the service runs in
**recommend-only** mode: decisions are computed, logged and shown, nothing is resized.

The loop never dies of one bad interval: a scaler error that a retry can help
(:class:`~edgefed.common.errors.TemporaryError`: the API server away, a conflict) is logged
and the next interval tries again; a permanent one (the Deployment does not exist) is logged
as an error and tried again too, since an operator may fix it while the controller runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from edgefed.cloud.orchestration.autoscaler import Autoscaler, make_autoscaler
from edgefed.cloud.orchestration.pool_monitor import PoolMonitor
from edgefed.cloud.orchestration.scaler import WorkerScaler
from edgefed.cloud.orchestration.signals import (
    AutoscalerSettings,
    PoolSample,
    ResourceUsage,
    ScaleDecision,
)
from edgefed.cloud.settings import CloudSettings
from edgefed.common.errors import EdgefedError, TemporaryError
from edgefed.common.mqtt import MqttClient
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)

PREFIX = "edgefed_autoscaler"
DECISIONS_KEPT = 50
"""Decisions kept per pool for the API."""


class PoolSampler(Protocol):
    """What the service reads of the pools (:class:`~.pool_monitor.PoolMonitor` is one)."""

    def sample(self, pool: str, now: float | None = None) -> PoolSample: ...

    def usage(self, pool: str) -> list[ResourceUsage]: ...


Recommend = Callable[[Sequence[ResourceUsage]], Any]
"""Vertical hints from resource samples (``vertical.recommend_resources``)."""


@dataclass
class PoolState:
    """One autoscaled pool as the API shows it."""

    pool: str
    settings: AutoscalerSettings
    autoscaler: Autoscaler
    decisions: deque[ScaleDecision] = field(default_factory=lambda: deque(maxlen=DECISIONS_KEPT))
    sample: PoolSample | None = None
    current: int | None = None
    """The scaler's answer to ``replicas(pool)`` at the last interval (None: no scaler)."""
    resources: Any = None
    """The last vertical hint (a ``ResourceRecommendation``), once there was usage."""
    last_error: str | None = None
    """The last interval's failure, cleared by the next interval that succeeds."""
    changes: int = 0
    """Resizes applied (or, recommend-only, decisions that changed the size)."""


class AutoscaleService:
    """Runs one loop per autoscaled pool until cancelled (see the module doc)."""

    def __init__(
        self,
        pools: Mapping[str, AutoscalerSettings],
        monitor: PoolSampler,
        scaler: WorkerScaler | None,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        recommend: Recommend | None = None,
    ) -> None:
        self.monitor = monitor
        self.scaler = scaler
        self._clock = clock
        self._recommend = recommend if recommend is not None else _recommend_resources()
        self.pools: dict[str, PoolState] = {
            name: PoolState(name, s, make_autoscaler(s)) for name, s in sorted(pools.items())
        }
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self._desired = Gauge(
            f"{PREFIX}_desired_replicas", "Workers the autoscaler wants", ["pool"], registry=reg
        )
        self._current = Gauge(
            f"{PREFIX}_current_replicas",
            "Workers the scaler runs (asked for)",
            ["pool"],
            registry=reg,
        )
        self._ready = Gauge(
            f"{PREFIX}_ready_replicas", "Workers reporting ready", ["pool"], registry=reg
        )
        self._arrivals = Gauge(
            f"{PREFIX}_arrivals_per_second", "Requests reaching the pool", ["pool"], registry=reg
        )
        self._queue = Gauge(
            f"{PREFIX}_queue_depth", "Requests waiting across the pool", ["pool"], registry=reg
        )
        self._p95 = Gauge(
            f"{PREFIX}_p95_latency_seconds", "p95 latency over the interval", ["pool"], registry=reg
        )
        self._decided_at = Gauge(
            f"{PREFIX}_last_decision_timestamp_seconds",
            "Unix time of the pool's last decision",
            ["pool"],
            registry=reg,
        )
        self._changes = Counter(
            f"{PREFIX}_scale_changes",
            "Resizes, by direction",
            ["pool", "direction"],
            registry=reg,
        )
        self._errors = Counter(
            f"{PREFIX}_errors", "Intervals that failed, by pool", ["pool"], registry=reg
        )

    @property
    def applying(self) -> bool:
        """Whether decisions are applied (False: recommend-only)."""
        return self.scaler is not None

    async def run(self) -> None:
        """One loop per pool, each every ``interval_s`` of its settings, until cancelled."""
        if not self.pools:
            return
        how = "applied" if self.applying else "recommend-only (no scaler)"
        log.info("autoscaling pools %s: %s", ", ".join(self.pools), how)
        async with asyncio.TaskGroup() as group:
            for name in self.pools:
                group.create_task(self._loop(name), name=f"autoscaler:{name}")

    async def _loop(self, pool: str) -> None:
        interval = self.pools[pool].settings.interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self.step(pool)
            except Exception:  # a bug in one interval must not end autoscaling
                log.exception("the autoscaler of pool %s failed this interval", pool)
                self._errors.labels(pool=pool).inc()

    async def step(self, pool: str) -> ScaleDecision | None:
        """One interval of ``pool``: sample, observe, decide, apply. The decision, or None
        when the interval failed (the reason is in the pool's ``last_error``)."""
        state = self.pools[pool]
        now = self._clock()
        current: int | None = None
        try:
            if self.scaler is not None:
                current = await self.scaler.replicas(pool)
                state.current = current
            sample = self.monitor.sample(pool, now)
            if current is not None:
                sample = dataclasses.replace(sample, desired_replicas=current)
            state.sample = sample
            self._show_sample(pool, sample)
            state.autoscaler.observe(sample)
            decision = state.autoscaler.decide(now)
        except EdgefedError as exc:
            self._failed(state, "reading the pool", exc)
            return None
        previous = state.decisions[-1] if state.decisions else None
        state.decisions.append(decision)
        self._desired.labels(pool=pool).set(decision.replicas)
        self._decided_at.labels(pool=pool).set(time.time())
        self._hint(state)
        if self.scaler is None or current is None:
            before = previous.replicas if previous is not None else sample.replicas
            if decision.replicas != before:
                state.changes += 1
                log.info(
                    "pool %s should run %d workers (now %d ready; recommend-only): %s",
                    pool,
                    decision.replicas,
                    sample.replicas,
                    decision.reason,
                )
            state.last_error = None
            return decision
        if decision.replicas != current:
            try:
                await self.scaler.scale(pool, decision.replicas)
            except EdgefedError as exc:
                self._failed(state, f"scaling to {decision.replicas}", exc)
                return decision
            state.changes += 1
            state.current = decision.replicas
            direction = "up" if decision.replicas > current else "down"
            self._changes.labels(pool=pool, direction=direction).inc()
            log.info(
                "pool %s scaled %s from %d to %d workers: %s",
                pool,
                direction,
                current,
                decision.replicas,
                decision.reason,
            )
        self._current.labels(pool=pool).set(state.current or 0)
        state.last_error = None
        return decision

    def _show_sample(self, pool: str, sample: PoolSample) -> None:
        self._ready.labels(pool=pool).set(sample.replicas)
        self._arrivals.labels(pool=pool).set(sample.arrivals_per_s)
        self._queue.labels(pool=pool).set(sample.queue_depth)
        if sample.p95_ms is not None:
            self._p95.labels(pool=pool).set(sample.p95_ms / 1000)

    def _hint(self, state: PoolState) -> None:
        usage = self.monitor.usage(state.pool)
        if not usage:
            return
        try:
            state.resources = self._recommend(usage)
        except EdgefedError as exc:
            log.debug("no vertical hint for pool %s: %s", state.pool, exc)

    def _failed(self, state: PoolState, what: str, exc: EdgefedError) -> None:
        self._errors.labels(pool=state.pool).inc()
        state.last_error = f"{what}: {exc.message}"
        if isinstance(exc, TemporaryError):
            log.warning(
                "pool %s: %s failed (%s); trying again next interval", state.pool, what, exc
            )
        else:
            log.error("pool %s: %s failed (%s); trying again next interval", state.pool, what, exc)

    def snapshot(self) -> list[PoolState]:
        """Every autoscaled pool's state (for the API; read on the event loop)."""
        return list(self.pools.values())


def _recommend_resources() -> Recommend:
    from edgefed.cloud.orchestration.vertical import recommend_resources

    return recommend_resources


async def start_autoscaling(
    settings: CloudSettings,
    client: MqttClient,
    tasks: list[asyncio.Task[None]],
    *,
    registry: CollectorRegistry | None = None,
) -> AutoscaleService:
    """The controller's autoscaling (``[controller.autoscaler]`` names pools): a pool monitor
    on ``client``, and the service, resizing worker Deployments through
    :class:`~edgefed.cloud.orchestration.kube.KubernetesWorkerScaler` when
    ``[controller.kubernetes] enabled``, recommend-only otherwise. Its task is appended to
    ``tasks`` (cancel it to stop; the Kubernetes client is closed then)."""
    ctl = settings.controller
    monitor = PoolMonitor(client, Topics(settings.fleet))
    await monitor.start()
    if not ctl.kubernetes.enabled:
        log.warning(
            "autoscaling is configured for %s but there is no scaler ([controller.kubernetes] "
            "is not enabled): decisions are computed and shown at /api/v1/autoscaler, "
            "nothing is resized",
            ", ".join(ctl.autoscaler),
        )
        service = AutoscaleService(ctl.autoscaler, monitor, None, registry=registry)
        tasks.append(asyncio.create_task(service.run(), name="autoscaler"))
        return service
    from edgefed.cloud.orchestration.kube import KubeAdapter, KubernetesWorkerScaler

    adapter = KubeAdapter(ctl.kubernetes)
    service = AutoscaleService(
        ctl.autoscaler, monitor, KubernetesWorkerScaler(adapter), registry=registry
    )

    async def run() -> None:
        async with adapter:
            await service.run()

    tasks.append(asyncio.create_task(run(), name="autoscaler"))
    return service
