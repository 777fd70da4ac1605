"""Request-rate history and its Holt-Winters forecast (the one module that imports statsmodels).

The history is averaged into fixed bins (``season_s / season_points`` long), so a fit costs the
same whatever the sampling interval is, and bounded to ``history_s``. With two full seasons of
bins the model is additive Holt-Winters (damped trend + season); before that a damped Holt trend;
with fewer than :data:`MIN_TREND_POINTS` bins there is no forecast at all.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from edgefed.cloud.orchestration.errors import OrchestrationError
from edgefed.common.errors import TemporaryError

MIN_TREND_POINTS = 12
"""Bins a damped-trend fit needs before its forecast means anything."""

Forecaster = Callable[[Sequence[float], int | None, int], Sequence[float]]
"""``(rates per bin, season length in bins or None, steps) -> forecast rates per bin``."""


class ForecastFailed(OrchestrationError, TemporaryError):
    """The forecast could not be fitted or gave no finite answer; more history may help."""


def holt_winters(history: Sequence[float], season: int | None, steps: int) -> list[float]:
    """Fit statsmodels' ``ExponentialSmoothing`` on ``history`` and forecast ``steps`` bins.

    Additive seasonality (it copes with rates near 0, which multiplicative cannot), damped
    additive trend (an undamped trend extrapolated over a horizon overshoots on every ramp).
    Rates below 0 are clipped. Raises :class:`ForecastFailed` on any fit error or a non-finite
    forecast; statsmodels' convergence warnings are swallowed here, their effect is judged by
    the forecast's finiteness."""
    from statsmodels.tsa.holtwinters import ExponentialSmoothing

    y = np.asarray(history, dtype=float)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ExponentialSmoothing(
                y,
                trend="add",
                damped_trend=True,
                seasonal="add" if season else None,
                seasonal_periods=season,
                # Estimating one initial value per season point is most of a fit's cost (and
                # dozens of parameters from two seasons); the heuristic decomposes the first two
                # seasons instead and leaves only the smoothing weights to optimise.
                initialization_method="heuristic" if season else "estimated",
            )
            forecast = np.asarray(model.fit().forecast(steps), dtype=float)
    except (ValueError, ArithmeticError, np.linalg.LinAlgError) as exc:
        raise ForecastFailed(f"Holt-Winters fit failed: {exc}") from exc
    if forecast.shape != (steps,) or not np.all(np.isfinite(forecast)):
        raise ForecastFailed(
            f"Holt-Winters gave a non-finite forecast on {len(y)} points (is the history NaN?)"
        )
    return [max(0.0, float(v)) for v in forecast]


@dataclass(frozen=True)
class FittedForecast:
    """Rates per bin from ``first_bin`` on, as one fit predicted them."""

    first_bin: int
    rates: tuple[float, ...]
    seasonal: bool

    def peak(self, start_bin: int, end_bin: int) -> float | None:
        """The highest forecast rate over bins ``start_bin..end_bin``; None if not covered."""
        lo, hi = start_bin - self.first_bin, end_bin - self.first_bin
        if lo < 0 or hi >= len(self.rates):
            return None
        return max(self.rates[lo : hi + 1])


class RateHistory:
    """Arrival rates averaged into bins, bounded in length."""

    def __init__(self, bin_s: float, max_bins: int) -> None:
        self.bin_s = bin_s
        self.max_bins = max(1, max_bins)
        self._sums: dict[int, tuple[float, int]] = {}

    def bin_of(self, t: float) -> int:
        """Index of the bin containing time ``t`` (bins are aligned on multiples of bin_s)."""
        return math.floor(t / self.bin_s)

    def add(self, at: float, rate: float) -> None:
        """Add a rate measured over an interval ending at ``at`` (it belongs to the bin that
        holds the interval's end)."""
        b = self.bin_of(at - 1e-9)
        total, n = self._sums.get(b, (0.0, 0))
        self._sums[b] = (total + rate, n + 1)
        cutoff = b - self.max_bins
        for old in [k for k in self._sums if k <= cutoff]:
            del self._sums[old]

    def complete(self, now: float) -> tuple[int, list[float]]:
        """``(first bin, rates)`` of the bins finished before ``now``, gaps interpolated."""
        last = self.bin_of(now - 1e-9) - 1
        keys = sorted(k for k in self._sums if k <= last)
        if not keys:
            return last + 1, []
        first = keys[0]
        xs = np.asarray(keys, dtype=float)
        ys = np.asarray([self._sums[k][0] / self._sums[k][1] for k in keys])
        grid = np.arange(first, last + 1, dtype=float)
        return first, [float(v) for v in np.interp(grid, xs, ys)]
