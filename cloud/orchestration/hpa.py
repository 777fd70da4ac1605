"""The Kubernetes HorizontalPodAutoscaler rule, shared by the reactive and predictive autoscalers.

Per metric, ``desired = ceil(ready × value / target)``, or the current size when ``value /
target`` is within ``tolerance`` of 1; the largest proposal wins. The raw recommendation is then
stabilised as the HPA controller does (``stabilizeRecommendationWithBehaviors``): the pool grows
only to the *lowest* recommendation of the scale-up window and shrinks only to the *highest* of
the scale-down window, so a single noisy sample can neither add nor remove workers. Finally the
answer is clamped to ``[min_replicas, max_replicas]``.

What the HPA does not do and we do: a pool at 0 ready workers that receives requests scales to
at least one (the HPA cannot scale from zero without a feature gate), and an interval where
nothing was served has no latency, so the latency metric abstains instead of reading as 0.
Scaling-rate policies (the HPA's default "double or +4 pods per 15 s") are not modelled.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from edgefed.cloud.orchestration.errors import OrchestrationError
from edgefed.cloud.orchestration.signals import AutoscalerSettings, PoolSample, ScaleDecision
from edgefed.common.errors import PermanentError, TemporaryError


class InvalidSample(OrchestrationError, PermanentError):
    """A pool sample with an impossible value (negative, NaN, or older than the previous one)."""

    exit_code = 65  # EX_DATAERR


class NoPoolSample(OrchestrationError, TemporaryError):
    """``decide`` was called before any sample was observed: the pool's size is unknown."""


def check_sample(sample: PoolSample, previous: PoolSample | None) -> None:
    """Refuse a sample the pool monitor cannot have measured, naming the field."""
    numbers = {
        "at": sample.at,
        "arrivals_per_s": sample.arrivals_per_s,
        "served_per_s": sample.served_per_s,
        "p95_ms": 0.0 if sample.p95_ms is None else sample.p95_ms,
    }
    for name, value in numbers.items():
        if not math.isfinite(value):
            raise InvalidSample(f"pool sample {name} is {value}: it must be a finite number")
    counts = {
        "replicas": sample.replicas,
        "queue_depth": sample.queue_depth,
        "arrivals_per_s": sample.arrivals_per_s,
        "served_per_s": sample.served_per_s,
        "p95_ms": numbers["p95_ms"],
        "desired_replicas": 0 if sample.desired_replicas is None else sample.desired_replicas,
    }
    for name, value in counts.items():
        if value < 0:
            raise InvalidSample(f"pool sample {name} is {value}: it cannot be negative")
    if previous is not None and sample.at < previous.at:
        raise InvalidSample(
            f"pool sample at {sample.at} is older than the previous one at {previous.at}: "
            "samples must arrive in time order"
        )


CAPACITY_SAMPLES = 64
MIN_CAPACITY_SAMPLES = 3


class CapacityEstimate:
    """Requests per second one worker serves within the SLO: ``capacity_rps_per_replica`` when
    set; otherwise learnt from samples where the pool was saturated (requests waiting) yet met
    its SLO: there, requests served per second per ready worker is what a worker can do within
    the SLO (the 90th percentile of the last 64 such samples, to discount intervals that were
    only partly saturated)."""

    def __init__(self, settings: AutoscalerSettings) -> None:
        self._configured = settings.capacity_rps_per_replica
        self._slo = settings.slo_p95_ms
        self._seen: deque[float] = deque(maxlen=CAPACITY_SAMPLES)

    def observe(self, sample: PoolSample) -> None:
        saturated = sample.replicas > 0 and sample.queue_depth > 0 and sample.served_per_s > 0
        if saturated and sample.p95_ms is not None and sample.p95_ms <= self._slo:
            self._seen.append(sample.served_per_s / sample.replicas)

    @property
    def rps(self) -> float | None:
        """The capacity, or None while fewer than 3 saturated samples met the SLO."""
        if self._configured is not None:
            return self._configured
        if len(self._seen) < MIN_CAPACITY_SAMPLES:
            return None
        return float(np.percentile(np.asarray(self._seen), 90))


@dataclass(frozen=True)
class Proposal:
    """What one metric asks for, and a phrase that explains it (it ends up in the reason)."""

    metric: str
    replicas: int
    detail: str


def hpa_replicas(ready: int, current: int, ratio: float, tolerance: float) -> int:
    """``ceil(ready × ratio)``, or ``current`` while ``ratio`` is within ``tolerance`` of 1."""
    if abs(ratio - 1.0) <= tolerance + 1e-9:  # 1.1 - 1.0 is 0.10000000000000009 in floats
        return current
    # A ratio like 1.2000000000000002 must not turn 5 workers into 7: round before ceil.
    return max(0, math.ceil(round(ready * ratio, 9)))


