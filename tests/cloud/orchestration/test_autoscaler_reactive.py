"""The reactive autoscaler (Kubernetes' HPA rule) on synthetic load: hand-made pool samples for
the rule itself, and synthetic traces replayed against the simulated worker pool
(``simulation.autoscale_sim``, a queueing model with cold starts) for the closed loop."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from pydantic import ValidationError

from edgefed.cloud.orchestration.autoscaler import (
    Autoscaler,
    HoldingAutoscaler,
    InvalidSample,
    NoPoolSample,
    PredictiveAutoscaler,
    ReactiveAutoscaler,
    make_autoscaler,
)
from edgefed.cloud.orchestration.hpa import hpa_replicas
from edgefed.cloud.orchestration.signals import AutoscalerSettings, PoolSample
from edgefed.common.errors import PermanentError, TemporaryError
from edgefed.simulation.autoscale_sim import PoolSpec, replay

SLO = 200.0
CAPACITY = 20.0
"""Requests per second one worker serves (configured, so the utilisation metric is known)."""
AT_TARGET = CAPACITY * 0.7
"""Requests per second per worker that hold utilisation on its 70 % target."""


def settings(**kw: object) -> AutoscalerSettings:
    return AutoscalerSettings.model_validate(
        {"max_replicas": 20, "slo_p95_ms": SLO, "capacity_rps_per_replica": CAPACITY, **kw}
    )


def sample(
    at: float,
    replicas: int,
    *,
    queue: int = 0,
    p95: float | None = 100.0,
    arrivals: float | None = None,
    desired: int | None = None,
) -> PoolSample:
    """A consistent sample: by default the load holds utilisation on target, so only the metric
    a test sets moves the pool."""
    if arrivals is None:
        arrivals = AT_TARGET * replicas
    return PoolSample(
        at=at,
        replicas=replicas,
        arrivals_per_s=arrivals,
        queue_depth=queue,
        p95_ms=p95,
        served_per_s=arrivals,
        desired_replicas=replicas if desired is None else desired,
    )


def step(scaler: Autoscaler, s: PoolSample) -> int:
    scaler.observe(s)
    return scaler.decide(s.at).replicas


def direction_changes(replicas: list[int]) -> int:
    moves = [b > a for a, b in itertools.pairwise(replicas) if a != b]
    return sum(1 for a, b in itertools.pairwise(moves) if a != b)


def flat_then_burst(before_s: int, burst_s: int, rps: float, factor: float) -> np.ndarray:
    return np.concatenate([np.full(before_s, rps), np.full(burst_s, rps * factor)])


# --------------------------------------------------------------------------- the HPA formula


def test_hpa_formula_is_ceil_of_ready_times_ratio_outside_tolerance() -> None:
    assert hpa_replicas(ready=5, current=5, ratio=1.2, tolerance=0.1) == 6
    assert hpa_replicas(ready=5, current=5, ratio=1.21, tolerance=0.1) == 7
    assert hpa_replicas(ready=5, current=5, ratio=1.1, tolerance=0.1) == 5  # inside
    assert hpa_replicas(ready=5, current=5, ratio=0.5, tolerance=0.1) == 3


def test_queue_depth_drives_a_scale_up_and_the_reason_says_so() -> None:
    scaler = ReactiveAutoscaler(settings())
    scaler.observe(sample(15, 4, queue=64))  # 16 waiting per worker vs target 4
    decision = scaler.decide(15)
    assert decision.replicas == 16
    assert decision.reason.startswith("scale up 4 -> 16: queue drove it")
    assert decision.inputs["desired_queue"] == 16


def test_latency_drives_a_scale_up_when_the_queue_is_short() -> None:
    scaler = ReactiveAutoscaler(settings())
    scaler.observe(sample(15, 4, queue=16, p95=400.0))  # queue on target, p95 2x the SLO
    decision = scaler.decide(15)
    assert decision.replicas == 8
    assert "latency drove it (p95 400 ms vs SLO 200 ms)" in decision.reason


def test_a_pool_at_zero_workers_scales_to_one_when_requests_arrive() -> None:
    scaler = ReactiveAutoscaler(settings(min_replicas=0))
    decision = step(scaler, sample(15, 0, queue=0, p95=None, arrivals=0.2))
    assert decision == 1


def test_an_idle_pool_without_latency_shrinks_to_min_after_the_window() -> None:
    scaler = ReactiveAutoscaler(settings(min_replicas=0, scale_down_stabilization_s=60))
    decisions = [
        step(scaler, sample(t, 3, queue=0, p95=None, arrivals=0.0, desired=None))
        for t in range(15, 150, 15)
    ]
    assert decisions[0] == 3  # the pool's starting size counts for the window
    assert decisions[-1] == 0


def test_nothing_served_while_requests_wait_is_no_reason_to_shrink() -> None:
    scaler = ReactiveAutoscaler(settings(scale_down_stabilization_s=0))
    # Workers are busy with long requests: nothing finished, 12 waiting on 3 workers (on target).
    assert step(scaler, sample(15, 3, queue=12, p95=None)) == 3


# --------------------------------------------------------------------------- stabilisation


@pytest.mark.parametrize("up_window", [0.0, 60.0])
def test_a_burst_scales_up_within_the_up_window_plus_one_interval(up_window: float) -> None:
    config = settings(
        max_replicas=40, scale_up_stabilization_s=up_window, scale_down_stabilization_s=3600
    )
    burst_at = 600
    trace = flat_then_burst(burst_at, 300, rps=60.0, factor=3.0)  # 60 -> 180 req/s

    result = replay(trace, ReactiveAutoscaler(config), PoolSpec(), initial_replicas=5)

    before = [d for t, d in zip(result.times, result.decided, strict=True) if t <= burst_at]
    assert max(before) == 5, "no scale-up before the burst"
    first_up = next(
        t for t, d in zip(result.times, result.decided, strict=True) if t > burst_at and d > 5
    )
    assert first_up <= burst_at + up_window + config.interval_s
    assert max(result.decided) >= 9  # 180 req/s needs at least 9 workers of 20 req/s


def test_a_one_sample_spike_does_not_scale_up_inside_the_up_window() -> None:
    scaler = ReactiveAutoscaler(settings(scale_up_stabilization_s=60))
    decisions = []
    for i, t in enumerate(range(15, 600, 15)):
        p95 = 3 * SLO if i % 5 == 4 else SLO  # every fifth sample spikes to 3x the SLO
        decisions.append(step(scaler, sample(t, 6, queue=24, p95=p95, desired=None)))
    assert set(decisions) == {6}


def test_noise_within_tolerance_does_not_flap() -> None:
    rng = np.random.default_rng(7)
    scaler = ReactiveAutoscaler(settings(scale_down_stabilization_s=0))
    decisions = []
    for t in range(15, 3600, 15):  # an hour of samples, both metrics within +-9 % of target
        queue = round(6 * 4 * rng.uniform(0.92, 1.08))
        p95 = SLO * rng.uniform(0.91, 1.09)
        decisions.append(step(scaler, sample(t, 6, queue=queue, p95=p95)))
    assert set(decisions) == {6}
    assert direction_changes(decisions) == 0


def test_scale_down_waits_for_the_down_window() -> None:
    scaler = ReactiveAutoscaler(settings(scale_down_stabilization_s=300))
    busy = [step(scaler, sample(t, 10, queue=40, p95=SLO)) for t in range(15, 315, 15)]
    assert set(busy) == {10}
    last_busy = 300
    # Load falls to 40 % of what 10 workers hold at target: utilisation and latency both say 4.
    quiet = {
        t: step(scaler, sample(t, 10, queue=0, p95=80.0, arrivals=AT_TARGET * 4))
        for t in range(315, 900, 15)
    }
    assert all(quiet[t] == 10 for t in quiet if t < last_busy + 300)
    assert quiet[last_busy + 300] == 4  # ceil(10 x 80 / 200) = ceil(10 x 0.4)


# --------------------------------------------------------------------------- bounds


def test_max_replicas_holds_under_extreme_load() -> None:
    config = settings(min_replicas=2, max_replicas=6)
    trace = np.full(900, 2000.0)  # 100x what 6 workers serve

    result = replay(trace, ReactiveAutoscaler(config), PoolSpec(), initial_replicas=2)

    assert max(result.decided) == 6
    assert result.decided[-1] == 6
    assert "clamped to max_replicas 6" in result.reasons[-1]


def test_min_replicas_holds_at_zero_load() -> None:
    config = settings(min_replicas=2, max_replicas=6, scale_down_stabilization_s=120)
    trace = np.zeros(900)

    result = replay(trace, ReactiveAutoscaler(config), PoolSpec(), initial_replicas=5)

    assert min(result.decided) == 2
    assert result.decided[-1] == 2


def test_zero_load_with_min_zero_scales_the_pool_away_and_back() -> None:
    config = settings(min_replicas=0, scale_down_stabilization_s=60)
    trace = np.concatenate([np.zeros(300), np.full(300, 10.0)])

    result = replay(trace, ReactiveAutoscaler(config), PoolSpec(), initial_replicas=2)

    idle = [d for t, d in zip(result.times, result.decided, strict=True) if 100 < t <= 300]
    assert set(idle) == {0}
    assert result.decided[-1] >= 1
    assert result.summary(420)["requests"] > 0  # served once a worker came back


# --------------------------------------------------------------------------- input and settings


def test_decide_before_any_sample_is_a_temporary_error() -> None:
    with pytest.raises(NoPoolSample, match="observe") as info:
        ReactiveAutoscaler(settings()).decide(0.0)
    assert isinstance(info.value, TemporaryError)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (sample(15, 2, arrivals=math.nan), "arrivals_per_s"),
        (sample(15, 2, queue=-1), "queue_depth"),
        (sample(15, -1), "replicas"),
        (sample(15, 2, p95=math.inf), "p95_ms"),
    ],
)
def test_an_impossible_sample_is_refused_naming_the_field(bad: PoolSample, field: str) -> None:
    with pytest.raises(InvalidSample, match=field) as info:
        ReactiveAutoscaler(settings()).observe(bad)
    assert isinstance(info.value, PermanentError)


def test_samples_out_of_time_order_are_refused() -> None:
    scaler = ReactiveAutoscaler(settings())
    scaler.observe(sample(30, 2))
    with pytest.raises(InvalidSample, match="older than the previous"):
        scaler.observe(sample(15, 2))


def test_a_stale_sample_keeps_the_pool_as_it_is() -> None:
    scaler = ReactiveAutoscaler(settings())
    scaler.observe(sample(15, 3, queue=100))
    decision = scaler.decide(15 + 4 * 15)
    assert decision.replicas == 3
    assert "old" in decision.reason


def test_min_above_max_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"min_replicas \(5\) is above max_replicas \(3\)"):
        AutoscalerSettings(min_replicas=5, max_replicas=3)


def test_a_forecast_horizon_shorter_than_an_interval_is_refused() -> None:
    with pytest.raises(ValidationError, match="forecast_horizon_s must be at least interval_s"):
        AutoscalerSettings(mode="predictive", interval_s=30, forecast_horizon_s=10)


def test_make_autoscaler_follows_the_mode() -> None:
    assert isinstance(make_autoscaler(settings(mode="reactive")), ReactiveAutoscaler)
    assert isinstance(make_autoscaler(settings(mode="predictive")), PredictiveAutoscaler)
    off = make_autoscaler(settings(mode="off", min_replicas=2, max_replicas=4))
    assert isinstance(off, HoldingAutoscaler)
    assert isinstance(off, Autoscaler)
    off.observe(sample(15, 9, queue=500))  # outside [min, max] and overloaded: still kept
    assert off.decide(15).replicas == 9
    assert "off" in off.decide(15).reason


@pytest.mark.parametrize("capacity", [CAPACITY, None], ids=["configured", "learnt"])
def test_a_flat_load_settles_instead_of_cycling(capacity: float | None) -> None:
    """Queue and latency alone shrink a lightly loaded pool until a queue forms, then overshoot
    (a limit cycle); utilisation holds the pool once a worker's capacity is known, configured
    or learnt from the first saturated samples."""
    config = settings(
        capacity_rps_per_replica=capacity, max_replicas=40, scale_down_stabilization_s=300
    )
    trace = np.full(3 * 3600, 100.0)  # 100 req/s for three hours: 5 workers at 100 %

    result = replay(trace, ReactiveAutoscaler(config), PoolSpec(), initial_replicas=12, seed=3)

    settled = [d for t, d in zip(result.times, result.decided, strict=True) if t > 3600]
    assert direction_changes(settled) == 0
    assert max(settled) - min(settled) <= 1
    assert 6 <= min(settled) <= 9  # 100 / (capacity x 70 %) = 7.1, give or take the estimate
