"""The autoscaler of a cloud worker pool: what the controller and the simulation harness call.

The caller samples the pool every ``interval_s`` (:class:`PoolSample`), hands the sample to
``observe`` and applies ``decide(now).replicas`` through a
:class:`~edgefed.cloud.orchestration.scaler.WorkerScaler`. Which algorithm answers is the
settings' ``mode``: ``reactive`` (the HPA rule), ``predictive`` (the HPA rule plus a
Holt-Winters forecast), or ``off`` (the pool keeps whatever size it has).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from edgefed.cloud.orchestration.hpa import InvalidSample, NoPoolSample, check_sample
from edgefed.cloud.orchestration.predictive import PredictiveAutoscaler
from edgefed.cloud.orchestration.reactive import ReactiveAutoscaler
from edgefed.cloud.orchestration.signals import AutoscalerSettings, PoolSample, ScaleDecision

__all__ = [
    "Autoscaler",
    "HoldingAutoscaler",
    "InvalidSample",
    "NoPoolSample",
    "PredictiveAutoscaler",
    "ReactiveAutoscaler",
    "make_autoscaler",
]


@runtime_checkable
class Autoscaler(Protocol):
    """Reads pool samples, answers how many workers the pool should have."""

    settings: AutoscalerSettings

    def observe(self, sample: PoolSample) -> None:
        """Take the pool's sample for the interval ending at ``sample.at``."""
        ...

    def decide(self, now: float) -> ScaleDecision:
        """The pool's size at ``now`` (within [min, max] except in mode ``off``), with why."""
        ...


class HoldingAutoscaler:
    """Mode ``off``: decisions keep the pool at the size it has (nothing is resized, not even
    into [min, max]), so a loop that always runs an autoscaler needs no special case."""

    def __init__(self, settings: AutoscalerSettings) -> None:
        self.settings = settings
        self._last: PoolSample | None = None

    def observe(self, sample: PoolSample) -> None:
        check_sample(sample, self._last)
        self._last = sample

    def decide(self, now: float) -> ScaleDecision:
        if self._last is None:
            raise NoPoolSample("no pool sample observed yet: call observe() before decide()")
        sample = self._last
        current = sample.replicas if sample.desired_replicas is None else sample.desired_replicas
        return ScaleDecision(
            replicas=current,
            reason=f"keep {current}: autoscaling is off",
            at=now,
            inputs={"current": float(current)},
        )


def make_autoscaler(settings: AutoscalerSettings) -> Autoscaler:
    """The autoscaler the settings' ``mode`` names."""
    if settings.mode == "predictive":
        return PredictiveAutoscaler(settings)
    if settings.mode == "reactive":
        return ReactiveAutoscaler(settings)
    return HoldingAutoscaler(settings)
