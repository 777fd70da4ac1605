"""The reactive autoscaler: Kubernetes' HPA rule on queue depth and p95 latency (see ``hpa``).

It never reads a clock: ``observe`` takes the pool monitor's samples, ``decide(now)`` answers
from the latest one, so the same object runs in the controller, the simulation harness and tests
on synthetic traces.

Three metrics, largest wins. Queue depth and p95 latency are the SLO's own signals but are not
proportional to load below saturation: a lightly loaded pool has no queue and answers in about
its service time, so on their own they propose ever smaller pools until a queue forms, then
overshoot while new workers start (a limit cycle on a flat load). Utilisation (arrival rate
over what the ready workers serve, against ``target_utilisation``) is proportional to load, as
CPU is for the HPA, and holds the pool at its fixed point once a worker's capacity is known
(configured, or learnt from saturated samples that met the SLO: ``hpa.CapacityEstimate``).
"""

from __future__ import annotations

from edgefed.cloud.orchestration.hpa import (
    CapacityEstimate,
    NoPoolSample,
    Proposal,
    Stabiliser,
    check_sample,
    hpa_decision,
    reactive_proposals,
)
from edgefed.cloud.orchestration.signals import AutoscalerSettings, PoolSample, ScaleDecision

STALE_INTERVALS = 3
"""A sample older than this many intervals is not acted on (the HPA does not scale on missing
metrics either): the pool keeps its size."""


class ReactiveAutoscaler:
    """HPA semantics on the latest sample: per-metric proposals, largest wins, stabilised."""

    def __init__(self, settings: AutoscalerSettings) -> None:
        self.settings = settings
        self._stabiliser = Stabiliser(settings)
        self._capacity = CapacityEstimate(settings)
        self._last: PoolSample | None = None
        self._decided: int | None = None

    def observe(self, sample: PoolSample) -> None:
        """Take one pool sample (refused with :class:`InvalidSample` when impossible)."""
        check_sample(sample, self._last)
        self._last = sample
        self._observed(sample)

    def decide(self, now: float) -> ScaleDecision:
        """How many workers the pool should have at ``now``, within [min, max]."""
        sample = self._last
        if sample is None:
            raise NoPoolSample("no pool sample observed yet: call observe() before decide()")
        current = self._current(sample)
        age = now - sample.at
        if age > STALE_INTERVALS * self.settings.interval_s:
            return ScaleDecision(
                replicas=current,
                reason=f"keep {current}: the last pool sample is {age:.0f} s old",
                at=now,
                inputs={"current": float(current), "sample_age_s": age},
            )
        inputs: dict[str, float] = {
            "ready": float(sample.replicas),
            "queue_depth": float(sample.queue_depth),
            "arrivals_per_s": sample.arrivals_per_s,
        }
        if sample.p95_ms is not None:
            inputs["p95_ms"] = sample.p95_ms
        proposals = reactive_proposals(sample, current, self.settings, self._capacity.rps)
        notes: list[str] = []
        proposals += self._extra_proposals(now, current, inputs, notes)
        decision = hpa_decision(
            now, current, proposals, self._stabiliser, self.settings, inputs, notes
        )
        self._decided = decision.replicas
        return decision

    def _current(self, sample: PoolSample) -> int:
        """The pool's asked-for size: from the sample, else our last decision, else ready."""
        if sample.desired_replicas is not None:
            return sample.desired_replicas
        if self._decided is not None:
            return self._decided
        return sample.replicas

    def _observed(self, sample: PoolSample) -> None:
        """Learn from every sample (subclasses keep more: call this first)."""
        self._capacity.observe(sample)

    def _extra_proposals(
        self, now: float, current: int, inputs: dict[str, float], notes: list[str]
    ) -> list[Proposal]:
        """Hook: proposals beyond the HPA's two metrics (the predictive forecast)."""
        return []
