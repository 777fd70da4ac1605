"""Join with ``[controller.mqtt_auth] enabled``: each agent gets its own broker user and a
password the controller keeps only hashed, and the broker's files name it at once; without it
the join answer carries no MQTT credentials (the development default)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefed.cloud.brokerauth.passwords import verify_password
from edgefed.cloud.registry.models import Agent

from .conftest import Api, start_api


@pytest.fixture
def auth_api(tmp_path: Path) -> Iterator[Api]:
    yield from start_api(tmp_path / "ctl", mqtt_auth={"enabled": True})


def test_each_joining_agent_gets_its_own_broker_user_kept_hashed(
    auth_api: Api, tmp_path: Path
) -> None:
    api = auth_api
    data_dir = tmp_path / "ctl"
    answers = []
    for host in ("one", "two"):
        r = api.client.post(
            "/api/v1/agents/join", json={"token": api.join_token(), "hostname": host}
        )
        assert r.status_code == 200, r.text
        answers.append(r.json())
    first, second = answers
    assert first["mqtt_username"] == first["agent_id"]
    assert first["mqtt_password"]
    assert first["mqtt_password"] != second["mqtt_password"]

    state = api.app.state.controller
    with state.sessions() as session:
        stored = session.get(Agent, first["agent_id"])
        assert stored is not None
        assert stored.mqtt_password_hash is not None
        assert first["mqtt_password"] not in stored.mqtt_password_hash
        assert verify_password(first["mqtt_password"], stored.mqtt_password_hash)
        assert not verify_password(second["mqtt_password"], stored.mqtt_password_hash)

    # The broker's files were rendered at join: both agents, each in its own lane.
    broker_dir = data_dir / "broker"
    passwd = (broker_dir / "passwd").read_text()
    acl = (broker_dir / "acl").read_text()
    for answer in answers:
        assert f"\n{answer['agent_id']}:$7$" in f"\n{passwd}"
        assert f"user {answer['agent_id']}\n" in acl
    assert first["mqtt_password"] not in passwd
    assert (broker_dir / "passwd").stat().st_mode & 0o077 == 0


def test_without_mqtt_auth_the_join_answer_has_no_broker_credentials(
    api: Api, tmp_path: Path
) -> None:
    r = api.client.post("/api/v1/agents/join", json={"token": api.join_token(), "hostname": "h"})
    assert r.status_code == 200, r.text
    assert r.json()["mqtt_username"] is None
    assert r.json()["mqtt_password"] is None
    assert not (tmp_path / "ctl" / "broker" / "passwd").exists()
