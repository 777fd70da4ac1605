"""Settings of the controller (``edgefed cloud serve``), from ``EDGEFED_CONTROLLER__*``
environment variables or the ``[controller]`` table of the config file, validated at start-up.

Outside ``dev_mode`` unsafe settings are refused: plain-HTTP public URLs off loopback and
in-memory databases.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgefed.cloud.brokerauth.settings import MqttAuthSettings
from edgefed.cloud.orchestration.kube_settings import KubernetesSettings
from edgefed.cloud.orchestration.signals import AutoscalerSettings
from edgefed.cloud.sessions.settings import SessionSettings
from edgefed.common.devices import UnknownDeviceProfile, load_profile
from edgefed.common.routing import POLICY_NAMES
from edgefed.common.settings import Settings, load_settings
from edgefed.common.topics import ID_PATTERN


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/edgefed-controller")
    return Path.home() / ".local" / "share" / "edgefed-controller"


class SplitModelSettings(BaseModel):
    """How the controller places one model's requests (``[controller.split.models.NAME]``)."""

    model_config = ConfigDict(extra="forbid")

    pool: str = Field(default="default", pattern=ID_PATTERN)
    """Cloud worker pool that serves the model (all-cloud) and its tails (split)."""
    keep_raw_input_on_device: bool = False
    """Raw input never leaves the device: all-cloud is never chosen."""
    band: float = Field(default=0.25, ge=0, lt=1)
    """Hysteresis band: link figures moving less than this share never re-plan."""
    min_gain: float = Field(default=0.10, ge=0, lt=1)
    """A new choice must beat the one in force by this share of its estimate."""
    min_gain_ms: float = Field(default=0.5, ge=0)
    """... and by at least this many milliseconds."""
    dtype: Literal["fp32", "fp16", "int8"] = "fp16"
    """How activations cross the link in a split."""
    new_tokens: int = Field(default=16, ge=1)
    """Decoders: tokens generated per request, as the planner assumes."""
    edge_memory_bytes: int | None = Field(default=None, gt=0)
    """Memory for model weights on the device; the device profile's when unset."""


