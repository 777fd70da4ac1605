"""What a simulation run records: every request's outcome, agent telemetry, rollout events,
split plans, faults and the run's own figures. The harness fills a :class:`RunResults`;
:mod:`edgefed.simulation.summary` turns it into figures and :mod:`edgefed.simulation.report`
into ``report.json`` / ``report.html``.

Times are seconds from the start of the run (``t_*_s``), so runs compare with each other and
with the scenario's timeline. Every request that was sent has an outcome, answered or not: a
request with neither an answer nor an explicit error is *lost*, and the summary counts it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefed.common.errors import ConfigError
from edgefed.common.schemas import Priority

__all__ = [
    "FaultRecord",
    "FederationInfo",
    "FederationRound",
    "Placement",
    "RequestOutcome",
    "RolloutEvent",
    "RunMeta",
    "RunResults",
    "SplitPlanRecord",
    "TelemetrySample",
]

RESULTS_SCHEMA_VERSION: Literal[1] = 1

Placement = Literal["edge", "peer", "cloud", "split"]
"""Where a request ran: the agent it entered at, another agent, a cloud worker, or split
between an agent (head) and a cloud worker (tail)."""

Status = Literal["ok", "error", "lost"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RequestOutcome(_Record):
    """One request: what was asked, where it went and how it ended."""

    request_id: str
    t_sent_s: float
    model: str
    policy: str
    """The routing policy that placed it."""
    priority: Priority = Priority.NORMAL
    entry: str | None = None
    """The agent it entered at (``None``: the cloud gateway)."""
    target: str | None = None
    """Who served it (the reply's ``served_by``), or the last target tried when it failed."""
    placement: Placement | None = None
    version: int | None = None
    """The model version that answered."""
    latency_ms: float | None = Field(default=None, ge=0)
    """Send to answer (or to the error reply), as the requester measured it."""
    error: str | None = None
    """The error code of an explicit failure (``timeout``, ``unavailable``, ...)."""
    deadline_ms: float | None = None
    attempts: int = Field(default=1, ge=0)

    @property
    def status(self) -> Status:
        if self.error is not None:
            return "error"
        return "ok" if self.latency_ms is not None else "lost"

    @property
    def t_done_s(self) -> float:
        """When it ended (its send time when it never did)."""
        return self.t_sent_s + (self.latency_ms or 0.0) / 1000


class TelemetrySample(_Record):
    """An agent's load at one moment (from its heartbeat or the harness's own probe)."""

    t_s: float
    agent: str
    online: bool = True
    load: float = Field(default=0.0, ge=0)
    """Requests in progress plus queued."""
    memory_bytes: int | None = Field(default=None, ge=0)
    """Resident memory of the agent (its process, or its share in in-process mode)."""
    cpu_percent: float | None = Field(default=None, ge=0)
    served_total: int | None = Field(default=None, ge=0)
    model_version: int | None = None


class RolloutEvent(_Record):
    """A step of a rollout (``pending``, ``canary``, ``soaking``, ``rolling``, ``completed``,
    ``aborted``, ``rolled-back``) or an agent reporting a version loaded (``loaded``)."""

    t_s: float
    model: str
    version: int
    phase: str
    agents: list[str] = Field(default_factory=list)
    detail: str = ""


class SplitPlanRecord(_Record):
    """The split point the planner chose for one agent (and why)."""

    t_s: float
    agent: str
    model: str
    placement: Literal["edge", "cloud", "split"]
    split_k: int | None = None
    """Layers run on the device (``None`` unless split)."""
    layers: int | None = None
    device: str | None = None
    site: str | None = None
    bandwidth_mbps: float | None = None
    """The link bandwidth the plan was made for (measured or configured)."""
    rtt_ms: float | None = None
    estimated_ms: float | None = None
    """The planner's end-to-end estimate for the chosen plan."""
    reason: str = ""


class FaultRecord(_Record):
    """A fault as it really happened (the scenario only says when it was due)."""

    t_s: float
    kind: str
    target: str
    planned_at_s: float | None = None
    ok: bool = True
    """False when the harness could not inject it (the detail says why)."""
    detail: str = ""


class FederationRound(_Record):
    """One federated round: how many updates were aggregated, which were rejected (and why),
    and the held-out accuracy of the aggregate."""

    round: int = Field(ge=1)
    t_s: float
    """When the harness saw the round finish."""
    clients: int = Field(ge=0)
    """Clients whose update the round expected (accepted + rejected)."""
    accuracy: float | None = None
    """Held-out accuracy of the aggregated model (server-side evaluation)."""
    loss: float | None = None
    """Held-out loss of the aggregated model."""
    accepted: int = Field(default=0, ge=0)
    rejected: list[str] = Field(default_factory=list)
    """``node N: reason`` for every update dropped by validation (or never received)."""
    train_loss: float | None = None
    seconds: float | None = None
    """The round's own duration, as the ServerApp measured it."""


class FederationInfo(_Record):
    """The federated phase as a whole."""

    engine: str
    """``simulation-engine`` (Flower's) or ``in-process``."""
    strategy: str
    clients: int
    alpha: float
    byzantine: int = 0
    """Clients whose updates were replaced by an attack (sign flip x10)."""
    status: str
    """``succeeded``, ``failed``, ``running`` (cut off by the end of the run) or
    ``not-started``."""
    error: str | None = None
    initial_accuracy: float | None = None
    """Held-out accuracy of the model before round 1."""
    started_s: float | None = None
    wall_s: float | None = None


class RunMeta(_Record):
    """Figures of the run itself."""

    scenario: str
    seed: int
    duration_s: float = Field(gt=0)
    """The scenario's planned duration (the timeline's length)."""
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    wall_s: float = Field(default=0.0, ge=0)
    """Wall time of the whole run, set-up and tear-down included."""
    peak_memory_bytes: int | None = Field(default=None, ge=0)
    """Peak resident memory of the harness and everything it started, together."""
    agents: int = Field(default=0, ge=0)
    mode: str = "processes"
    policy: str = ""
    host: str = ""
    edgefed_version: str = ""
    notes: list[str] = Field(default_factory=list)
    """What a reader must know (a model fell back to tiny, federation not run, ...)."""

    @property
    def memory_per_agent_bytes(self) -> float | None:
        if self.peak_memory_bytes is None or self.agents == 0:
            return None
        return self.peak_memory_bytes / self.agents


class RunResults(_Record):
    """Everything one run recorded."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    schema_version: Literal[1] = RESULTS_SCHEMA_VERSION
    meta: RunMeta
    requests: list[RequestOutcome] = Field(default_factory=list)
    telemetry: list[TelemetrySample] = Field(default_factory=list)
    rollouts: list[RolloutEvent] = Field(default_factory=list)
    splits: list[SplitPlanRecord] = Field(default_factory=list)
    faults: list[FaultRecord] = Field(default_factory=list)
    federation: list[FederationRound] = Field(default_factory=list)
    federation_info: FederationInfo | None = None

    def save(self, path: str | Path) -> Path:
        """Write the results as JSON (``results.json`` beside the report)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> RunResults:
        """Read results written by :meth:`save` (to report them again)."""
        try:
            return cls.model_validate_json(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read results {path}: {exc.strerror or exc}") from None
        except ValidationError as exc:
            raise ConfigError(f"{path} is not a results file of this version: {exc}") from None
