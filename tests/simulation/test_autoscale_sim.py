"""The simulated worker pool the autoscaler bench replays traces against: cold starts, what
replica-minutes count, queueing latency, and the traces themselves."""

from __future__ import annotations

import numpy as np
import pytest

from edgefed.cloud.orchestration.signals import AutoscalerSettings, PoolSample, ScaleDecision
from edgefed.simulation.autoscale_sim import (
    SLO_WINDOW_S,
    PoolSpec,
    StaticPolicy,
    TraceSpec,
    make_trace,
    replay,
    static_replicas,
)


class Scripted:
    """Asks for ``then`` workers from ``at`` on; records every sample it is shown."""

    def __init__(self, settings: AutoscalerSettings, before: int, then: int, at: float) -> None:
        self.settings = settings
        self.before, self.then, self.at = before, then, at
        self.samples: list[PoolSample] = []

    def observe(self, sample: PoolSample) -> None:
        self.samples.append(sample)

    def decide(self, now: float) -> ScaleDecision:
        return ScaleDecision(self.then if now >= self.at else self.before, "scripted", now)


def test_a_new_worker_is_paid_from_the_request_and_ready_after_the_cold_start() -> None:
    settings = AutoscalerSettings(interval_s=15)
    policy = Scripted(settings, before=1, then=3, at=60)
    pool = PoolSpec(cold_start_s=60)

    result = replay(np.full(240, 5.0), policy, pool, initial_replicas=1)

    ready = {s.at: s.replicas for s in policy.samples}
    paid = {s.at: s.desired_replicas for s in policy.samples}
    assert ready[105] == 1  # asked at 60, still starting at 105
    assert paid[105] == 3
    assert ready[120] == 3
    # window 0: 1 worker x 60 s; window 1 (60-120 s): 3 paid x 60 s
    assert result.replica_s[0] == 60
    assert result.replica_s[1] == 180


def test_removal_is_immediate() -> None:
    settings = AutoscalerSettings(interval_s=15)
    policy = Scripted(settings, before=4, then=1, at=60)

    result = replay(np.full(180, 5.0), policy, PoolSpec(), initial_replicas=4)

    assert result.replica_s[0] == 4 * 60
    assert result.replica_s[1] == 60
    assert {s.replicas for s in policy.samples if s.at > 60} == {1}


def test_an_overloaded_pool_queues_and_violates_the_slo() -> None:
    settings = AutoscalerSettings(interval_s=15, slo_p95_ms=200)
    trace = np.full(600, 30.0)  # one worker serves 20 req/s
    result = replay(trace, StaticPolicy(settings, 1), PoolSpec(), initial_replicas=1)
    summary = result.summary()
    assert summary["slo_violations"] == summary["windows"] == 600 // SLO_WINDOW_S
    assert summary["requests"] == pytest.approx(30 * 600, rel=0.05)  # every request counted

    relaxed = replay(trace, StaticPolicy(settings, 3), PoolSpec(), initial_replicas=3)
    assert relaxed.summary()["slo_violations"] == 0


def test_same_seeds_give_the_same_replay() -> None:
    settings = AutoscalerSettings(interval_s=15)
    trace = make_trace(TraceSpec(seasons=1, season_s=600))
    a = replay(trace, StaticPolicy(settings, 6), PoolSpec(), initial_replicas=6)
    b = replay(trace, StaticPolicy(settings, 6), PoolSpec(), initial_replicas=6)
    assert np.array_equal(a.p95_ms, b.p95_ms, equal_nan=True)


def test_the_trace_has_a_diurnal_cycle_and_recurring_bursts() -> None:
    spec = TraceSpec(seasons=2, season_s=3600, random_bursts_per_season=0, noise=0.0)
    trace = make_trace(spec)
    assert trace[0] == pytest.approx(40.0)  # trough: (1 - 0.6) x 100
    assert trace[1800] == pytest.approx(160.0)  # crest
    burst = int(0.3 * 3600)
    assert trace[burst + 10] == pytest.approx(3 * trace[burst - 10], rel=0.05)
    assert trace[3600 + burst + 10] == pytest.approx(trace[burst + 10])  # same time next day


def test_static_sizing_at_peak_needs_more_workers_than_at_mean() -> None:
    trace = make_trace(TraceSpec(seasons=1, season_s=3600))
    mean = static_replicas(trace, 20.0, 0.7, "mean")
    peak = static_replicas(trace, 20.0, 0.7, "peak")
    assert peak > 2 * mean
    with pytest.raises(ValueError, match="'mean' or 'peak'"):
        static_replicas(trace, 20.0, 0.7, "median")
