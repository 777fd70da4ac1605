"""The agent's own configuration, written by ``edgefed edge join`` into its state directory
(``agent.json``, mode 0600: it holds credentials) and read by ``edgefed edge run``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from edgefed.common.errors import ConfigError
from edgefed.common.routing import POLICY_NAMES, RouterConfig
from edgefed.common.schemas import Identifier
from edgefed.common.settings import ArtifactSettings
from edgefed.edge.errors import NotJoined

CONFIG_NAME = "agent.json"
DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class LocalEndpoint(BaseModel):
    """Where local applications reach the agent when the uplink to the cloud is down.

    The agent serves the same topics (``edgefed/v1/<fleet>/agents/<id>/...``) on a broker on the
    device: a private mosquitto it starts on loopback, or an existing one (``broker_url``). It is
    not bridged to the cloud: the agent holds both connections itself, so MQTT v5 properties
    (response topic, correlation data, expiry) survive (mosquitto 2.0.11's v5 bridge fails
    with a protocol error; a v3.1.1 bridge would drop them)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    broker_url: str | None = None
    """An existing broker on the device; unset: the agent starts a private mosquitto."""
    port: int = Field(default=1884, ge=0, le=65535)
    """Loopback port of the private broker (0: a free one, chosen at start)."""


class OffloadConfig(BaseModel):
    """Where requests from local applications run: on the agent, on cloud worker pools, or
    split (head here, tail on a pool). See :mod:`edgefed.edge.offload`.

    A placement in the desired state (the controller's split plan) always applies unless
    ``follow_placements`` is off; these settings decide what happens without one, and how the
    router measures and fails over."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    """Offload models without a placement to ``pools`` when measured latency says so (off: they
    run on the agent only, exactly as without offloading)."""
    follow_placements: bool = True
    """Use the placements of the desired state (off: ignore them)."""
    pools: list[Identifier] = Field(default_factory=list)
    """Cloud worker pools for whole requests (with ``enabled``) and for split tails when a
    placement names none."""
    policy: str = "latency"
    """Routing policy among the targets (see :data:`edgefed.common.routing.POLICY_NAMES`)."""
    timeout_s: float = Field(default=10.0, gt=0)
    """Deadline of a local request that carries none (seconds)."""
    attempt_timeout_s: float | None = Field(default=None, gt=0)
    """Upper bound of one attempt on one target (unset: only the deadline bounds it)."""
    retries: int = Field(default=1, ge=0)
    """Further attempts on another target after a timeout or a target's error."""
    hedge: bool = False
    """Also send a request to a second target when the first is late (its recent p95)."""
    hedge_delay_s: float | None = Field(default=None, gt=0)
    """Fixed hedging delay instead of the first target's recent p95."""
    decay_s: float = Field(default=10.0, gt=0)
    """How fast a latency estimate forgets a slow period (peak-EWMA time constant, seconds)."""
    prior_ms: float = Field(default=20.0, gt=0)
    """Prior latency of the first-choice target when the placement gives no ``expected_ms``."""
    other_prior_factor: float = Field(default=4.0, ge=1)
    """The other targets start at this multiple of the first choice's prior: the placement is
    tried first, the others once measurements say it is slower or their estimates decay."""
    keep_raw_input_on_device: bool = False
    """Never send a request (texts or input tensors) to a cloud pool, whatever the placement
    says; split execution stays allowed (only activations leave)."""
    wire_dtype: Literal["float16", "float32"] = "float16"
    """How split activations travel to the tail (float16: half the bytes, cosine > 0.999)."""

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in POLICY_NAMES:
            raise ValueError(
                f"routing policy {v!r} is unknown: use one of {', '.join(POLICY_NAMES)}"
            )
        return v

    @model_validator(mode="after")
    def _pools_when_enabled(self) -> OffloadConfig:
        if self.enabled and not self.pools:
            raise ValueError("offload is enabled but names no pool: set offload.pools")
        if len(set(self.pools)) != len(self.pools):
            raise ValueError(f"offload.pools lists a pool twice: {self.pools}")
        return self

    def router_config(self) -> RouterConfig:
        """The shared router's settings for these (validated again there)."""
        return RouterConfig(
            policy=self.policy,
            decay_s=self.decay_s,
            retries=self.retries,
            attempt_timeout_s=self.attempt_timeout_s,
            default_timeout_s=self.timeout_s,
            hedge=self.hedge,
            hedge_delay_s=self.hedge_delay_s,
        )


class LinkConfig(BaseModel):
    """How the agent measures its uplink for heartbeats (:mod:`edgefed.edge.linkmeter`)."""

    model_config = ConfigDict(extra="forbid")

    min_transfer_bytes: int = Field(default=64 * 1024, ge=1)
    """Transfers smaller than this do not count towards the bandwidth estimate."""
    alpha: float = Field(default=0.3, gt=0, le=1)
    """Weight of each new sample in the smoothed RTT and bandwidth."""


class SessionsConfig(BaseModel):
    """Conversation sessions this agent holds (:mod:`edgefed.common.sessions.holder`).

    Sessions need the fleet's session key (``session_key`` of the agent's config, handed out at
    join): contexts are encrypted with it at rest and on the wire. Without it the agent holds no
    session and refuses session requests with a clear error."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    default_ttl_s: float = Field(default=3600.0, gt=0)
    max_ttl_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    max_context_bytes: int = Field(default=64_000, ge=256)
    max_messages: int = Field(default=200, ge=2)
    max_sessions: int = Field(default=1000, ge=1)
    replica_lag_s: float = Field(default=0.5, gt=0, le=60)
    """A change reaches the controller's replica at most this late while the link is up."""


