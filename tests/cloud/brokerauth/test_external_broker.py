"""The controller (``controller()``, in process) in front of a broker it did not start: it
connects as its own broker user, writes the password and ACL files where the broker reads them,
and signals the broker named by ``broker_pid_file`` when an agent joins."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from edgefed.cloud.brokerauth.files import BrokerAuth
from edgefed.cloud.brokerauth.settings import MqttAuthSettings
from edgefed.cloud.serve import controller
from edgefed.cloud.settings import load_cloud_settings
from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import BrokerAuthError
from tests.conftest import fast_settings
from tests.faults.drills.secured_fleet import mqtt_client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def test_a_joined_agent_gets_into_an_external_broker_the_controller_signals(
    tmp_path: Path,
) -> None:
    files_dir = tmp_path / "auth"
    # The broker needs files to start; the controller rewrites them from its registry.
    BrokerAuth(MqttAuthSettings(enabled=True, files_dir=files_dir), "ext", tmp_path).write([])
    with PrivateBroker(
        data_dir=tmp_path / "broker",
        password_file=files_dir / "passwd",
        acl_file=files_dir / "acl",
    ) as broker:
        settings = load_cloud_settings(
            broker_url=broker.url,
            fleet="ext",
            mqtt=fast_settings(broker.url, "ext").mqtt.model_dump(),
            controller={
                "data_dir": tmp_path / "ctl",
                "port": 0,
                "mqtt_auth": {
                    "enabled": True,
                    "files_dir": files_dir,
                    "broker_pid_file": broker.pid_file,
                },
            },
        )
        # Entering connects the controller's clients: anonymous ones would be refused.
        async with controller(settings) as running:
            admin = running.state.admin_token_file.read_text().strip()
            async with httpx.AsyncClient(base_url=running.url, trust_env=False) as http:
                token = (
                    await http.post(
                        "/api/v1/join-tokens",
                        json={},
                        headers={"Authorization": f"Bearer {admin}"},
                    )
                ).json()["token"]
                answer = (
                    await http.post("/api/v1/agents/join", json={"token": token, "hostname": "h"})
                ).json()
            user, password = answer["mqtt_username"], answer["mqtt_password"]
            refusals = 0
            while True:  # mosquitto handles SIGHUP in its own loop: a moment later
                try:
                    async with mqtt_client(broker.url, user, user, password):
                        break
                except BrokerAuthError:
                    refusals += 1
                    assert refusals < 100, "the broker never let the joined agent in"
            with pytest.raises(BrokerAuthError):
                async with mqtt_client(broker.url, "intruder", user, password + "x"):
                    pass