def reactive_proposals(
    sample: PoolSample,
    current: int,
    settings: AutoscalerSettings,
    capacity_rps: float | None = None,
) -> list[Proposal]:
    """The HPA's per-metric proposals: utilisation (once a worker's capacity is known), queue
    depth per ready worker, and p95 latency."""
    ready = sample.replicas
    proposals: list[Proposal] = []
    if capacity_rps is not None and ready > 0:
        utilisation = sample.arrivals_per_s / (ready * capacity_rps)
        ratio = utilisation / settings.target_utilisation
        proposals.append(
            Proposal(
                "utilisation",
                hpa_replicas(ready, current, ratio, settings.tolerance),
                f"{sample.arrivals_per_s:.1f} req/s over {ready} ready x "
                f"{capacity_rps:.1f} req/s = {utilisation:.0%} vs target "
                f"{settings.target_utilisation:.0%}",
            )
        )
    target_q = settings.target_queue_per_replica
    if ready > 0:
        per_replica = sample.queue_depth / ready
        ratio = per_replica / target_q
        proposals.append(
            Proposal(
                "queue",
                hpa_replicas(ready, current, ratio, settings.tolerance),
                f"{sample.queue_depth} waiting over {ready} ready = {per_replica:.1f}/worker "
                f"vs target {target_q:g}",
            )
        )
    else:
        proposals.append(
            Proposal(
                "queue",
                math.ceil(sample.queue_depth / target_q),
                f"{sample.queue_depth} waiting and no worker ready",
            )
        )
    if sample.p95_ms is not None and ready > 0:
        ratio = sample.p95_ms / settings.slo_p95_ms
        proposals.append(
            Proposal(
                "latency",
                hpa_replicas(ready, current, ratio, settings.tolerance),
                f"p95 {sample.p95_ms:.0f} ms vs SLO {settings.slo_p95_ms:g} ms",
            )
        )
    if sample.arrivals_per_s > 0 or sample.queue_depth > 0:
        proposals.append(
            Proposal("demand", 1, f"{sample.arrivals_per_s:.1f} req/s arriving needs a worker")
        )
    return proposals


class Stabiliser:
    """The HPA's stabilisation windows over past raw recommendations."""

    def __init__(self, settings: AutoscalerSettings) -> None:
        self._up = settings.scale_up_stabilization_s
        self._down = settings.scale_down_stabilization_s
        self._recent: deque[tuple[float, int]] = deque()

    def stabilise(self, now: float, recommendation: int, current: int) -> tuple[int, str]:
        """The replicas the windows allow, and a note when a window held the pool back."""
        if not self._recent:
            # The size the pool has when autoscaling starts counts as a recommendation, so a
            # restarted controller does not shrink the pool before a window of evidence.
            self._recent.append((now, current))
        up_cut, down_cut = now - self._up, now - self._down
        up, down = recommendation, recommendation
        for at, rec in self._recent:
            if at > up_cut:
                up = min(up, rec)
            if at > down_cut:
                down = max(down, rec)
        self._recent.append((now, recommendation))
        horizon = now - max(self._up, self._down)
        while self._recent and self._recent[0][0] <= horizon:
            self._recent.popleft()
        result = min(max(current, up), down)
        note = ""
        if recommendation > current and result < recommendation:
            note = f"scale-up window ({self._up:g} s) allows {result}"
        elif recommendation < current and result > recommendation:
            note = f"scale-down window ({self._down:g} s) holds {result}"
        return result, note


def hpa_decision(
    now: float,
    current: int,
    proposals: list[Proposal],
    stabiliser: Stabiliser,
    settings: AutoscalerSettings,
    inputs: dict[str, float],
    notes: list[str] | None = None,
) -> ScaleDecision:
    """Combine proposals (largest wins), stabilise, clamp, and explain."""
    driver = max(proposals, key=lambda p: p.replicas)
    for p in proposals:
        inputs[f"desired_{p.metric}"] = float(p.replicas)
    stabilised, note = stabiliser.stabilise(now, driver.replicas, current)
    replicas = min(max(stabilised, settings.min_replicas), settings.max_replicas)
    inputs.update(current=float(current), recommendation=float(driver.replicas))
    parts = [f"{driver.metric} drove it ({driver.detail}) -> {driver.replicas}"]
    if note:
        parts.append(note)
    parts.extend(notes or [])
    if replicas != stabilised:
        bound = "min_replicas" if replicas > stabilised else "max_replicas"
        parts.append(f"clamped to {bound} {replicas}")
    verb = "keep" if replicas == current else "scale up" if replicas > current else "scale down"
    return ScaleDecision(
        replicas=replicas,
        reason=f"{verb} {current} -> {replicas}: " + "; ".join(parts),
        at=now,
        inputs=inputs,
    )