class TrainingConfig(BaseModel):
    """Federated fine-tuning on this device (``edgefed[edge-train]``): the agent runs a Flower
    SuperNode that connects to the controller's SuperLink and trains on ``data_dir``.

    Flower 1.41 verifies the SuperLink with ``root_certificates`` (TLS, the default) and, when
    the SuperLink requires SuperNode authentication, proves this node with
    ``auth_private_key`` (an EC key on a NIST curve, OpenSSH private-key format; its public half,
    must be registered at the controller)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    data_dir: Path | None = None
    """Local data set the ClientApp trains on (JSONL); never leaves the device."""
    superlink: str = "127.0.0.1:9091"
    """The SuperLink's Fleet API as ``host:port``."""
    root_certificates: Path | None = None
    """PEM CA bundle that verifies the SuperLink (TLS)."""
    insecure: bool = False
    """Plain HTTP to the SuperLink (loopback and tests only)."""
    auth_private_key: Path | None = None
    auth_public_key: Path | None = None
    """Not passed to Flower 1.41 (it derives the public key); kept to show what to register."""
    max_restart_backoff_s: float = Field(default=60.0, gt=0)

    @field_validator("superlink")
    @classmethod
    def _host_port(cls, v: str) -> str:
        host, sep, port = v.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"superlink {v!r} must be HOST:PORT, e.g. controller.local:9091")
        return v

    @model_validator(mode="after")
    def _usable(self) -> TrainingConfig:
        if not self.enabled:
            return self
        if self.data_dir is None:
            raise ValueError("training is enabled but names no data_dir")
        if self.insecure and self.root_certificates is not None:
            raise ValueError("training: insecure and root_certificates exclude each other")
        if not self.insecure and self.root_certificates is None:
            raise ValueError(
                "training: set root_certificates (the CA of the SuperLink's certificate) or, "
                "on loopback only, insecure = true"
            )
        return self


class AgentConfig(BaseModel):
    """Everything the agent needs to run; secrets never leave the state directory."""

    model_config = ConfigDict(extra="forbid")

    agent_id: Identifier
    fleet: Identifier
    controller_url: str
    broker_url: str
    """The cloud broker (the local endpoint bridges to it when enabled)."""
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    agent_token: SecretStr | None = None
    """Bearer token for artifact downloads from the controller."""
    trusted_keys: list[str] = Field(min_length=1)
    """Base64 Ed25519 public keys whose signatures the agent accepts on artifacts."""
    labels: dict[str, str] = Field(default_factory=dict)
    device_profile: str | None = None
    state_dir: Path
    providers: list[str] = Field(default_factory=lambda: list(DEFAULT_PROVIDERS))
    """Execution providers in order of preference (those not available are skipped)."""
    local_endpoint: LocalEndpoint = Field(default_factory=LocalEndpoint)
    heartbeat_s: float = Field(default=10.0, gt=0)
    telemetry_s: float = Field(default=30.0, gt=0)
    """How often a summary of served requests goes into the outbox (when there were any)."""
    metrics_port: int | None = Field(default=9464, ge=0, le=65535)
    """Prometheus endpoint on this port (None: off; 0: a free port)."""
    max_queue: int = Field(default=1024, ge=1)
    """Requests waiting per priority before new ones are refused as overloaded."""
    max_artifact_bytes: int = Field(default=4 * 1024**3, ge=1)
    """Largest artifact this device accepts (all its files together): a bigger one is refused
    as ``oversized`` from its signed manifest, before a byte of it is downloaded. It caps the
    process-wide ``artifact`` settings (see :meth:`artifact_limits`)."""
    outbox_max_messages: int = Field(default=100_000, ge=1)
    """Telemetry and results kept on disk while the cloud is unreachable (oldest dropped)."""
    offload: OffloadConfig = Field(default_factory=OffloadConfig)
    """Offloading local applications' requests to the cloud or to split execution."""
    link: LinkConfig = Field(default_factory=LinkConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)
    session_key: SecretStr | None = None
    """The fleet's session key (base64, 32 bytes): encrypts session contexts at rest and on the
    wire. Handed out by the controller at join; unset: no sessions on this agent."""
    """Federated fine-tuning with a Flower SuperNode (off by default)."""
    emulated_speed_factor: float = Field(default=1.0, gt=0, le=1000)
    """Simulation only: after each batch really runs, wait ``(factor - 1) x`` its measured run
    time, so this host answers like a device that many times slower (at or below 1: host
    speed; a device faster than the host cannot be emulated)."""

    def artifact_limits(self, limits: ArtifactSettings) -> ArtifactSettings:
        """``limits`` with no file and no artifact larger than this device's
        ``max_artifact_bytes``."""
        cap = self.max_artifact_bytes
        return limits.model_copy(
            update={
                "max_file_bytes": min(limits.max_file_bytes, cap),
                "max_total_bytes": min(limits.max_total_bytes, cap),
            }
        )

    def save(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.state_dir / CONFIG_NAME
        data = self.model_dump(mode="json")
        for secret in ("mqtt_password", "agent_token", "session_key"):
            value = getattr(self, secret)
            data[secret] = value.get_secret_value() if value is not None else None
        tmp = path.with_name(f".{CONFIG_NAME}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, state_dir: Path) -> AgentConfig:
        path = state_dir / CONFIG_NAME
        if not path.is_file():
            raise NotJoined(
                f"no agent configuration in {state_dir}: run `edgefed edge join --controller URL "
                "--token TOKEN` first"
            )
        try:
            return cls.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise ConfigError(f"{path} is not a valid agent configuration: {exc}") from exc
