"""Joining a fleet: the device trades a single-use join token for its identity and credentials.

Contract with the controller (``POST {controller}/api/v1/agents/join``)::

    request   {"token": str, "hostname": str, "labels": {str: str},
               "device_profile": str | null, "agent_version": str}
    200       {"agent_id": str, "fleet": str, "broker_url": str,
               "mqtt_username": str | null, "mqtt_password": str | null,
               "agent_token": str | null, "artifact_signing_keys": [base64 Ed25519 keys],
               "labels": {str: str} (optional: the labels the controller recorded),
               "session_key": str | null (the fleet's session key, base64; null: the
               controller holds no sessions)}
    401/403   the token is invalid, expired or already used

The answer becomes ``<state_dir>/agent.json`` (mode 0600).
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from edgefed import __version__
from edgefed.common.artifact import VerifyKey
from edgefed.common.errors import ArtifactError, ConfigError
from edgefed.common.sessions.crypto import FleetKey
from edgefed.common.sessions.errors import SessionKeyError
from edgefed.edge.config import AgentConfig
from edgefed.edge.errors import ControllerUnavailable, JoinRefused

JOIN_PATH = "/api/v1/agents/join"


class JoinAnswer(BaseModel):
    model_config = ConfigDict(extra="ignore")

    agent_id: str
    fleet: str
    broker_url: str
    mqtt_username: str | None = None
    mqtt_password: SecretStr | None = None
    agent_token: SecretStr | None = None
    artifact_signing_keys: list[str] = Field(min_length=1)
    labels: dict[str, str] | None = None
    """The labels the controller recorded (the agent's own and its join token's)."""
    session_key: SecretStr | None = None
    """The fleet's session key (base64): encrypts conversation contexts at rest and in transit."""


def join(
    controller_url: str,
    token: str,
    state_dir: Path,
    *,
    labels: dict[str, str] | None = None,
    device_profile: str | None = None,
    timeout_s: float = 15.0,
    transport: httpx.BaseTransport | None = None,
) -> AgentConfig:
    """Enrol this device with the controller and write its configuration; return it."""
    if not token:
        raise ConfigError("a join token is required (--token)")
    base = controller_url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise ConfigError(f"controller URL {controller_url!r} must start with http:// or https://")
    body: dict[str, Any] = {
        "token": token,
        "hostname": socket.gethostname(),
        "labels": dict(labels or {}),
        "device_profile": device_profile,
        "agent_version": __version__,
    }
    try:
        with httpx.Client(timeout=timeout_s, transport=transport) as client:
            response = client.post(base + JOIN_PATH, json=body)
    except httpx.HTTPError as exc:
        raise ControllerUnavailable(f"cannot reach the controller at {base}: {exc}") from exc
    if response.status_code in (401, 403):
        raise JoinRefused(f"the controller refused the join token: {_detail(response)}")
    if response.status_code >= 500:
        raise ControllerUnavailable(
            f"the controller answered {response.status_code}: {_detail(response)}",
            retry_after=5.0,
        )
    if response.status_code != 200:
        raise JoinRefused(f"join failed ({response.status_code}): {_detail(response)}")
    try:
        answer = JoinAnswer.model_validate_json(response.content)
        for key in answer.artifact_signing_keys:
            VerifyKey.from_base64(key)
        if answer.session_key is not None:
            FleetKey.from_base64(answer.session_key.get_secret_value())
    except (ValidationError, ArtifactError, SessionKeyError) as exc:
        raise ControllerUnavailable(f"the controller's join answer is not valid: {exc}") from exc
    config = AgentConfig(
        agent_id=answer.agent_id,
        fleet=answer.fleet,
        controller_url=base,
        broker_url=answer.broker_url,
        mqtt_username=answer.mqtt_username,
        mqtt_password=answer.mqtt_password,
        agent_token=answer.agent_token,
        session_key=answer.session_key,
        trusted_keys=answer.artifact_signing_keys,
        labels=dict(answer.labels) if answer.labels is not None else dict(labels or {}),
        device_profile=device_profile,
        state_dir=state_dir.resolve(),
    )
    config.save()
    return config


def _detail(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])
    return str(data)[:200]
