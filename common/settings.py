"""Settings of edgefed, read from the environment (``EDGEFED_`` prefix) and an optional TOML file.

Nothing here runs at import: call :func:`load_settings` once at start-up and pass the result (or
its parts) down. Precedence, highest first: explicit keyword overrides, environment variables,
the config file (``--config PATH`` or ``EDGEFED_CONFIG``), defaults.

Nested fields use ``__`` in variable names: ``EDGEFED_MQTT__KEEPALIVE_S=15``. The two most
common settings have short names: ``EDGEFED_BROKER_URL`` and ``EDGEFED_FLEET``.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar, overload
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from edgefed.common.errors import ConfigError
from edgefed.common.topics import ID_PATTERN

CONFIG_ENV_VAR = "EDGEFED_CONFIG"
_SEGMENT = re.compile(ID_PATTERN)


class BrokerAddress(BaseModel):
    """A broker URL taken apart: ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...``."""

    model_config = ConfigDict(frozen=True)

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: SecretStr | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ConfigError(
                f"broker URL {url!r}: scheme must be mqtt:// or mqtts:// (got {parts.scheme!r})"
            )
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r} names no host")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r}: {exc}") from exc
        return cls(
            host=parts.hostname,
            port=port,
            tls=tls,
            username=unquote(parts.username) if parts.username else None,
            password=SecretStr(unquote(parts.password)) if parts.password else None,
        )


class MqttSettings(BaseModel):
    """How edgefed talks to the MQTT broker."""

    # validate_default: the backoff cap check must also run when only the initial delay is set.
    model_config = ConfigDict(extra="forbid", validate_default=True)

    username: str | None = None
    """User name for password auth (overrides one in the broker URL)."""
    password: SecretStr | None = None
    """Password for password auth (overrides one in the broker URL)."""
    ca_file: Path | None = None
    """CA bundle that signed the broker's certificate (TLS); system store when unset."""
    cert_file: Path | None = None
    """Client certificate for mutual TLS."""
    key_file: Path | None = None
    """Private key of the client certificate for mutual TLS."""
    tls_check_hostname: bool = True
    """Check that the broker's certificate names the host we connect to."""
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    """MQTT keepalive; a dead connection is noticed after about 1.5 times this."""
    session_expiry_s: int = Field(default=86_400, ge=0)
    """How long the broker keeps a disconnected client's session (subscriptions, queued QoS 1)."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    """Time allowed for TCP + TLS + CONNACK of one connection attempt."""
    publish_timeout_s: float = Field(default=10.0, gt=0)
    """Time allowed for the broker's PUBACK of a QoS 1 publish."""
    subscribe_timeout_s: float = Field(default=10.0, gt=0)
    """Time allowed for the broker's SUBACK."""
    request_timeout_s: float = Field(default=30.0, gt=0)
    """Default deadline of a request (also the message expiry sent with it)."""
    backoff_initial_s: float = Field(default=0.2, gt=0)
    """First reconnect delay; doubles per failed attempt, with full jitter."""
    backoff_max_s: float = Field(default=30.0, gt=0)
    """Cap of the reconnect delay."""
    receive_maximum: int = Field(default=64, ge=1, le=65535)
    """QoS 1 messages the broker may have in flight to us before we acknowledge them."""
    max_payload_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Largest payload accepted or sent."""

    @field_validator("backoff_max_s")
    @classmethod
    def _cap_not_below_initial(cls, v: float, info: Any) -> float:
        initial = info.data.get("backoff_initial_s")
        if initial is not None and v < initial:
            raise ValueError("backoff_max_s must be at least backoff_initial_s")
        return v


class PrivateBrokerSettings(BaseModel):
    """The private mosquitto that edgefed starts when no broker URL is given."""

    model_config = ConfigDict(extra="forbid")

    mosquitto_path: Path | None = None
    """Path of the mosquitto binary; searched on PATH and in /usr/sbin when unset."""
    persistence: bool = False
    """Keep sessions and retained messages on disk across broker restarts."""
    data_dir: Path | None = None
    """Where the broker's config, persistence and log go; a temporary directory when unset."""
    start_timeout_s: float = Field(default=10.0, gt=0)
    """Time allowed for the broker to accept connections."""


