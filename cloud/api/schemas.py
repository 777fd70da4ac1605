"""Request and response bodies of the control API (``XCreate`` in, ``XPublic`` out).

They are separate from the storage models so that a hash, a signing key or a token never
reaches a response by accident: the only secrets ever returned are a token just created
(:class:`TokenCreated`, :class:`JoinTokenCreated`, :class:`JoinAnswer`), shown once.

Every free-text field is bounded and refuses control characters, every number is bounded, so
bad input is a 422 naming the field -- never a database error.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    FiniteFloat,
    StringConstraints,
    model_validator,
)

from edgefed.cloud.registry.db import as_utc
from edgefed.cloud.registry.models import AgentPhase, DeploymentStatus, JobStatus
from edgefed.cloud.rollout.strategy import RolloutStrategy
from edgefed.common.topics import ID_PATTERN

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

MAX_INT32 = 2**31 - 1
"""Largest id, version or count accepted (the registry's integer columns)."""
MAX_EXPIRY_S = 10 * 365 * 86_400
"""Longest token lifetime accepted (ten years)."""


def _no_control(value: str) -> str:
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters")
    return value


def _utc(value: datetime) -> datetime:
    out = as_utc(value)
    assert out is not None
    return out


NoControl = AfterValidator(_no_control)
"""Refuses control characters (NUL included: PostgreSQL cannot store it, paths cannot hold it)."""
Text32 = Annotated[str, StringConstraints(max_length=32), NoControl]
Text64 = Annotated[str, StringConstraints(max_length=64), NoControl]
Text128 = Annotated[str, StringConstraints(max_length=128), NoControl]
Text256 = Annotated[str, StringConstraints(max_length=256), NoControl]
Text1024 = Annotated[str, StringConstraints(max_length=1024), NoControl]
PathText = Annotated[str, StringConstraints(min_length=1, max_length=4096), NoControl]
NonEmpty = Field(min_length=1)

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
"""A name that is also an MQTT topic segment (models, agents, targets)."""
LabelKey = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")]
LabelValue = Text128
Labels = Annotated[dict[LabelKey, LabelValue], Field(max_length=64)]
UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
Id = Annotated[int, Field(ge=1, le=MAX_INT32)]
Seconds = Annotated[int, Field(ge=1, le=MAX_EXPIRY_S)]

Scope = Literal["admin", "operator", "reader", "agent"]
Task = Literal["feature-extraction", "text-classification", "text-generation"]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorBody(BaseModel):
    """Every error: ``detail`` says what was wrong."""

    detail: str


# --------------------------------------------------------------------------- tokens


class TokenCreate(_In):
    name: Annotated[Text128, NonEmpty]
    scopes: Annotated[list[Scope], Field(min_length=1, max_length=4)]
    """``admin`` ⊇ ``operator`` ⊇ ``reader``; ``agent`` stands alone and needs ``agent_id``."""
    expires_in_s: Seconds | None = None
    """Lifetime; the token never expires when unset."""
    agent_id: Identifier | None = None
    """The agent an ``agent`` token is bound to."""

    @model_validator(mode="after")
    def _agent_scope_alone(self) -> TokenCreate:
        if "agent" in self.scopes:
            if set(self.scopes) != {"agent"}:
                raise ValueError("the agent scope cannot be combined with other scopes")
            if self.agent_id is None:
                raise ValueError("an agent token needs agent_id")
        elif self.agent_id is not None:
            raise ValueError("agent_id is only for tokens with the agent scope")
        return self


class TokenPublic(_Out):
    id: int
    name: str
    scopes: list[str]
    agent_id: str | None
    created_at: UtcDatetime
    expires_at: UtcDatetime | None
    revoked_at: UtcDatetime | None


class TokenCreated(TokenPublic):
    token: str
    """The secret: shown this once, stored only as its SHA-256."""


class JoinTokenCreate(_In):
    labels: Labels = Field(default_factory=dict)
    """Labels every agent joining with this token gets (they win over the agent's own)."""
    expires_in_s: Seconds = 86_400
    """Lifetime of the (single-use) token; a day by default."""


class JoinTokenCreated(_Out):
    id: int
    token: str
    """The secret for ``edgefed edge join --token``: shown this once."""
    labels: dict[str, str]
    expires_at: UtcDatetime | None


# --------------------------------------------------------------------------- agents


class JoinRequest(_In):
    """What ``edgefed edge join`` sends (``edgefed.edge.join``)."""

    model_config = ConfigDict(extra="ignore")

    token: Annotated[Text256, NonEmpty]
    hostname: Annotated[str, StringConstraints(max_length=255), NoControl] | None = None
    labels: Labels = Field(default_factory=dict)
    device_profile: Text64 | None = None
    agent_version: Text32 | None = None


class JoinAnswer(BaseModel):
    """What the agent stores as its identity (the contract of ``edgefed.edge.join``)."""

    agent_id: str
    fleet: str
    broker_url: str
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    agent_token: str
    artifact_signing_keys: list[str]
    """Base64 Ed25519 public keys whose signatures the agent accepts."""
    labels: dict[str, str] = Field(default_factory=dict)
    """The labels recorded for the agent: its own, overridden by its join token's."""
    session_key: str | None = None
    """The fleet's session key (base64): encrypts conversation contexts at rest and in transit
    (``None``: this controller keeps no sessions)."""


class AgentPublic(_Out):
    id: str
    fleet: str
    hostname: str | None
    labels: dict[str, Any]
    device_profile: str | None
    agent_version: str | None
    state: str
    last_seen: UtcDatetime | None
    last_status: dict[str, Any] | None
    last_heartbeat: dict[str, Any] | None
    desired_generation: int
    desired_state: dict[str, Any] | None
    created_at: UtcDatetime
    live: dict[str, Any] | None = None
    """The latest status and heartbeat received over MQTT (None: not seen by this controller,
    or no fleet view running)."""


# --------------------------------------------------------------------------- models


class ModelCreate(_In):
    name: Identifier
    """Letters, digits, ``_.-``; at most 64 characters, starting with a letter or digit."""
    task: Task
    teacher_dir: PathText
    """Absolute path, on the controller, of a Hugging Face model directory (with config.json)."""


class ArtifactPublic(_Out):
    target: str
    path: str
    manifest_sha256: str
    size_bytes: int
    metrics: dict[str, Any]
    """The validation report measured when the artifact was built."""
    created_at: UtcDatetime
    url: str = ""
    """Where agents download it from."""


class ModelVersionPublic(_Out):
    version: int
    parent_version: int | None
    note: str | None
    job_id: int | None
    created_at: UtcDatetime
    artifacts: list[ArtifactPublic]


class ModelPublic(_Out):
    name: str
    task: str
    teacher_dir: str | None
    created_at: UtcDatetime
    created_by: str | None
    versions: list[int] = Field(default_factory=list)
    latest_version: int | None = None


class ModelDetail(ModelPublic):
    version_details: list[ModelVersionPublic] = Field(default_factory=list)


class VersionRegister(_In):
    """Register a version already published in the artifact store (``NAME/vN/TARGET``)."""

    version: Id
    targets: Annotated[list[Identifier], Field(min_length=1, max_length=32)] | None = None
    """Targets to register; every target published for that version when unset."""
    note: Text1024 | None = None


# --------------------------------------------------------------------------- jobs


class StudentIn(_In):
    """Which teacher layers the student keeps (:class:`edgefed.cloud.compress.config.StudentSpec`):
    ``layers`` or ``depth``, or neither (half the teacher's depth)."""

    layers: Annotated[list[Annotated[int, Field(ge=0, le=1023)]], Field(max_length=256)] | None = (
        None
    )
    """Teacher layer indices to keep, strictly increasing."""
    depth: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Number of layers, spread evenly over the teacher's."""

    @model_validator(mode="after")
    def _one_of(self) -> StudentIn:
        if self.layers is not None and self.depth is not None:
            raise ValueError("give either layers or depth, not both")
        if self.layers is not None:
            if not self.layers:
                raise ValueError("layers must name at least one layer")
            if any(b <= a for a, b in zip(self.layers, self.layers[1:], strict=False)):
                raise ValueError("layers must be strictly increasing teacher layer indices")
        return self


class DistillIn(_In):
    """How the student learns (a subset of
    :class:`edgefed.cloud.compress.config.DistillSettings`, same names and meaning)."""

    enabled: bool = True
    """False: export and quantize the teacher as it is (no student, no training)."""
    max_steps: Annotated[int, Field(ge=0, le=10_000_000)] = 1000
    time_budget_s: Annotated[float, Field(gt=0, le=7 * 86_400)] | None = None
    """Training time at most (across resumed attempts of the job)."""
    batch_size: Annotated[int, Field(ge=1, le=4096)] = 32
    max_length: Annotated[int, Field(ge=8, le=8192)] = 64
    learning_rate: Annotated[float, Field(gt=0, le=1.0)] = 2e-4
    eval_every: Annotated[int, Field(ge=1, le=10_000_000)] = 50
    patience: Annotated[int, Field(ge=1, le=100_000)] = 5
    checkpoint_every: Annotated[int, Field(ge=1, le=10_000_000)] = 200
    """Optimizer steps between checkpoints (an interrupted job resumes from the last one)."""
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0


MetricName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Thresholds = Annotated[dict[MetricName, FiniteFloat], Field(max_length=64)]


class GateIn(_In):
    """Quality gate: validation-report metrics (e.g. ``cosine_mean``, ``agreement``) each
    target must reach; a target below it is not published."""

    minimums: Thresholds = Field(default_factory=dict)
    maximums: Thresholds = Field(default_factory=dict)


class CompressionJobCreate(_In):
    model: Identifier
    """A registered model (its teacher directory and task are used)."""
    targets: Annotated[list[Identifier], Field(min_length=1, max_length=16)] = Field(
        default_factory=lambda: ["x86-avx2"]
    )
    student: StudentIn = Field(default_factory=StudentIn)
    distill: DistillIn = Field(default_factory=DistillIn)
    gate: GateIn | None = None
    """Quality gate; the task's default when unset."""
    data: PathText | None = None
    """Distillation data on the controller (text, JSONL or a datasets directory); the
    built-in offline corpus when unset."""
    max_examples: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    """Use at most this many examples of the data (all when unset)."""
    eval_examples: Annotated[int, Field(ge=8, le=1_000_000)] = 256
    """Held-out examples the validation report is measured on."""
    latency_repeats: Annotated[int, Field(ge=3, le=10_000)] = 20
    """Timed runs per model and batch size in the validation report."""


class CompressionJobSpec(CompressionJobCreate):
    """What a compression job runs: the request as accepted, with the model's task and teacher
    directory as they were when it was queued. Stored as the job row's ``spec`` by the API and
    read back by the worker (:mod:`edgefed.cloud.jobs.worker`): the one contract between them."""

    kind: Literal["compression"] = "compression"
    task: Task
    teacher_dir: PathText


class JobPublic(_Out):
    id: int
    kind: str
    status: JobStatus
    spec: dict[str, Any]
    progress: dict[str, Any]
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    """Worker processes started for this job so far (one more after each restart or crash)."""
    worker_pid: int | None
    """The worker process while the job runs."""
    cancel_requested: bool
    created_by: str | None
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    heartbeat_at: UtcDatetime | None


# --------------------------------------------------------------------------- deployments


class SelectorIn(_In):
    """Which agents: all conditions given must hold (ids AND labels)."""

    agents: Annotated[list[Identifier], Field(min_length=1, max_length=10_000)] | None = None
    labels: Labels | None = None

    @model_validator(mode="after")
    def _something(self) -> SelectorIn:
        if self.agents is None and not self.labels:
            raise ValueError("the selector needs agents or labels")
        return self


class StrategyIn(RolloutStrategy):
    """The rollout strategy and its gates: exactly the engine's
    :class:`~edgefed.cloud.rollout.strategy.RolloutStrategy` (same fields, bounds and defaults),
    with unknown fields refused and quality thresholds named like the validation report's
    figures. The deployment stores the whole validated strategy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_quality: Thresholds = Field(default_factory=dict)
    max_quality: Thresholds = Field(default_factory=dict)

    @model_validator(mode="after")
    def _canary_fields(self) -> StrategyIn:
        given = self.model_fields_set
        if self.kind != "canary" and given & {"canary_percent", "canary_count"}:
            raise ValueError("canary_percent and canary_count are only for kind=canary")
        if {"canary_percent", "canary_count"} <= given:
            raise ValueError("give canary_percent or canary_count, not both")
        if self.kind != "blue-green" and self.confirm_after_s is not None:
            raise ValueError("confirm_after_s is only for kind=blue-green")
        return self


class DeploymentCreate(_In):
    model: Identifier
    version: Id
    target: Identifier
    selector: SelectorIn
    strategy: StrategyIn = Field(default_factory=StrategyIn)


class DeploymentAgentPublic(_Out):
    agent_id: str
    canary: bool
    phase: AgentPhase
    generation: int | None
    detail: str | None
    updated_at: UtcDatetime


class RolloutEventPublic(_Out):
    id: int
    ts: UtcDatetime
    kind: str
    agent_id: str | None
    detail: dict[str, Any]


class DeploymentPublic(BaseModel):
    id: int
    model: str
    version: int
    target: str
    selector: dict[str, Any]
    strategy: dict[str, Any]
    status: DeploymentStatus
    previous_version: int | None
    rollback_version: int | None
    reason: str | None
    created_by: str | None
    created_at: UtcDatetime
    updated_at: UtcDatetime
    phase_started_at: UtcDatetime | None
    agents: list[DeploymentAgentPublic] = Field(default_factory=list)


class DeploymentDetail(DeploymentPublic):
    events: list[RolloutEventPublic] = Field(default_factory=list)


# --------------------------------------------------------------------------- audit, stats

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class AuditPublic(_Out):
    id: int
    ts: UtcDatetime
    actor: str
    action: str
    resource: str | None
    outcome: int
    detail: dict[str, Any]


class ModelLatency(BaseModel):
    count: int | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    ewma_ms: float | None = None


class AgentStats(BaseModel):
    id: str
    state: str
    last_seen: UtcDatetime | None
    models: list[dict[str, Any]]
    """Loaded models (name, version, role) from the last heartbeat or status."""
    latency: dict[str, ModelLatency]
    queue_depth: dict[str, int]


class FleetStats(BaseModel):
    agents: dict[str, int]
    """Agents by state: online, offline, unknown (and draining when any is)."""
    per_agent: list[AgentStats]
    models: dict[str, dict[str, list[str]]]
    """Per model, per version served: the agents serving it."""
    broker_connected: bool | None
    """Whether the controller's MQTT link is up (None: no fleet view running)."""


class RouteTarget(BaseModel):
    agent_id: str
    version: int
    role: str
    state: str
    p50_ms: float | None
    p99_ms: float | None
    ewma_ms: float | None
    queue_depth: int


class RoutingStats(BaseModel):
    models: dict[str, list[RouteTarget]]
    """Per model: the agents serving it, fastest (by p50) first."""


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------------------- inference


class InferIn(_In):
    """A text inference request routed by the gateway."""

    model: Identifier
    texts: Annotated[
        list[Annotated[str, StringConstraints(max_length=100_000)]],
        Field(min_length=1, max_length=64),
    ]
    parameters: dict[str, Any] = Field(default_factory=dict)
    """Model parameters (e.g. ``max_new_tokens`` for generation)."""
    priority: Literal["high", "normal", "low"] = "normal"
    timeout_s: Annotated[float, Field(gt=0, le=600)] | None = None
    """Deadline, relative; the controller's ``gateway_timeout_s`` when unset."""
    request_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    """Sent again with the same id, a request is answered once (targets de-duplicate)."""


class InferOut(BaseModel):
    request_id: str
    model: str
    version: int
    served_by: str
    target: str
    """The routing target that answered (an agent id or ``pool.<name>``)."""
    attempts: list[str]
    hedged: bool
    elapsed_ms: float
    outputs: dict[str, Any] | None
    timings_ms: dict[str, float] = Field(default_factory=dict)
