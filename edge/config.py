"""The agent's own configuration, written by ``edgefed edge join`` into its state directory
(``agent.json``, mode 0600: it holds credentials) and read by ``edgefed edge run``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from edgefed.common.errors import ConfigError
from edgefed.common.schemas import Identifier
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
    outbox_max_messages: int = Field(default=100_000, ge=1)
    """Telemetry and results kept on disk while the cloud is unreachable (oldest dropped)."""

    def save(self) -> Path:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.state_dir / CONFIG_NAME
        data = self.model_dump(mode="json")
        for secret in ("mqtt_password", "agent_token"):
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
