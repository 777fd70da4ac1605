"""``[controller.sessions]``: conversation sessions on the controller."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefed.common.sessions.context import SessionLimits

__all__ = ["SessionSettings"]


class SessionSettings(BaseModel):
    """How the controller keeps, places and moves sessions."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    """Serve ``/api/v1/sessions`` and keep the replicas holders send."""
    key_file: Path | None = None
    """The fleet's session key (32 bytes, AES-256-GCM); ``data_dir/session.key`` (created on
    first start, mode 0600) when unset. Agents get the same key in their config."""
    default_ttl_s: float = Field(default=3600.0, gt=0)
    """Idle lifetime of a session that asks for none (every turn restarts it)."""
    max_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    """Longest idle lifetime a session may ask for (more is refused)."""
    max_context_bytes: int = Field(default=64_000, ge=1)
    """UTF-8 bytes of system prompt, messages and metadata a session may hold."""
    max_messages: int = Field(default=200, ge=2)
    max_sessions_per_owner: int = Field(default=1000, ge=1)
    move_factor: float = Field(default=2.0, gt=1.0)
    """A live holder keeps its session unless its latency for the model is over this many
    times the best live agent's (then the session moves, reason ``latency``)."""
    turn_timeout_s: float = Field(default=60.0, gt=0, le=600)
    """How long a turn may take on its holder (504 beyond)."""
    control_timeout_s: float = Field(default=15.0, gt=0, le=600)
    """How long export, delete and other control requests to a holder may take."""
    adopt_timeout_s: float = Field(default=60.0, gt=0, le=600)
    """How long a holder may take to adopt a session (a re-run prefills the whole history)."""
    replicas: bool = True
    """Keep the replicas holders publish (``agents/+/sessions-replica``)."""
    adopt_unknown_replicas: bool = True
    """Keep replicas of sessions the controller did not create (local apps' sessions) too, so
    they can move when their holder is gone."""
    kv_handoff: bool = True
    """Handoffs may ship the KV cache (else they always re-run the prompt)."""
    kv_int8: bool = False
    """Handoffs may ship the KV cache quantised to int8 (smaller, slightly lossy)."""
    kv_bytes_per_token: dict[str, int] = Field(default_factory=dict)
    """fp16 KV-cache bytes per token by model, for handoff planning before a holder said."""
    prefill_ms_per_token: float = Field(default=1.0, gt=0)
    """Prefill cost assumed for a holder until its re-run adopts were measured."""
    prefill_fixed_ms: float = Field(default=5.0, ge=0)
    default_rtt_ms: float = Field(default=20.0, ge=0)
    """Link to a holder assumed until its heartbeats report one."""
    default_bandwidth_mbps: float = Field(default=100.0, gt=0)
    sweep_s: float = Field(default=5.0, gt=0)
    """How often expired sessions are looked for and owed deletes retried."""
    tombstone_retention_s: float = Field(default=30 * 24 * 3600.0, gt=0)
    """How long an expired or deleted session is remembered (410 / 404 after that)."""

    @model_validator(mode="after")
    def _ttl_order(self) -> SessionSettings:
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError("sessions.default_ttl_s is over sessions.max_ttl_s")
        return self

    @property
    def limits(self) -> SessionLimits:
        return SessionLimits(
            max_context_bytes=self.max_context_bytes, max_messages=self.max_messages
        )