class ArtifactSettings(BaseModel):
    """Limits applied when verifying model artifacts."""

    model_config = ConfigDict(extra="forbid")

    max_file_bytes: int = Field(default=4 * 1024**3, ge=1)
    """Largest single file an artifact may hold."""
    max_total_bytes: int = Field(default=8 * 1024**3, ge=1)
    """Largest artifact (sum of its files)."""
    max_files: int = Field(default=256, ge=1)
    """Most files an artifact may list."""


class Settings(BaseSettings):
    """All settings of an edgefed process."""

    model_config = SettingsConfigDict(
        env_prefix="EDGEFED_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    broker_url: str | None = None
    """URL of an existing MQTT v5 broker; unset means start a private mosquitto."""
    fleet: str = "default"
    """Fleet name: the topic tree is ``edgefed/v1/<fleet>/...``."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["rich", "json", "plain"] = "rich"
    """``rich`` for a terminal, ``json`` (one object per line) for log shippers, ``plain``."""
    """Log level of edgefed's loggers."""
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    broker: PrivateBrokerSettings = Field(default_factory=PrivateBrokerSettings)
    artifact: ArtifactSettings = Field(default_factory=ArtifactSettings)

    @field_validator("fleet")
    @classmethod
    def _fleet_is_a_topic_segment(cls, v: str) -> str:
        if not _SEGMENT.match(v):
            raise ValueError(
                "fleet must be 1-64 characters of letters, digits, '_', '.', '-' "
                "and start with a letter or digit"
            )
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker_url_parses(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                BrokerAddress.parse(v)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
        return v

    def broker_address(self) -> BrokerAddress:
        """The broker to connect to; raises :class:`ConfigError` when none is configured."""
        if self.broker_url is None:
            raise ConfigError(
                "no broker configured: set EDGEFED_BROKER_URL=mqtt://host:port "
                "or start a private one with `edgefed broker`"
            )
        return BrokerAddress.parse(self.broker_url)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


S = TypeVar("S", bound="Settings")


@overload
def load_settings(
    config_file: Path | str | None = None, *, settings_cls: None = None, **overrides: Any
) -> Settings: ...


@overload
def load_settings(
    config_file: Path | str | None = None, *, settings_cls: type[S], **overrides: Any
) -> S: ...


def load_settings(
    config_file: Path | str | None = None,
    *,
    settings_cls: type[Settings] | None = None,
    **overrides: Any,
) -> Settings:
    """Build and validate the settings once, at start-up.

    ``config_file`` (or ``$EDGEFED_CONFIG``) names a TOML file with the same structure as the
    settings (``fleet = "plant-3"``, ``[mqtt]`` ``keepalive_s = 15``). Raises
    :class:`ConfigError` naming every invalid field.
    """
    path = config_file if config_file is not None else os.environ.get(CONFIG_ENV_VAR)
    toml_file: Path | None = None
    if path:
        toml_file = Path(path)
        if not toml_file.is_file():
            raise ConfigError(f"config file {toml_file} does not exist or is not a file")
        try:
            with toml_file.open("rb") as fh:
                tomllib.load(fh)
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise ConfigError(f"config file {toml_file} is not valid TOML: {exc}") from exc

    base = settings_cls or Settings
    config: Any = {**base.model_config, "toml_file": toml_file}
    configured: type[Settings] = type(
        base.__name__, (base,), {"model_config": config, "__module__": base.__module__}
    )
    try:
        return configured(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, toml_file)) from exc


def _describe(exc: ValidationError, toml_file: Path | None) -> str:
    lines = ["invalid settings" + (f" (config file {toml_file})" if toml_file else "") + ":"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        env = "EDGEFED_" + "__".join(str(p) for p in err["loc"]).upper()
        lines.append(f"  {loc} (env {env}): {err['msg']}")
    return "\n".join(lines)