class SplitSettings(BaseModel):
    """Split placement (``[controller.split]``): re-plan where each model runs per agent from
    the link figures agents measure, and push the plan as a desired-state change."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    """Off by default: agents route by their own settings alone."""
    cloud_profile: str = "cloud-cpu"
    """Device profile of the cloud workers (a built-in profile name)."""
    models: dict[str, SplitModelSettings] = Field(default_factory=dict)
    """Models to place, by name; others are left alone."""

    @field_validator("cloud_profile")
    @classmethod
    def _known_profile(cls, v: str) -> str:
        try:
            load_profile(v)
        except UnknownDeviceProfile as exc:
            raise ValueError(exc.message) from None
        return v

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: dict[str, SplitModelSettings]) -> dict[str, SplitModelSettings]:
        for name in v:
            if not re.fullmatch(ID_PATTERN, name):
                raise ValueError(f"{name!r} is not a valid model name")
        return v

    @model_validator(mode="after")
    def _models_when_enabled(self) -> SplitSettings:
        if self.enabled and not self.models:
            raise ValueError("split placement is enabled but names no models to place")
        return self


class FederationSettings(BaseModel):
    """Federated learning with Flower (``[controller.federation]``): the controller runs a
    Flower SuperLink beside itself and starts runs on it; agents with training enabled run a
    SuperNode that connects to it.

    Flower 1.41 serves its Fleet, Control and Runtime APIs on one HTTP port (``port``).
    Without ``tls_cert`` the SuperLink runs ``--insecure`` (loopback and tests only: refused off
    loopback outside ``dev_mode``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    """Off by default: no SuperLink, no runs."""
    host: str = "127.0.0.1"
    """Address the SuperLink listens on (agents on other machines need one they can reach)."""
    port: int = Field(default=9091, ge=0, le=65535)
    """The SuperLink's one port (Fleet, Control and Runtime APIs); 0: a free one at start."""
    tls_cert: Path | None = None
    """PEM certificate the SuperLink serves with (its SANs must name ``host``)."""
    tls_key: Path | None = None
    tls_ca: Path | None = None
    """PEM CA that signed ``tls_cert``; SuperNodes and ``flwr`` verify the SuperLink with it."""
    supernode_auth: bool = False
    """Only registered SuperNodes may connect (needs TLS): each agent's EC public key (OpenSSH
    format, NIST curve) listed in ``supernode_public_keys`` is registered at start."""
    supernode_public_keys: list[Path] = Field(default_factory=list)
    start_timeout_s: float = Field(default=60.0, gt=0)
    """How long the SuperLink may take to accept connections."""
    restart_backoff_max_s: float = Field(default=60.0, gt=0)
    """Longest wait before restarting a SuperLink that died (doubling from 1 s)."""
    poll_s: float = Field(default=2.0, gt=0)
    """How often running federated runs are looked at (progress, outcome)."""
    promote: bool = True
    """The closed loop: a succeeded run's model is compressed (no distillation), gated, signed
    and registered as the next version, then rolled out with a canary to the agents of the
    model's latest deployment."""
    max_accuracy_drop: float = Field(default=0.02, ge=0, le=1)
    """Not promoted when the server-side accuracy fell more than this below round 0."""
    canary_count: int = Field(default=1, ge=1)
    canary_soak_s: float = Field(default=60.0, ge=0)

    @model_validator(mode="after")
    def _tls_complete(self) -> FederationSettings:
        tls = (self.tls_cert, self.tls_key, self.tls_ca)
        if any(v is not None for v in tls) and not all(v is not None for v in tls):
            raise ValueError(
                "federation TLS needs tls_cert, tls_key and tls_ca together (or none of them)"
            )
        if self.supernode_auth and self.tls_cert is None:
            raise ValueError(
                "federation.supernode_auth needs TLS: set tls_cert, tls_key and tls_ca "
                "(Flower refuses SuperNode authentication without it)"
            )
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class ControllerSettings(BaseModel):
    """Where the controller keeps its state and how it serves."""

    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(default_factory=default_data_dir)
    """Database (SQLite default), artifact store, signing key, admin token."""
    database_url: str | None = None
    """SQLAlchemy URL (``postgresql+psycopg://user@host/db``); SQLite in data_dir when unset."""
    artifact_store: Path | None = None
    """Signed artifacts (``NAME/vN/TARGET``); ``data_dir/artifacts`` when unset."""
    signing_key: Path | None = None
    """Artifact-signing key; ``data_dir/signing.key`` (created on first start) when unset."""
    host: str = "127.0.0.1"
    port: int = Field(default=8443, ge=0, le=65535)
    public_url: str | None = None
    """URL agents use to reach this controller (artifact downloads); from host/port when unset."""
    tls_cert: Path | None = None
    """PEM certificate (chain) the API serves HTTPS with; plain HTTP when unset."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    embedded_broker_host: str = "127.0.0.1"
    """Address the private mosquitto listens on when no ``broker_url`` is configured."""
    mqtt_auth: MqttAuthSettings = Field(default_factory=MqttAuthSettings)
    """Per-agent broker users and the ACL rendered from the registry (``[controller.mqtt_auth]``;
    off by default: a development broker stays open to anonymous loopback clients)."""
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest request body accepted (413 beyond)."""
    rate_limit_per_minute: int = Field(default=600, ge=1)
    """Sustained requests a minute per API token (per client address for calls without a
    valid token) before 429 with ``Retry-After``; health probes and ``/metrics`` are exempt."""
    rate_limit_burst: int | None = Field(default=None, ge=1)
    """Requests a caller may send at once above the sustained rate (the token bucket's size);
    one minute's worth (``rate_limit_per_minute``) when unset."""
    job_workers: int = Field(default=1, ge=1, le=16)
    """Compression jobs running at once (each in its own process)."""
    rollout_tick_s: float = Field(default=1.0, gt=0)
    """How often rollouts look at agent reports and move on."""
    gateway_pools: list[str] = Field(default_factory=lambda: ["default"])
    """Cloud worker pools ``POST /api/v1/infer`` may route to, beside the fleet's agents."""
    routing_policy: str = "latency"
    """How the gateway picks a target: latency, round-robin, least-outstanding or random."""
    gateway_timeout_s: float = Field(default=30.0, gt=0, le=600)
    """Deadline of a gateway request that names none."""
    split: SplitSettings = Field(default_factory=SplitSettings)
    """Split placement of models per agent from measured links (off by default)."""
    federation: FederationSettings = Field(default_factory=FederationSettings)
    """Federated learning: the Flower SuperLink beside the controller, and its runs."""
    autoscaler: dict[str, AutoscalerSettings] = Field(default_factory=dict)
    """Autoscaling per cloud worker pool (``[controller.autoscaler.POOL]``): decisions are
    computed and shown (``GET /api/v1/autoscaler``) and, with Kubernetes enabled, applied."""
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    """The Kubernetes API server the controller applies manifests to and scales workers on
    (``[controller.kubernetes]``; off by default)."""
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    """Conversation sessions (``[controller.sessions]``): TTLs, limits, placement, handoffs."""
    dev_mode: bool = False
    """Allow plain HTTP off loopback and similar conveniences for development."""

    @field_validator("routing_policy")
    @classmethod
    def _known_policy(cls, v: str) -> str:
        if v not in POLICY_NAMES:
            raise ValueError(f"unknown routing policy {v!r}: use one of {', '.join(POLICY_NAMES)}")
        return v

    @field_validator("autoscaler")
    @classmethod
    def _autoscaled_pools(cls, v: dict[str, AutoscalerSettings]) -> dict[str, AutoscalerSettings]:
        for pool in v:
            if not re.fullmatch(ID_PATTERN, pool):
                raise ValueError(f"autoscaler: {pool!r} is not a valid pool name")
        return v

    @field_validator("gateway_pools")
    @classmethod
    def _pool_names(cls, v: list[str]) -> list[str]:
        for pool in v:
            if not re.fullmatch(ID_PATTERN, pool):
                raise ValueError(f"{pool!r} is not a valid pool name")
        return v

    @model_validator(mode="after")
    def _safe_outside_dev(self) -> ControllerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.dev_mode:
            return self
        url = self.public_url or ""
        loopback = ("http://127.0.0.1", "http://localhost", "http://[::1]")
        if url.startswith("http://") and not url.startswith(loopback):
            raise ValueError(
                "public_url must use https:// off loopback (set dev_mode = true to allow http)"
            )
        fed = self.federation
        if fed.enabled and not fed.tls and fed.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(
                "federation without TLS only on loopback: set federation.tls_cert, tls_key and "
                "tls_ca (or dev_mode = true)"
            )
        if self.database_url is not None and ":memory:" in self.database_url:
            raise ValueError("an in-memory database loses everything on restart (dev_mode only)")
        return self

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'controller.db'}"

    @property
    def resolved_artifact_store(self) -> Path:
        return self.artifact_store or self.data_dir / "artifacts"

    @property
    def resolved_signing_key(self) -> Path:
        return self.signing_key or self.data_dir / "signing.key"

    @property
    def resolved_session_key(self) -> Path:
        return self.sessions.key_file or self.data_dir / "session.key"

    @property
    def resolved_public_url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return (self.public_url or f"{scheme}://{self.host}:{self.port}").rstrip("/")


