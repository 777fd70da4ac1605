"""How a router chooses, ejects, retries and hedges (one object, validated on creation)."""

from __future__ import annotations

from dataclasses import dataclass

from edgefed.common.errors import ConfigError

POLICY_NAMES = ("latency", "round-robin", "least-outstanding", "random")
"""The policies a deployment can select by name (:func:`edgefed.common.routing.make_policy`)."""


@dataclass(frozen=True, slots=True)
class RouterConfig:
    policy: str = "latency"
    """One of :data:`POLICY_NAMES`."""
    decay_s: float = 10.0
    """Peak-EWMA time constant: how fast an estimate forgets a slow period (seconds)."""
    unsampled_penalty_s: float = 1.0
    """Cost of a target with no latency sample yet while a request to it is outstanding (an
    unmeasured target is tried, but not flooded before its first answer)."""
    queue_depth_ttl_s: float = 15.0
    """A queue depth advertised in a heartbeat counts for this long."""
    eject_after_failures: int = 3
    """Consecutive timeouts or target-side errors after which a target is ejected."""
    probe_backoff_s: float = 1.0
    """An ejected target gets one probe request after this long; doubled on each failed probe."""
    probe_backoff_max_s: float = 30.0
    retries: int = 1
    """Further attempts on other targets after a timeout or a target-side error (same id)."""
    first_attempt_share: float = 0.5
    """Share of the time left that an attempt may use when another attempt could follow."""
    attempt_timeout_s: float | None = None
    """Upper bound of one attempt (seconds); ``None``: only the deadline bounds it."""
    default_timeout_s: float | None = None
    """Deadline of a request that has none (seconds); ``None``: the requester's default."""
    hedge: bool = False
    """Send the same request to a second target when the first has not answered in time."""
    hedge_delay_s: float | None = None
    """Fixed hedging delay; ``None``: the first target's ``hedge_quantile`` of recent trips."""
    hedge_quantile: float = 0.95
    hedge_min_samples: int = 20
    """Below this many samples of a target, hedging waits for its estimate times two."""

    def __post_init__(self) -> None:
        if self.policy not in POLICY_NAMES:
            raise ConfigError(
                f"routing policy {self.policy!r} is unknown: use one of {', '.join(POLICY_NAMES)}"
            )
        positive = {
            "decay_s": self.decay_s,
            "unsampled_penalty_s": self.unsampled_penalty_s,
            "queue_depth_ttl_s": self.queue_depth_ttl_s,
            "probe_backoff_s": self.probe_backoff_s,
            "probe_backoff_max_s": self.probe_backoff_max_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"routing {name} must be > 0 (got {value!r})")
        for name, opt in (
            ("attempt_timeout_s", self.attempt_timeout_s),
            ("default_timeout_s", self.default_timeout_s),
            ("hedge_delay_s", self.hedge_delay_s),
        ):
            if opt is not None and not opt > 0:
                raise ConfigError(f"routing {name} must be > 0 or unset (got {opt!r})")
        if self.eject_after_failures < 1:
            raise ConfigError(
                f"routing eject_after_failures must be >= 1 (got {self.eject_after_failures})"
            )
        if self.retries < 0:
            raise ConfigError(f"routing retries must be >= 0 (got {self.retries})")
        if not 0 < self.first_attempt_share <= 1:
            raise ConfigError(
                f"routing first_attempt_share must be in (0, 1] (got {self.first_attempt_share})"
            )
        if not 0 < self.hedge_quantile <= 1:
            raise ConfigError(
                f"routing hedge_quantile must be in (0, 1] (got {self.hedge_quantile})"
            )
        if self.hedge_min_samples < 1:
            raise ConfigError("routing hedge_min_samples must be >= 1")
        if self.probe_backoff_max_s < self.probe_backoff_s:
            raise ConfigError("routing probe_backoff_max_s must be >= probe_backoff_s")
