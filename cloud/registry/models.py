"""Tables of the registry (SQLAlchemy 2 declarative). Changing them needs an Alembic migration
(``cloud/registry/migrations``); a test checks that the migrations produce exactly these tables.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class DeploymentStatus(enum.StrEnum):
    PENDING = "pending"
    CANARY = "canary"
    SOAKING = "soaking"
    ROLLING = "rolling"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


class FederationRunStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"


class SessionState(enum.StrEnum):
    """Where a conversation session stands (see :mod:`edgefed.cloud.sessions`)."""

    ACTIVE = "active"
    EXPIRED = "expired"
    """A tombstone: its context is wiped here and deleted on every holder."""
    DELETED = "deleted"
    """A tombstone: deleted by its owner; copies deleted on every holder."""


class AgentPhase(enum.StrEnum):
    """Where one agent stands in a deployment."""

    WAITING = "waiting"
    DESIRED = "desired"
    LOADED = "loaded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(cls, name=name, native_enum=False, values_callable=lambda e: [m.value for m in e])


class Model(Base):
    """A model family: a teacher registered by a user, and the versions compressed from it."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    task: Mapped[str] = mapped_column(String(32))
    teacher_dir: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(128))

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", order_by="ModelVersion.version"
    )


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    parent_version: Mapped[int | None] = mapped_column(Integer)
    note: Mapped[str | None] = mapped_column(Text)
    """Why this version exists, e.g. ``rollback of v3 to the content of v2``."""
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions")
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="version", order_by="Artifact.target"
    )


class Artifact(Base):
    """A signed artifact of one version for one device target, with its validation report."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("version_id", "target"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    target: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    """Relative to the artifact store: ``NAME/vN/TARGET``."""
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    version: Mapped[ModelVersion] = relationship(back_populates="artifacts")


class Agent(Base):
    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64))
    hostname: Mapped[str | None] = mapped_column(String(255))
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    device_profile: Mapped[str | None] = mapped_column(String(64))
    agent_version: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16), default="unknown")
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_status: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    last_heartbeat: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    desired_generation: Mapped[int] = mapped_column(Integer, default=0)
    """Generation of the last desired state published to this agent (only goes up)."""
    desired_state: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    mqtt_password_hash: Mapped[str | None] = mapped_column(String(160))
    """mosquitto ``$7$`` hash of the broker password issued at join (None: none issued)."""


class JoinToken(Base):
    __tablename__ = "join_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    labels: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """Labels every agent joining with this token gets (merged with its own)."""
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    used_by: Mapped[str | None] = mapped_column(String(64))


class ApiToken(Base):
    """A bearer token: stored as the SHA-256 of a 256-bit random secret, never in clear."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[Any]] = mapped_column(default=list)
    agent_id: Mapped[str | None] = mapped_column(ForeignKey("agents.id", ondelete="CASCADE"))
    """Set for agent tokens: they reach only this agent's resources."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Job(Base):
    """A long-running job (compression, federation) run by a worker process."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus, "job_status"))
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text)
    worker_pid: Mapped[int | None] = mapped_column(Integer)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Deployment(Base):
    """A request to run a model version on a set of agents, and its rollout's state."""

    __tablename__ = "deployments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    target: Mapped[str] = mapped_column(String(64))
    selector: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """``{"agents": [...]}`` and/or ``{"labels": {...}}``."""
    strategy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[DeploymentStatus] = mapped_column(_enum(DeploymentStatus, "deployment_status"))
    previous_version: Mapped[int | None] = mapped_column(Integer)
    rollback_version: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    phase_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    agents: Mapped[list[DeploymentAgent]] = relationship(back_populates="deployment")


class DeploymentAgent(Base):
    __tablename__ = "deployment_agents"

    deployment_id: Mapped[int] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    agent_id: Mapped[str] = mapped_column(
        ForeignKey("agents.id", ondelete="CASCADE"), primary_key=True
    )
    canary: Mapped[bool] = mapped_column(default=False)
    phase: Mapped[AgentPhase] = mapped_column(_enum(AgentPhase, "agent_phase"))
    generation: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    deployment: Mapped[Deployment] = relationship(back_populates="agents")


class RolloutEvent(Base):
    __tablename__ = "rollout_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    agent_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class AuditRecord(Base):
    """Who did what, when, with which outcome: one row per mutating API call."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(128))
    resource: Mapped[str | None] = mapped_column(Text)
    outcome: Mapped[int] = mapped_column(Integer)
    """HTTP status of the call."""
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class FederationRun(Base):
    """A federated fine-tuning run on the controller's Flower SuperLink (see
    :mod:`edgefed.cloud.federation.service`)."""

    __tablename__ = "federation_runs"
    __table_args__ = (Index("ix_federation_runs_status", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    """Name of the registered model the run improves."""
    flwr_run_id: Mapped[str | None] = mapped_column(String(32))
    """Flower's run id (an unsigned 64-bit number, kept as text)."""
    status: Mapped[FederationRunStatus] = mapped_column(
        _enum(FederationRunStatus, "federation_run_status")
    )
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The request as accepted, plus the model directory and the run's out-dir."""
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The ServerApp's ``progress.json`` as last read (rounds, accepted/rejected updates)."""
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    loop: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """State of the closed loop after success (compression, rollout)."""
    error: Mapped[str | None] = mapped_column(Text)
    stop_requested: Mapped[bool] = mapped_column(default=False)
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class SessionRecord(Base):
    """A conversation session (issue 11): who owns it, where it lives, and the controller's
    replica of its context, sealed with the fleet's session key (never in clear).

    Expired and deleted sessions stay as tombstones (context wiped) so that the API can say
    what happened to them, and so that holders that were offline get their ``delete`` later
    (``pending_deletes``).
    """

    __tablename__ = "sessions"
    __table_args__ = (
        Index("ix_sessions_owner", "owner"),
        Index("ix_sessions_state_expires", "state", "expires_at"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    """``token:<id>`` (HTTP API) or ``key:<digest>`` (local apps of an agent)."""
    model: Mapped[str] = mapped_column(String(64))
    holder: Mapped[str | None] = mapped_column(String(64))
    """The agent that keeps the session now (None: no turn yet, or its holder dropped it)."""
    version: Mapped[int] = mapped_column(Integer, default=0)
    """Version of the stored context (every turn bumps it; older copies never replace it)."""
    state: Mapped[SessionState] = mapped_column(_enum(SessionState, "session_state"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When it expired or was deleted (tombstones)."""
    context: Mapped[bytes | None] = mapped_column(LargeBinary)
    """The sealed context record (AES-256-GCM, bound to fleet and session id); None once gone."""
    context_bytes: Mapped[int] = mapped_column(Integer, default=0)
    messages: Mapped[int] = mapped_column(Integer, default=0)
    pending_deletes: Mapped[list[Any]] = mapped_column(default=list)
    """Holders that may still keep a copy they must delete (previous holders after a handoff,
    every holder once the session ended); cleared as each confirms."""
    last_handoff: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The last :class:`~edgefed.common.sessions.wire.HandoffRecord` (JSON)."""
    handoffs: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
