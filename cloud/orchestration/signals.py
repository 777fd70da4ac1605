"""What the autoscaler reads and decides, shared by its algorithms (``autoscaler.py``), the
controller's pool monitor, the simulation harness and ``bench/autoscale.py``.

Times are seconds on any monotonic clock (simulated time in the bench): the autoscaler never
reads a clock itself, which is what makes it testable on synthetic traces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


@dataclass(frozen=True)
class PoolSample:
    """One observation of a worker pool over the interval that ends at ``at``."""

    at: float
    """End of the interval (seconds, monotonic)."""
    replicas: int
    """Workers ready to serve at ``at``."""
    arrivals_per_s: float
    """Requests that reached the pool per second over the interval."""
    queue_depth: int
    """Requests waiting (not yet being served) across the pool at ``at``."""
    p95_ms: float | None
    """95th percentile of request latency over the interval; None when nothing was served."""
    served_per_s: float = 0.0
    """Requests completed per second over the interval."""
    desired_replicas: int | None = None
    """Workers asked for at ``at``, ready or still starting (a Deployment's ``spec.replicas``);
    None when the monitor does not know, and the autoscaler then uses its own last decision."""


@dataclass(frozen=True)
class ResourceUsage:
    """What one worker used, sampled (for vertical hints)."""

    at: float
    cpu_cores: float
    """CPU cores in use on average since the previous sample."""
    memory_bytes: int
    """Resident set size."""


@dataclass(frozen=True)
class ScaleDecision:
    """How many workers the pool should have, and why (logged, shown by the API)."""

    replicas: int
    reason: str
    at: float
    inputs: dict[str, float] = field(default_factory=dict)
    """The figures behind the decision (desired by queue, by latency, forecast, ...)."""


class AutoscalerSettings(BaseModel):
    """Autoscaling of one cloud worker pool (``[controller.autoscaler.POOL]``).

    ``reactive`` is Kubernetes' HPA rule (desired = ceil(current × metric / target), no change
    inside ``tolerance``, scale-down only to the highest recommendation of the last
    ``scale_down_stabilization_s``) on two metrics, queue depth per worker and p95 latency against
    ``slo_p95_ms``, taking the larger. ``predictive`` adds a Holt-Winters forecast of the request
    rate ``forecast_horizon_s`` ahead (seasonal period ``season_s``) divided by the capacity of
    one worker, and takes the larger of that and the reactive answer."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["off", "reactive", "predictive"] = "reactive"
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=10, ge=1)
    interval_s: float = Field(default=15.0, gt=0)
    """How often the pool is sampled and a decision is taken."""
    target_queue_per_replica: float = Field(default=4.0, gt=0)
    """Waiting requests per worker the pool should hold at most."""
    slo_p95_ms: float = Field(default=200.0, gt=0)
    """The latency objective: p95 over an interval above this is a violation."""
    tolerance: float = Field(default=0.1, ge=0, lt=1)
    """No change while the metric is within this fraction of its target (HPA default 0.1)."""
    scale_up_stabilization_s: float = Field(default=0.0, ge=0)
    """Scale up to the lowest recommendation of this window (HPA default 0: at once)."""
    scale_down_stabilization_s: float = Field(default=300.0, ge=0)
    """Scale down only to the highest recommendation of this window (HPA default 300 s)."""
    capacity_rps_per_replica: float | None = Field(default=None, gt=0)
    """Requests per second one worker serves within the SLO; learnt from samples when unset."""
    target_utilisation: float = Field(default=0.7, gt=0, le=1)
    """Predictive: plan for workers this busy at the forecast rate (headroom for noise)."""
    forecast_horizon_s: float = Field(default=120.0, gt=0)
    """Predictive: how far ahead to provision (at least a worker's start-up time)."""
    season_s: float = Field(default=86_400.0, gt=0)
    """Predictive: the period of the load's cycle (a day for diurnal traffic)."""
    history_s: float = Field(default=172_800.0, gt=0)
    """Predictive: how much rate history the forecast is fitted on (two seasons by default)."""
    season_points: int = Field(default=96, ge=4, le=2_000)
    """Predictive: the rate history is averaged into this many points per season before fitting,
    which bounds the cost of a fit whatever ``interval_s`` is (96: quarter-hours of a day)."""
    refit_every_samples: int = Field(default=8, ge=1)
    """Predictive: refit the forecast at most once per this many samples (a fit is ~0.1 s of
    CPU); between fits the last fit's forecast is read further ahead."""

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalerSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaler min_replicas ({self.min_replicas}) is above max_replicas "
                f"({self.max_replicas})"
            )
        if self.mode == "predictive" and self.forecast_horizon_s < self.interval_s:
            raise ValueError(
                "autoscaler forecast_horizon_s must be at least interval_s: a forecast shorter "
                "than one decision interval cannot scale ahead of anything"
            )
        return self
