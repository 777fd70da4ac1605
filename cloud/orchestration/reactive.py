"""The reactive autoscaler: Kubernetes' HPA rule on queue depth and p95 latency (see ``hpa``).

It never reads a clock: ``observe`` takes the pool monitor's samples, ``decide(now)`` answers
from the latest one, so the same object runs in the controller, the simulation harness and tests
on synthetic traces.

What the rule does on a steady load, by design of its metrics: a p95 well under the SLO (a
lightly loaded pool answers in about its service time) proposes a smaller pool, so once the
scale-down window has passed the pool shrinks towards saturation, a queue forms, and the queue
metric (``ceil(waiting / target)``, large while new workers start) overshoots; on a flat load
the pool cycles with a period of a few scale-down windows (``bench/autoscale.py`` counts the
resizes). The predictive autoscaler's forecast holds the pool where the load needs it.
"""

from __future__ import annotations

from edgefed.cloud.orchestration.hpa import (
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
        proposals = reactive_proposals(sample, current, self.settings)
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
        """Hook for subclasses that keep more than the latest sample."""

    def _extra_proposals(
        self, now: float, current: int, inputs: dict[str, float], notes: list[str]
    ) -> list[Proposal]:
        """Hook: proposals beyond the HPA's two metrics (the predictive forecast)."""
        return []