class WorkerSettings(BaseModel):
    """A cloud worker (``edgefed cloud worker``): which models it serves, for which pool."""

    model_config = ConfigDict(extra="forbid")

    pool: str = Field(default="default", pattern=ID_PATTERN)
    """Workers of one pool share its requests (an MQTT shared subscription)."""
    models: list[str] = Field(default_factory=list)
    """``NAME`` (the newest version in the store) or ``NAME@VERSION``."""
    target: str = Field(default="x86-avx2", pattern=ID_PATTERN)
    """Which of each version's artifacts to load."""
    artifact_store: Path | None = None
    """The controller's artifact store (a shared volume); the controller's default when unset."""
    trusted_keys: list[Path] = Field(default_factory=list)
    """Public keys whose signatures are accepted; the controller's ``signing.pub`` when empty."""
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    max_queue: int = Field(default=1024, ge=1)
    max_batch_size: int = Field(default=8, ge=1, le=1024)
    max_batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    intra_op_threads: int | None = Field(default=None, ge=1)
    """ONNX Runtime threads per model (its default when unset: every core)."""
    load_report_s: float = Field(default=5.0, gt=0, le=300)
    """How often the worker publishes its load (arrivals, queue, p95, CPU, memory) for the
    autoscaler's pool monitor."""
    metrics_port: int | None = Field(default=9465, ge=0, le=65535)
    """``/livez``, ``/readyz`` and ``/metrics`` (Prometheus) port; 0: a free one; None: off. A
    port in use (several workers on one host) is logged and the worker serves without it."""
    metrics_host: str = "0.0.0.0"  # noqa: S104 - probes and scrapes come from outside the pod
    """Address the probe and metrics server listens on."""

    @field_validator("models")
    @classmethod
    def _model_specs(cls, v: list[str]) -> list[str]:
        for spec in v:
            parse_model_spec(spec)
        return v


def parse_model_spec(spec: str) -> tuple[str, int | None]:
    """``NAME`` or ``NAME@VERSION`` as (name, version or None); ValueError when malformed."""
    name, sep, version = spec.partition("@")
    if not re.fullmatch(ID_PATTERN, name):
        raise ValueError(f"model {spec!r}: {name!r} is not a valid model name")
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"model {spec!r}: the version after @ must be a positive integer")
    return name, int(version)


class CloudSettings(Settings):
    """The common settings plus the ``[controller]`` and ``[worker]`` tables."""

    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)


def load_cloud_settings(
    config_file: Path | str | None = None, **overrides: object
) -> CloudSettings:
    return load_settings(config_file, settings_cls=CloudSettings, **overrides)
