"""The predictive autoscaler on synthetic seasonal traces replayed against the simulated worker
pool (``simulation.autoscale_sim``), and its fall-backs: a failing forecast, no capacity yet.
The forecast is statsmodels' real Holt-Winters; seasons are compressed to 15 minutes so that a
test sees several of them in seconds."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pytest

from edgefed.cloud.orchestration.forecast import ForecastFailed, RateHistory, holt_winters
from edgefed.cloud.orchestration.hpa import CapacityEstimate
from edgefed.cloud.orchestration.predictive import PredictiveAutoscaler
from edgefed.cloud.orchestration.reactive import ReactiveAutoscaler
from edgefed.cloud.orchestration.signals import AutoscalerSettings, PoolSample
from edgefed.simulation.autoscale_sim import PoolSpec, replay

SEASON = 900
BURST_AT = 600  # seconds into each season
BURST_S = 120


def settings(**kw: object) -> AutoscalerSettings:
    base: dict[str, object] = {
        "mode": "predictive",
        "max_replicas": 30,
        "season_s": SEASON,
        "season_points": 60,  # 15 s bins
        "history_s": 2 * SEASON,
        "forecast_horizon_s": 120,
        "capacity_rps_per_replica": 20.0,
    }
    return AutoscalerSettings.model_validate({**base, **kw})


def recurring_peak_trace(seasons: int) -> np.ndarray:
    """40 req/s, and 160 req/s for two minutes at the same time of every season."""
    day = np.full(SEASON, 40.0)
    day[BURST_AT : BURST_AT + BURST_S] = 160.0
    return np.tile(day, seasons)


def replicas_at(times: list[float], decided: list[int], t: float) -> int:
    return next(d for at, d in zip(times, decided, strict=True) if at >= t)


def test_predictive_scales_ahead_of_a_recurring_peak_and_reactive_does_not() -> None:
    trace = recurring_peak_trace(seasons=4)
    config = settings()
    third_peak = 2 * SEASON + BURST_AT  # the first peak after two seasons of history
    fourth_peak = 3 * SEASON + BURST_AT

    predictive = replay(trace, PredictiveAutoscaler(config), PoolSpec(), initial_replicas=3)
    reactive = replay(
        trace, ReactiveAutoscaler(config.model_copy(update={"mode": "reactive"})), PoolSpec(),
        initial_replicas=3,
    )  # fmt: skip

    for peak in (third_peak, fourth_peak):
        quiet = replicas_at(predictive.times, predictive.decided, peak - 240)
        ahead = replicas_at(predictive.times, predictive.decided, peak - 60)
        assert ahead > quiet, f"no scale-up in the minute before the peak at {peak}"
        assert ahead >= math.ceil(160 / (20 * 0.7)) - 1
        assert replicas_at(reactive.times, reactive.decided, peak - 60) < ahead
        assert "Holt-Winters seasonal" in predictive.reasons[predictive.times.index(peak - 60)]
    late = 2 * SEASON
    assert predictive.summary(late)["slo_violations"] < reactive.summary(late)["slo_violations"]


def test_a_failing_forecast_falls_back_to_the_reactive_answer() -> None:
    def broken(history: Sequence[float], season: int | None, steps: int) -> Sequence[float]:
        raise ForecastFailed("optimizer diverged")

    trace = recurring_peak_trace(seasons=1)
    config = settings()
    predictive = replay(
        trace, PredictiveAutoscaler(config, forecaster=broken), PoolSpec(), initial_replicas=3
    )
    reactive = replay(trace, ReactiveAutoscaler(config), PoolSpec(), initial_replicas=3)

    assert predictive.decided == reactive.decided
    assert (
        "forecast failed (ForecastFailed: optimizer diverged), reactive only"
        in (predictive.reasons[-1])
    )


def test_a_forecast_of_nan_falls_back_to_the_reactive_answer() -> None:
    def nan(history: Sequence[float], season: int | None, steps: int) -> Sequence[float]:
        return [math.nan] * steps

    trace = recurring_peak_trace(seasons=1)
    predictive = replay(
        trace, PredictiveAutoscaler(settings(), forecaster=nan), PoolSpec(), initial_replicas=3
    )
    reactive = replay(trace, ReactiveAutoscaler(settings()), PoolSpec(), initial_replicas=3)

    assert predictive.decided == reactive.decided
    assert "forecast failed" in predictive.reasons[-1]


def test_holt_winters_on_a_nan_history_raises_forecast_failed() -> None:
    history = [40.0] * 30 + [math.nan] + [40.0] * 30
    with pytest.raises(ForecastFailed, match="non-finite"):
        holt_winters(history, None, 4)


def test_holt_winters_learns_a_season() -> None:
    day = [10.0] * 20 + [50.0] * 5 + [10.0] * 15
    forecast = holt_winters(day * 3, 40, 40)
    assert max(forecast[18:27]) > 35
    assert forecast[5] < 20


def test_fits_are_bounded_by_refit_every_samples() -> None:
    trace = recurring_peak_trace(seasons=2)
    scaler = PredictiveAutoscaler(settings(refit_every_samples=8))
    result = replay(trace, scaler, PoolSpec(), initial_replicas=3)
    assert 0 < scaler.fits <= len(result.times) // 8 + 1


def test_no_refit_without_a_new_bin_of_history() -> None:
    day = settings(season_s=86_400, season_points=96, history_s=172_800)  # 900 s bins
    scaler = PredictiveAutoscaler(day)
    fits_at: dict[float, int] = {}
    for t in range(15, 6 * 3600, 15):  # six hours of 15 s samples = 24 bins
        scaler.observe(PoolSample(t, 4, 40.0, 0, 90.0, 40.0, desired_replicas=4))
        scaler.decide(t)
        fits_at[t] = scaler.fits
    assert fits_at[3 * 3600 + 15] == 1  # first fit once 12 bins are complete
    assert scaler.fits <= 12 + 1  # then about one a bin, not one per 8 samples (80)


def test_no_forecast_replicas_until_the_capacity_is_learnt() -> None:
    scaler = PredictiveAutoscaler(settings(capacity_rps_per_replica=None))
    for t in range(15, 600, 15):  # a calm pool: never saturated, so no capacity evidence
        scaler.observe(PoolSample(t, 4, 40.0, 0, 90.0, 40.0, desired_replicas=4))
    decision = scaler.decide(585)
    assert "worker capacity not learnt yet, reactive only" in decision.reason
    assert "desired_forecast" not in decision.inputs


def test_capacity_is_learnt_from_saturated_samples_within_the_slo() -> None:
    estimate = CapacityEstimate(settings(capacity_rps_per_replica=None))
    for served in (18.0, 19.0, 19.5, 19.0):
        estimate.observe(PoolSample(0, 4, 90.0, 6, 150.0, 4 * served))  # queued, p95 in SLO
    estimate.observe(PoolSample(0, 4, 90.0, 60, 900.0, 4 * 25.0))  # over the SLO: ignored
    estimate.observe(PoolSample(0, 4, 30.0, 0, 80.0, 4 * 7.5))  # not saturated: ignored
    assert estimate.rps == pytest.approx(19.35, abs=0.1)


def test_the_rate_history_stays_bounded() -> None:
    history = RateHistory(bin_s=15.0, max_bins=10)
    for t in range(15, 15 * 200, 15):
        history.add(t, 1.0)
    first, rates = history.complete(15 * 200)
    assert len(rates) == 10
    assert first + len(rates) - 1 == 198  # the last complete bin before t = 3000


def test_a_steady_noisy_load_settles_without_flapping() -> None:
    rng = np.random.default_rng(3)
    trace = 100.0 * (1 + rng.normal(0, 0.05, 3600))
    result = replay(trace, PredictiveAutoscaler(settings()), PoolSpec(), initial_replicas=8)
    settled = [d for t, d in zip(result.times, result.decided, strict=True) if t > 1800]
    moves = [b > a for a, b in itertools.pairwise(settled) if a != b]
    assert len(moves) <= 1
    assert result.summary(1800)["slo_violations"] == 0
