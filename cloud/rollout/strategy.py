"""How a deployment rolls out: how the engine reads ``Deployment.strategy`` and
``Deployment.selector``. This is the one contract: the API's ``StrategyIn`` is this model with
unknown fields refused, and the API stores the full validated strategy, so the engine reads
exactly what was accepted (same fields, bounds and defaults).

Strategies:

* ``canary`` -- a percentage (or a count) of the selected agents gets the new version first;
  once every canary agent reports it loaded, the gates watch them for ``soak_s`` seconds; then
  the rest gets it. A failed gate aborts and rolls back: only the canary set ever runs the bad
  version.
* ``all-at-once`` -- every selected agent is a canary: all get the new version together and
  the same gates watch them for ``soak_s``; a failure rolls everyone back.
* ``blue-green`` -- like all-at-once (each agent loads and warms the new version beside the old
  one, then switches traffic in one step, and keeps the old version on disk), but the
  deployment is not finished after the soak: it stays ``soaking``, gates still watching and
  able to switch back automatically, until an operator confirms it (the API sets the status to
  ``completed``) or aborts it (``aborted``: switch back), or ``confirm_after_s`` passes.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

_WEEK_S = 7 * 86_400.0
StrategyKind = Literal["canary", "all-at-once", "blue-green"]


class RolloutStrategy(BaseModel):
    """The rollout of one deployment and its gates."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    kind: StrategyKind = "all-at-once"
    canary_percent: float = Field(default=10.0, gt=0, le=100)
    """Share of the selected agents that gets the new version first (canary only)."""
    canary_count: int | None = Field(default=None, ge=1, le=100_000)
    """Number of canary agents; wins over ``canary_percent`` when set."""
    soak_s: float = Field(default=300.0, ge=0, le=_WEEK_S)
    """How long the gates watch the canary agents once all of them loaded the new version."""
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    """Largest share of requests the agents failed on the new version (internal errors,
    unavailable, timeouts, overload), over the canary agents together; caller errors (bad
    input, expired deadlines) do not count."""
    min_requests: int = Field(default=20, ge=1, le=1_000_000_000)
    """Requests the canary agents must have answered before error rate and latency are judged;
    with fewer, the gates pass on load alone."""
    max_latency_ratio: float | None = Field(default=1.5, gt=0, le=1000)
    """Largest ratio of p50 latency on the new version to the same agents' p50 before the
    deployment (or, unknown, the other agents' on the previous version); ``None``: not
    judged."""
    min_quality: dict[str, float] = Field(default_factory=dict, max_length=64)
    """Smallest acceptable figures of the artifact's validation report (``agreement``,
    ``cosine_mean``, ...; with or without the ``quality.`` prefix), checked before anything is
    published."""
    max_quality: dict[str, float] = Field(default_factory=dict, max_length=64)
    """Largest acceptable figures (e.g. ``perplexity_ratio``)."""
    load_timeout_s: float = Field(default=600.0, gt=0, le=_WEEK_S)
    """How long agents that are online may take to report the new version loaded."""
    offline_grace_s: float = Field(default=60.0, ge=0, le=_WEEK_S)
    """How long a canary agent may be offline during the canary and soak before the gate
    fails (agents outside the canary set that are offline get the version when they return)."""
    confirm_after_s: float | None = Field(default=None, ge=0, le=_WEEK_S)
    """Blue-green: complete on its own this long after the soak (``None``: wait for an
    operator)."""

    @field_validator("min_quality", "max_quality")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        for key, value in v.items():
            if not math.isfinite(value):
                raise ValueError(f"{key}: {value} is not a finite number")
        return v

    def canary_size(self, selected: int) -> int:
        """How many of ``selected`` agents form the canary set (all for the other kinds)."""
        if self.kind != "canary" or selected == 0:
            return selected
        if self.canary_count is not None:
            return min(selected, self.canary_count)
        return min(selected, max(1, math.ceil(selected * self.canary_percent / 100)))


class Selector(BaseModel):
    """Which agents a deployment targets: ``{"agents": [...]}`` and/or ``{"labels": {...}}``.

    With both, an agent must be listed *and* carry every label (the narrower set is the safe
    reading for a rollout). An empty selector matches no agent.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    agents: list[str] | None = None
    labels: dict[str, str] | None = None

    def matches(self, agent_id: str, labels: dict[str, Any]) -> bool:
        if self.agents is None and self.labels is None:
            return False
        if self.agents is not None and agent_id not in self.agents:
            return False
        return self.labels is None or all(
            str(labels.get(k)) == str(v) and k in labels for k, v in self.labels.items()
        )


def quality_problem(
    metrics: dict[str, float], strategy: RolloutStrategy, what: str
) -> tuple[str | None, dict[str, Any]]:
    """Why the validation report ``metrics`` of ``what`` (e.g. ``"m v3 for x86"``) fails the
    strategy's ``min_quality`` / ``max_quality`` (None: it passes), and the figures read."""
    figures: dict[str, Any] = {"quality": {}}
    for bound, limits in (("min", strategy.min_quality), ("max", strategy.max_quality)):
        for key, limit in limits.items():
            value = metrics.get(key, metrics.get(f"quality.{key}"))
            if value is None:
                return (
                    f"quality gate: the validation report of {what} has no figure {key!r}",
                    figures,
                )
            figures["quality"][key] = value
            if (bound == "min" and value < limit) or (bound == "max" and value > limit):
                word = "below the minimum" if bound == "min" else "above the maximum"
                return (
                    f"quality gate: {key} = {value:.4g} is {word} of {limit:.4g}",
                    {**figures, "gate": "quality", "limit": {key: limit}},
                )
    return None, figures
