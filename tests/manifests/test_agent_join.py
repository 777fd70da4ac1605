"""The agent pod's "join" init container, run for real: the script the rendered ConfigMap
carries, with the environment the rendered DaemonSet gives it, calling the real
``edgefed edge join`` against the controller stand-in of the agent tests (no cluster here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefed.common.artifact import generate_signing_key
from tests.edge.controller_stub import ControllerStub, running_controller

from . import checks
from .render import Obj, render_overlay


@dataclass
class JoinPod:
    """What the kubelet would give the init container, on the test's file system."""

    script: Path
    env: dict[str, str]
    state_dir: Path
    tokens: Path
    stub: ControllerStub

    def run(self, node: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env, "NODE_NAME": node}
        return subprocess.run(
            ["/bin/sh", str(self.script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


def join_container(objs: list[Obj]) -> tuple[Obj, dict[str, str], str]:
    """The init container, its environment (env values and envFrom ConfigMaps) and script."""
    (agent,) = [o for o in objs if o["kind"] == "DaemonSet"]
    (init,) = checks.pod_spec(agent)["initContainers"]
    config_maps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for source in init.get("envFrom") or []:
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in init.get("env") or [] if "value" in e})
    (volume,) = [v for v in checks.pod_spec(agent)["volumes"] if v["name"] == "join"]
    script = config_maps[volume["configMap"]["name"]]["data"]["join.sh"]
    return init, env, script


def pod_for(overlay: str, tmp_path: Path, stub: ControllerStub) -> JoinPod:
    init, env, script = join_container(render_overlay(overlay))
    assert init["command"] == ["/bin/sh", "/etc/edgefed/join/join.sh"]
    mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert env["EDGEFED_STATE_DIR"] == mounts["state"] == "/var/lib/edgefed"
    assert mounts["join-tokens"] == "/etc/edgefed/join-tokens"
    (tmp_path / "join.sh").write_text(script)
    state, tokens = tmp_path / "state", tmp_path / "tokens"
    state.mkdir()
    tokens.mkdir()
    env.update(
        {
            # The paths of the pod, moved to the test's folder; the rest as rendered.
            "EDGEFED_STATE_DIR": str(state),
            "EDGEFED_JOIN_TOKENS_DIR": str(tokens),
            "EDGEFED_JOIN_CONTROLLER_URL": stub.url,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(tmp_path),
        }
    )
    env.pop("SSL_CERT_FILE")  # the stand-in speaks plain HTTP
    return JoinPod(tmp_path / "join.sh", env, state, tokens, stub)


@pytest.fixture
def stub(tmp_path: Path) -> Iterator[ControllerStub]:
    stub = ControllerStub(
        store=tmp_path / "store",
        fleet="plant-3",
        broker_url="mqtts://edgefed-mosquitto.edgefed.svc.cluster.local:8883",
        signing_keys=[generate_signing_key().verify_key.to_base64()],
        join_tokens={"token-for-node-a"},
    )
    with running_controller(stub):
        yield stub


def test_the_first_start_on_a_node_joins_with_that_nodes_token(
    tmp_path: Path, stub: ControllerStub
) -> None:
    pod = pod_for("edge-cpu", tmp_path, stub)
    (pod.tokens / "node-a").write_text("token-for-node-a")

    result = pod.run("node-a")

    assert result.returncode == 0, result.stderr
    config = json.loads((pod.state_dir / "agent.json").read_text())
    assert config["agent_id"] == "agent-1"
    assert config["labels"] == {"node": "node-a"}
    assert [j["token"] for j in stub.joined] == ["token-for-node-a"]
    assert stub.joined[0]["device_profile"] is None


def test_a_restarted_pod_keeps_the_agents_identity_without_joining_again(
    tmp_path: Path, stub: ControllerStub
) -> None:
    pod = pod_for("edge-cpu", tmp_path, stub)
    (pod.tokens / "node-a").write_text("token-for-node-a")
    assert pod.run("node-a").returncode == 0
    (pod.tokens / "node-a").unlink()  # used up: a second join would fail

    again = pod.run("node-a")

    assert again.returncode == 0, again.stderr
    assert "keeping its identity" in again.stdout
    assert len(stub.joined) == 1


def test_a_node_without_a_token_fails_saying_which_key_the_secret_lacks(
    tmp_path: Path, stub: ControllerStub
) -> None:
    pod = pod_for("edge-cpu", tmp_path, stub)

    result = pod.run("node-b")

    assert result.returncode == 1
    assert "no join token for node node-b" in result.stderr
    assert "edgefed-join-tokens Secret under the key node-b" in result.stderr
    assert not (pod.state_dir / "agent.json").exists()
    assert stub.joined == []


def test_a_refused_token_fails_the_init_container(tmp_path: Path, stub: ControllerStub) -> None:
    pod = pod_for("edge-cpu", tmp_path, stub)
    (pod.tokens / "node-a").write_text("a-token-the-controller-never-issued")

    result = pod.run("node-a")

    assert result.returncode != 0
    assert "refused the join token" in result.stdout + result.stderr
    assert not (pod.state_dir / "agent.json").exists()


def test_a_jetson_node_joins_with_the_jetson_device_profile(
    tmp_path: Path, stub: ControllerStub
) -> None:
    pod = pod_for("edge-jetson", tmp_path, stub)
    (pod.tokens / "orin-1").write_text("token-for-node-a")

    result = pod.run("orin-1")

    assert result.returncode == 0, result.stderr
    assert stub.joined[0]["device_profile"] == "jetson-orin-nano"
    assert stub.joined[0]["labels"] == {"node": "orin-1"}
