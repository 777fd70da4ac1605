"""Joining a fleet against a real HTTP server standing in for the controller."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgefed.common.artifact import SigningKey
from edgefed.common.errors import ConfigError
from edgefed.edge.config import AgentConfig
from edgefed.edge.errors import ControllerUnavailable, JoinRefused, NotJoined
from edgefed.edge.join import join
from edgefed.edge.service import render_unit

from .controller_stub import ControllerStub, running_controller


def stub(tmp_path: Path, *tokens: str) -> ControllerStub:
    return ControllerStub(
        store=tmp_path / "store",
        fleet="plant-3",
        broker_url="mqtt://127.0.0.1:1883",
        signing_keys=[SigningKey.generate().verify_key.to_base64()],
        join_tokens=set(tokens),
        mqtt_username="agent-user",
        mqtt_password="agent-pass",
    )


def test_join_trades_a_token_for_an_identity_and_writes_a_private_config(tmp_path: Path) -> None:
    with running_controller(stub(tmp_path, "tok-1")) as ctl:
        config = join(
            ctl.url, "tok-1", tmp_path / "state", labels={"site": "plant-3"}, device_profile="x86"
        )
    path = tmp_path / "state" / "agent.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    saved = AgentConfig.load(tmp_path / "state")
    assert saved == config
    assert saved.agent_id == "agent-1"
    assert saved.fleet == "plant-3"
    assert saved.mqtt_password is not None
    assert saved.mqtt_password.get_secret_value() == "agent-pass"
    assert saved.labels == {"site": "plant-3"}
    assert ctl.joined[0]["labels"] == {"site": "plant-3"}
    assert ctl.joined[0]["device_profile"] == "x86"


def test_a_join_token_works_once(tmp_path: Path) -> None:
    with running_controller(stub(tmp_path, "tok-1")) as ctl:
        join(ctl.url, "tok-1", tmp_path / "a")
        with pytest.raises(JoinRefused, match="already used"):
            join(ctl.url, "tok-1", tmp_path / "b")
    assert not (tmp_path / "b" / "agent.json").exists()


def test_an_unreachable_controller_is_a_temporary_error(tmp_path: Path) -> None:
    from edgefed.common.broker import free_port

    with pytest.raises(ControllerUnavailable) as info:
        join(f"http://127.0.0.1:{free_port()}", "tok", tmp_path / "s", timeout_s=2)
    assert info.value.retryable


def test_a_controller_url_without_a_scheme_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="http"):
        join("ctl.example:8443", "tok", tmp_path / "s")


def test_running_before_joining_says_how_to_join(tmp_path: Path) -> None:
    with pytest.raises(NotJoined, match="edgefed edge join"):
        AgentConfig.load(tmp_path)


def test_the_systemd_unit_runs_the_agent_with_its_state_dir(tmp_path: Path) -> None:
    unit = render_unit(agent_id="agent-7", state_dir=tmp_path, user="edgefed")
    assert "edge run --state-dir" in unit
    assert f"ReadWritePaths={tmp_path}" in unit
    assert "User=edgefed" in unit
    assert "Restart=always" in unit


def test_edge_join_command_exits_77_for_a_refused_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    with running_controller(stub(tmp_path, "good")) as ctl:
        ok = subprocess.run(
            [sys.executable, "-m", "edgefed.cli", "edge", "join", "--controller", ctl.url,
             "--token", "good", "--state-dir", str(tmp_path / "s1"), "--label", "site=p3"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        bad = subprocess.run(
            [sys.executable, "-m", "edgefed.cli", "edge", "join", "--controller", ctl.url,
             "--token", "wrong", "--state-dir", str(tmp_path / "s2")],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "s1" / "agent.json").read_text())["labels"] == {"site": "p3"}
    assert bad.returncode == 77
    assert "refused" in bad.stderr
