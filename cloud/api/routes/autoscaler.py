"""The autoscaler of cloud worker pools, as the controller runs it: per pool, the settings in
force, the last sample of the pool (ready workers, arrivals, queue, p95), the last decisions
with their reasons, and the vertical hints (CPU and memory requests) from observed usage.

Read-only: the pools are configured in ``[controller.autoscaler.POOL]``. ``applying`` is false
when the controller has no scaler (Kubernetes not enabled): decisions are then recommendations.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from edgefed.cloud.api.deps import AUTH_ERRORS, ReaderDep, ServicesDep
from edgefed.cloud.orchestration.signals import PoolSample, ScaleDecision
from edgefed.common.topics import ID_PATTERN

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1/autoscaler", tags=["autoscaler"])


class DecisionOut(BaseModel):
    replicas: int
    reason: str
    age_s: float
    """Seconds since the decision was taken."""
    inputs: dict[str, float]
    """The figures behind it (desired by queue, by latency, forecast, ...)."""


class SampleOut(BaseModel):
    ready_replicas: int
    desired_replicas: int | None
    arrivals_per_s: float
    served_per_s: float
    queue_depth: int
    p95_ms: float | None
    age_s: float


class PoolOut(BaseModel):
    pool: str
    mode: str
    min_replicas: int
    max_replicas: int
    interval_s: float
    slo_p95_ms: float
    current_replicas: int | None
    """What the scaler runs now (None: recommend-only)."""
    sample: SampleOut | None
    decisions: list[DecisionOut]
    """Newest first."""
    resources: dict[str, Any] | None
    """Vertical hints (recommended CPU and memory requests), once workers reported usage."""
    changes: int
    last_error: str | None


class AutoscalerOut(BaseModel):
    enabled: bool
    """Whether any pool is autoscaled (``[controller.autoscaler]`` names pools)."""
    applying: bool
    """Whether decisions resize pools (False: recommend-only, or disabled)."""
    pools: list[PoolOut]


@router.get("", responses=AUTH_ERRORS)
async def autoscaler_status(
    services: ServicesDep,
    _who: ReaderDep,
    pool: Annotated[str | None, Query(pattern=ID_PATTERN, description="Only this pool")] = None,
    limit: Annotated[int, Query(ge=1, le=50, description="Decisions per pool")] = 10,
) -> AutoscalerOut:
    """The autoscaled pools with their last samples, decisions and vertical hints."""
    view = services.autoscaler
    if view is None:
        return AutoscalerOut(enabled=False, applying=False, pools=[])
    now = time.monotonic()
    pools = []
    for state in view.snapshot():  # async route: read on the loop that mutates the state
        if pool is not None and state.pool != pool:
            continue
        settings = state.settings
        decisions = list(state.decisions)[-limit:][::-1]
        pools.append(
            PoolOut(
                pool=state.pool,
                mode=settings.mode,
                min_replicas=settings.min_replicas,
                max_replicas=settings.max_replicas,
                interval_s=settings.interval_s,
                slo_p95_ms=settings.slo_p95_ms,
                current_replicas=state.current,
                sample=_sample(state.sample, now),
                decisions=[_decision(d, now) for d in decisions],
                resources=_resources(state.resources),
                changes=state.changes,
                last_error=state.last_error,
            )
        )
    return AutoscalerOut(enabled=True, applying=view.applying, pools=pools)


def _sample(sample: PoolSample | None, now: float) -> SampleOut | None:
    if sample is None:
        return None
    return SampleOut(
        ready_replicas=sample.replicas,
        desired_replicas=sample.desired_replicas,
        arrivals_per_s=sample.arrivals_per_s,
        served_per_s=sample.served_per_s,
        queue_depth=sample.queue_depth,
        p95_ms=sample.p95_ms,
        age_s=max(0.0, now - sample.at),
    )


def _decision(decision: ScaleDecision, now: float) -> DecisionOut:
    return DecisionOut(
        replicas=decision.replicas,
        reason=decision.reason,
        age_s=max(0.0, now - decision.at),
        inputs=dict(decision.inputs),
    )


def _resources(hint: Any) -> dict[str, Any] | None:
    """A ``ResourceRecommendation`` (a dataclass or pydantic model) as JSON-ready data."""
    if hint is None:
        return None
    if dataclasses.is_dataclass(hint) and not isinstance(hint, type):
        return dataclasses.asdict(hint)
    dump = getattr(hint, "model_dump", None)
    if callable(dump):
        data = dump(mode="json")
        return data if isinstance(data, dict) else {"value": data}
    return {"value": str(hint)}
