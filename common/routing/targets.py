"""Where a request can go (:class:`Target`) and what the router knows about it
(:class:`TargetState`: latency estimate, load, health)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from edgefed.common.routing.config import RouterConfig
from edgefed.common.routing.estimates import PeakEwma, RecentLatencies
from edgefed.common.topics import Topics, check_id


class TargetKind(enum.StrEnum):
    LOCAL = "local"
    """The agent the router runs in (its offload decision) or the agent a client talks to."""
    PEER = "peer"
    """Another agent of the fleet."""
    CLOUD_POOL = "cloud-pool"
    """A pool of cloud workers behind one shared subscription."""
    SPLIT = "split"
    """Split execution: an agent runs the head, cloud workers the tail."""


@dataclass(frozen=True, slots=True)
class Target:
    """One place a request can be sent: ``topic`` is where its requests are published."""

    id: str
    kind: TargetKind
    topic: str
    agent_id: str | None = None
    """The agent whose status and heartbeats describe this target (none for a worker pool)."""

    def __post_init__(self) -> None:
        check_id(self.id, "target id")
        if self.agent_id is not None:
            check_id(self.agent_id, "agent id")

    @classmethod
    def agent(cls, topics: Topics, agent_id: str, *, local: bool = False) -> Target:
        """An agent's inference endpoint (``agents/<agent>/infer``)."""
        return cls(
            id=agent_id,
            kind=TargetKind.LOCAL if local else TargetKind.PEER,
            topic=topics.agent_infer(agent_id),
            agent_id=agent_id,
        )

    @classmethod
    def pool(cls, topics: Topics, pool: str) -> Target:
        """A cloud worker pool: published to ``workers/<pool>/infer``; the workers consume it
        through the shared subscription ``topics.worker_infer_shared(pool)``."""
        return cls(id=f"pool.{pool}", kind=TargetKind.CLOUD_POOL, topic=topics.worker_infer(pool))

    @classmethod
    def split(cls, topics: Topics, agent_id: str) -> Target:
        """Split execution headed by ``agent_id`` (it runs the head and forwards the tail)."""
        return cls(
            id=f"split.{agent_id}",
            kind=TargetKind.SPLIT,
            topic=topics.agent_infer(agent_id),
            agent_id=agent_id,
        )


class Health(enum.StrEnum):
    ADMITTED = "admitted"
    EJECTED = "ejected"
    """After repeated failures; one probe request is allowed once ``retry_at`` has passed."""
    OFFLINE = "offline"
    """Its agent's status (or last will) says offline or draining; back when it says online."""


@dataclass(slots=True)
class TargetState:
    """The router's view of one target. All times are ``time.monotonic()`` seconds."""

    target: Target
    order: int
    config: RouterConfig
    ewma: PeakEwma = field(init=False)
    recent: RecentLatencies = field(default_factory=RecentLatencies)
    outstanding: int = 0
    queue_depth: int = 0
    queue_depth_at: float | None = None
    health: Health = Health.ADMITTED
    consecutive_failures: int = 0
    retry_at: float = 0.0
    backoff_s: float = 0.0
    probing: bool = False
    sent: int = 0
    succeeded: int = 0
    failed: int = 0
    models: frozenset[str] | None = None
    """Models the target says it serves (agent status and heartbeats); None: not known, so
    any (worker pools, agents not heard from yet or announcing none)."""

    def serves(self, model: str | None) -> bool:
        return model is None or self.models is None or model in self.models

    def __post_init__(self) -> None:
        self.ewma = PeakEwma(self.config.decay_s)
        self.backoff_s = self.config.probe_backoff_s

    @property
    def id(self) -> str:
        return self.target.id

    # ------------------------------------------------------------------ estimates

    def estimate(self, now: float) -> float | None:
        """Expected round trip (seconds) if sent now; ``None`` while unmeasured."""
        return self.ewma.estimate(now)

    def load(self, now: float) -> int:
        """Requests ahead of a new one: ours outstanding plus the advertised queue depth."""
        queued = 0
        if self.queue_depth_at is not None and now - self.queue_depth_at <= (
            self.config.queue_depth_ttl_s
        ):
            queued = self.queue_depth
        return self.outstanding + queued

    def cost(self, now: float) -> float:
        """Estimate × (load + 1); an unmeasured target is free until a request is outstanding."""
        estimate = self.estimate(now)
        load = self.load(now)
        if estimate is None or estimate == 0.0:
            return self.config.unsampled_penalty_s if load else 0.0
        return estimate * (load + 1)

    def hedge_delay(self, now: float) -> float | None:
        """How long to wait for this target before hedging; ``None`` while unmeasured."""
        if self.config.hedge_delay_s is not None:
            return self.config.hedge_delay_s
        if len(self.recent) >= self.config.hedge_min_samples:
            return self.recent.quantile(self.config.hedge_quantile)
        estimate = self.estimate(now)
        return None if estimate is None else 2.0 * estimate

    # ------------------------------------------------------------------ health

    def selectable(self, now: float) -> bool:
        """Admitted, or ejected with its probe due and none in flight."""
        if self.health is Health.ADMITTED:
            return True
        return self.health is Health.EJECTED and not self.probing and now >= self.retry_at

    def started(self) -> None:
        """A request is being sent to this target (counts as the probe when ejected)."""
        self.outstanding += 1
        self.sent += 1
        if self.health is Health.EJECTED:
            self.probing = True

    def finished(self) -> None:
        self.outstanding = max(0, self.outstanding - 1)

    def succeeded_after(self, rtt_s: float, now: float) -> None:
        self.ewma.observe(rtt_s, now)
        self.recent.add(rtt_s)
        self.succeeded += 1
        self.consecutive_failures = 0
        self.probing = False
        if self.health is Health.EJECTED:
            self.health = Health.ADMITTED
            self.backoff_s = self.config.probe_backoff_s

    def failed_after(self, elapsed_s: float | None, now: float) -> None:
        """A timeout (``elapsed_s`` = how long it waited, counted as a round trip: it was at
        least that slow) or a target-side error reply (``None``)."""
        if elapsed_s is not None:
            self.ewma.observe(elapsed_s, now)
        self.failed += 1
        self.consecutive_failures += 1
        if self.health is Health.EJECTED and self.probing:
            self.probing = False
            self.backoff_s = min(self.backoff_s * 2, self.config.probe_backoff_max_s)
            self.retry_at = now + self.backoff_s
        elif (
            self.health is Health.ADMITTED
            and self.consecutive_failures >= self.config.eject_after_failures
        ):
            self.eject(now)

    def released(self) -> None:
        """An attempt ended with neither an answer nor a fault of the target (cancelled)."""
        self.probing = False

    def eject(self, now: float) -> None:
        self.health = Health.EJECTED
        self.probing = False
        self.retry_at = now + self.backoff_s

    def mark_offline(self) -> None:
        self.health = Health.OFFLINE
        self.probing = False

    def mark_online(self) -> None:
        if self.health is not Health.ADMITTED:
            self.health = Health.ADMITTED
            self.consecutive_failures = 0
            self.backoff_s = self.config.probe_backoff_s
        self.probing = False

    def advertise_queue(self, depth: int, now: float) -> None:
        self.queue_depth = max(0, depth)
        self.queue_depth_at = now
