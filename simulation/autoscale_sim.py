"""A simulated worker pool and load traces to replay against any autoscaler (issue 9).

The pool is a queueing model stepped in 1 s ticks: N workers take requests FIFO from one queue,
each request's service time drawn (seeded) from a gamma distribution, so a worker serves
``1 / mean_service_s`` requests/s on average. A worker asked for becomes ready ``cold_start_s``
later (like a pod pulling its image and warming its model) and is counted in replica-seconds
from the moment it is asked for; a worker removed leaves at once (starting ones first, then idle
ones, then busy ones as soon as their request is done). A request's latency is its wait in the
queue plus its service time.

Every ``interval_s`` the replay builds a :class:`PoolSample` (ready workers, arrivals, queue,
p95 of the requests completed in the interval), hands it to the autoscaler and applies its
decision, as the controller's loop does with a real pool.

SLO accounting: an **SLO violation is a 60 s window (by request arrival) whose p95 latency
exceeds the SLO**; the share of requests over the SLO is reported beside it.

Traces (``make_trace``): a diurnal sinusoid over a compressed day (``season_s``), bursts of
``burst_factor`` × the load at recurring times of day (which a seasonal forecast can learn) and
at random times (which it cannot), and slowly varying multiplicative noise, all seeded; arrivals
within a second are Poisson.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edgefed.cloud.orchestration.autoscaler import Autoscaler
from edgefed.cloud.orchestration.signals import AutoscalerSettings, PoolSample, ScaleDecision

SLO_WINDOW_S = 60
"""Length of an SLO window: a violation is a window whose p95 latency is above the SLO."""


@dataclass(frozen=True)
class TraceSpec:
    """A diurnal + burst + noise request-rate trace (requests per second, one value a second)."""

    seasons: int = 6
    season_s: int = 3600
    """A compressed day."""
    mean_rps: float = 100.0
    diurnal_amplitude: float = 0.6
    """Rate swings between (1 - a) and (1 + a) × mean over a season; the trough is at 0."""
    burst_factor: float = 3.0
    recurring_bursts: tuple[tuple[float, int], ...] = ((0.3, 240), (0.75, 240))
    """(time of day as a fraction of the season, duration s) of bursts that recur every day."""
    random_bursts_per_season: int = 1
    random_burst_s: int = 180
    noise: float = 0.08
    """Standard deviation of the slowly varying multiplicative noise."""
    noise_corr_s: float = 30.0
    seed: int = 0


def make_trace(spec: TraceSpec) -> np.ndarray:
    """The rate (req/s) for each second of the trace."""
    if spec.seasons < 1 or spec.season_s < 60:
        raise ValueError("a trace needs at least one season of at least 60 s")
    rng = np.random.default_rng(spec.seed)
    n = spec.seasons * spec.season_s
    t = np.arange(n, dtype=float)
    phase = 2 * math.pi * t / spec.season_s
    rate = spec.mean_rps * (1 - spec.diurnal_amplitude * np.cos(phase))
    factor = np.ones(n)
    for day in range(spec.seasons):
        start_of_day = day * spec.season_s
        for at, length in spec.recurring_bursts:
            s = start_of_day + int(at * spec.season_s)
            factor[s : s + length] = spec.burst_factor
        for _ in range(spec.random_bursts_per_season):
            s = start_of_day + int(rng.integers(0, spec.season_s - spec.random_burst_s))
            factor[s : s + spec.random_burst_s] = spec.burst_factor
    # AR(1) noise: correlated over ~noise_corr_s seconds, stationary sd = spec.noise.
    a = math.exp(-1.0 / spec.noise_corr_s)
    shocks = rng.normal(0.0, spec.noise * math.sqrt(1 - a * a), n)
    noise = np.empty(n)
    level = 0.0
    for i in range(n):
        level = a * level + shocks[i]
        noise[i] = level
    return np.asarray(np.maximum(rate * factor * (1 + noise), 0.0))


@dataclass(frozen=True)
class PoolSpec:
    """The simulated workers."""

    mean_service_s: float = 0.05
    """Mean service time: a worker serves 1 / this requests per second."""
    service_shape: float = 4.0
    """Gamma shape of service times (4: p95 ≈ 1.9 × mean)."""
    cold_start_s: int = 60
    seed: int = 1

    @property
    def capacity_rps(self) -> float:
        return 1.0 / self.mean_service_s


class StaticPolicy:
    """A fixed pool (the baseline): implements the autoscaler protocol, never resizes."""

    def __init__(self, settings: AutoscalerSettings, replicas: int) -> None:
        self.settings = settings
        self.replicas = replicas

    def observe(self, sample: PoolSample) -> None:
        """Nothing to learn."""

    def decide(self, now: float) -> ScaleDecision:
        return ScaleDecision(self.replicas, f"static pool of {self.replicas}", now)


def static_replicas(trace: np.ndarray, capacity_rps: float, utilisation: float, at: str) -> int:
    """Workers for a static pool sized for the trace's ``mean`` rate or its ``peak`` (the
    highest 60 s mean rate, bursts included), at ``utilisation`` of each worker."""
    if at == "mean":
        rate = float(trace.mean())
    elif at == "peak":
        windows = len(trace) // SLO_WINDOW_S
        rate = float(trace[: windows * SLO_WINDOW_S].reshape(windows, -1).mean(axis=1).max())
    else:
        raise ValueError(f"static pool sized at {at!r}: use 'mean' or 'peak'")
    return max(1, math.ceil(rate / (capacity_rps * utilisation)))


@dataclass
class ReplayResult:
    """Per SLO window figures of one replay, and the pool's size over time."""

    slo_ms: float
    p95_ms: np.ndarray
    """p95 latency of the requests that arrived in each window (NaN: no request)."""
    requests: np.ndarray
    over_slo: np.ndarray
    replica_s: np.ndarray
    """Worker-seconds paid in each window (starting workers included)."""
    times: list[float] = field(default_factory=list)
    """Decision times."""
    ready: list[int] = field(default_factory=list)
    """Ready workers at each decision time (before the decision)."""
    decided: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    def summary(self, start_s: float = 0.0, end_s: float | None = None) -> dict[str, float]:
        """Violations, replica-minutes and request figures over ``[start_s, end_s)``."""
        lo = int(start_s // SLO_WINDOW_S)
        hi = len(self.p95_ms) if end_s is None else int(end_s // SLO_WINDOW_S)
        p95 = self.p95_ms[lo:hi]
        requests = int(self.requests[lo:hi].sum())
        over = int(self.over_slo[lo:hi].sum())
        stop = math.inf if end_s is None else end_s
        steps = [d for t, d in zip(self.times, self.decided, strict=True) if start_s <= t < stop]
        changes = sum(1 for a, b in itertools.pairwise(steps) if a != b)
        return {
            "slo_violations": int(np.sum(np.nan_to_num(p95, nan=0.0) > self.slo_ms)),
            "windows": len(p95),
            "replica_minutes": float(self.replica_s[lo:hi].sum() / 60.0),
            "requests": requests,
            "requests_over_slo_pct": 100.0 * over / requests if requests else 0.0,
            "resizes": changes,
        }


class SimulatedPool:
    """The queueing model (see the module's docstring)."""

    def __init__(self, spec: PoolSpec, replicas: int) -> None:
        self.spec = spec
        self.idle = replicas
        self.busy: list[float] = []  # finish times of busy workers
        self.retiring = 0  # busy workers that leave when their request is done
        self.starting: list[float] = []  # ready times of workers asked for
        self.waiting: deque[int] = deque()

    @property
    def ready(self) -> int:
        return self.idle + len(self.busy) - self.retiring

    @property
    def paid(self) -> int:
        return self.ready + len(self.starting)

    def scale(self, now: float, replicas: int) -> None:
        """Ask for ``replicas`` workers: new ones start, surplus ones leave at once."""
        surplus = self.paid - replicas
        if surplus < 0:
            self.starting.extend([now + self.spec.cold_start_s] * -surplus)
            return
        cancel = min(surplus, len(self.starting))
        if cancel:
            self.starting.sort()
            del self.starting[len(self.starting) - cancel :]
            surplus -= cancel
        drop = min(surplus, self.idle)
        self.idle -= drop
        self.retiring += surplus - drop


def replay(
    trace: np.ndarray,
    policy: Autoscaler,
    pool: PoolSpec,
    *,
    initial_replicas: int,
    seed: int = 2,
) -> ReplayResult:
    """Replay ``trace`` against a simulated pool that ``policy`` resizes every interval.

    Arrivals and service times depend only on ``trace``, ``pool.seed`` and ``seed``, so two
    policies replayed on the same inputs see exactly the same requests."""
    settings = policy.settings
    slo = settings.slo_p95_ms / 1000.0
    interval = settings.interval_s
    rng = np.random.default_rng([seed, pool.seed])
    counts = rng.poisson(trace)
    arrivals = (np.repeat(np.arange(len(trace)), counts) + rng.random(int(counts.sum()))).tolist()
    arrivals.sort()
    service = rng.gamma(
        pool.service_shape, pool.mean_service_s / pool.service_shape, len(arrivals)
    ).tolist()
    windows = math.ceil(len(trace) / SLO_WINDOW_S)
    latencies: list[list[float]] = [[] for _ in range(windows)]
    done: dict[int, list[float]] = {}  # interval index -> latencies completed in it
    replica_s = np.zeros(windows)
    sim = SimulatedPool(pool, initial_replicas)
    result = ReplayResult(
        slo_ms=settings.slo_p95_ms,
        p95_ms=np.full(windows, np.nan),
        requests=np.zeros(windows, dtype=int),
        over_slo=np.zeros(windows, dtype=int),
        replica_s=replica_s,
    )
    busy, waiting = sim.busy, sim.waiting
    heappush, heappop = heapq.heappush, heapq.heappop

    def start(i: int, at: float) -> None:
        finish = at + service[i]
        heappush(busy, finish)
        latency = finish - arrivals[i]
        latencies[int(arrivals[i] // SLO_WINDOW_S)].append(latency)
        done.setdefault(int(finish // interval), []).append(latency)

    def free_until(t: float) -> None:
        while busy and busy[0] <= t:
            finish = heappop(busy)
            if sim.retiring:
                sim.retiring -= 1
            elif waiting:
                start(waiting.popleft(), finish)
            else:
                sim.idle += 1

    nxt = 0
    arrived_in_interval = 0
    next_decision = interval
    for second in range(len(trace)):
        end = second + 1.0
        while nxt < len(arrivals) and arrivals[nxt] < end:
            at = arrivals[nxt]
            free_until(at)
            if sim.idle:
                sim.idle -= 1
                start(nxt, at)
            else:
                waiting.append(nxt)
            nxt += 1
            arrived_in_interval += 1
        free_until(end)
        if sim.starting and min(sim.starting) <= end:
            now_ready = [r for r in sim.starting if r <= end]
            sim.starting = [r for r in sim.starting if r > end]
            sim.idle += len(now_ready)
            while sim.idle and waiting:
                sim.idle -= 1
                start(waiting.popleft(), end)
        replica_s[second // SLO_WINDOW_S] += sim.paid
        if end + 1e-9 >= next_decision:
            k = round(next_decision / interval) - 1
            served = done.pop(k, [])
            sample = PoolSample(
                at=end,
                replicas=sim.ready,
                arrivals_per_s=arrived_in_interval / interval,
                queue_depth=len(waiting),
                p95_ms=float(np.percentile(served, 95)) * 1000 if served else None,
                served_per_s=len(served) / interval,
                desired_replicas=sim.paid,
            )
            policy.observe(sample)
            decision = policy.decide(end)
            result.times.append(end)
            result.ready.append(sim.ready)
            result.decided.append(decision.replicas)
            result.reasons.append(decision.reason)
            sim.scale(end, decision.replicas)
            arrived_in_interval = 0
            next_decision += interval
    free_until(math.inf)  # the pool serves what is left after the trace ends
    for i in waiting:  # no worker left to serve them: they never complete
        latencies[int(arrivals[i] // SLO_WINDOW_S)].append(math.inf)
    for w, lat in enumerate(latencies):
        if lat:
            arr = np.asarray(lat)
            result.p95_ms[w] = float(np.percentile(arr, 95)) * 1000
            result.requests[w] = len(arr)
            result.over_slo[w] = int(np.sum(arr > slo))
    return result
