"""The predictive autoscaler: the reactive HPA rule plus a third metric, the forecast rate.

Every sample's arrival rate goes into a bounded, binned history (``forecast.RateHistory``); at
most once per ``refit_every_samples`` a Holt-Winters model is fitted on it and its forecast kept.
At each decision the highest forecast rate over ``[now, now + forecast_horizon_s]`` divided by
what a worker serves at ``target_utilisation`` is one more HPA proposal, so the answer is the
larger of the reactive one and the forecast one: a surprise the forecast missed is still met
reactively, and a forecast that fails (or is not available yet) leaves the reactive answer,
with the reason saying so.

A worker's capacity is the reactive rule's (``hpa.CapacityEstimate``): configured, or learnt
from saturated samples that met the SLO.
"""

from __future__ import annotations

import math

from edgefed.cloud.orchestration.forecast import (
    MIN_TREND_POINTS,
    FittedForecast,
    Forecaster,
    RateHistory,
    holt_winters,
)
from edgefed.cloud.orchestration.hpa import Proposal, hpa_replicas
from edgefed.cloud.orchestration.reactive import ReactiveAutoscaler
from edgefed.cloud.orchestration.signals import AutoscalerSettings, PoolSample


class PredictiveAutoscaler(ReactiveAutoscaler):
    """Reactive HPA rule + a Holt-Winters forecast of the request rate, the larger wins."""

    def __init__(
        self, settings: AutoscalerSettings, *, forecaster: Forecaster = holt_winters
    ) -> None:
        super().__init__(settings)
        self._forecaster = forecaster
        bin_s = settings.season_s / settings.season_points
        # +1: the bin being filled is kept beside history_s worth of complete ones.
        self._history = RateHistory(bin_s, max_bins=int(settings.history_s // bin_s) + 1)
        self._fitted: FittedForecast | None = None
        self._failure: str | None = None
        self._since_fit: int | None = None
        self.fits = 0
        """Fits attempted so far (the cost the bench reports)."""

    def _observed(self, sample: PoolSample) -> None:
        super()._observed(sample)
        self._history.add(sample.at, sample.arrivals_per_s)
        if self._since_fit is not None:
            self._since_fit += 1

    def _refit(self, now: float) -> None:
        """Fit when due: at most once per ``refit_every_samples`` samples, and only when a bin
        has completed since the last fit (with quarter-hour bins, not every 2 minutes)."""
        if self._since_fit is not None and self._since_fit < self.settings.refit_every_samples:
            return
        first, rates = self._history.complete(now)
        if len(rates) < MIN_TREND_POINTS:
            return
        season_points = self.settings.season_points
        season = season_points if len(rates) >= 2 * season_points else None
        history = self._history
        ahead_s = (
            self.settings.forecast_horizon_s
            + (self.settings.refit_every_samples + 1) * self.settings.interval_s
        )
        last_needed = history.bin_of(now + ahead_s)
        next_bin = first + len(rates)
        fitted = self._fitted
        if (
            fitted is not None
            and fitted.first_bin == next_bin
            and fitted.peak(last_needed, last_needed) is not None
        ):
            return  # no bin completed since that fit, and its forecast reaches far enough
        steps = last_needed - next_bin + 2  # one bin more: it lasts until the next bin completes
        self._since_fit = 0
        self.fits += 1
        try:
            forecast = [float(v) for v in self._forecaster(rates, season, steps)]
            if len(forecast) != steps or not all(math.isfinite(v) for v in forecast):
                raise ValueError(f"{len(forecast)} values, not {steps} finite ones")
        except Exception as exc:  # noqa: BLE001 - any forecaster failure falls back to reactive
            self._fitted = None
            self._failure = f"{type(exc).__name__}: {exc}"
            return
        self._failure = None
        self._fitted = FittedForecast(next_bin, tuple(forecast), seasonal=season is not None)

    def _extra_proposals(
        self, now: float, current: int, inputs: dict[str, float], notes: list[str]
    ) -> list[Proposal]:
        self._refit(now)
        if self._failure is not None:
            notes.append(f"forecast failed ({self._failure}), reactive only")
            return []
        fitted = self._fitted
        if fitted is None:
            notes.append("not enough rate history to forecast yet")
            return []
        history = self._history
        end = now + self.settings.forecast_horizon_s
        peak = fitted.peak(history.bin_of(now), history.bin_of(end))
        if peak is None:
            notes.append("forecast does not reach the horizon, reactive only")
            return []
        capacity = self._capacity.rps
        inputs["forecast_rps"] = peak
        if capacity is None:
            notes.append("worker capacity not learnt yet, reactive only")
            return []
        inputs["capacity_rps"] = capacity
        per_worker = capacity * self.settings.target_utilisation
        if current > 0:
            replicas = hpa_replicas(
                current, current, peak / (current * per_worker), self.settings.tolerance
            )
        else:
            replicas = math.ceil(peak / per_worker)
        kind = "Holt-Winters seasonal" if fitted.seasonal else "damped trend"
        detail = (
            f"{peak:.1f} req/s expected within {self.settings.forecast_horizon_s:g} s "
            f"({kind}), {capacity:.1f} req/s/worker at "
            f"{self.settings.target_utilisation:.0%}"
        )
        return [Proposal("forecast", replicas, detail)]
