"""The `edgefed` command as a user runs it: a real process, real broker, real exit codes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

EDGEFED = [sys.executable, "-m", "edgefed.cli"]


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    full_env.update(env or {})
    full_env["COLUMNS"] = "200"
    return subprocess.run(
        [*EDGEFED, *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def test_help_lists_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for command in ("demo", "broker", "artifact", "version"):
        assert command in result.stdout


def test_invalid_settings_stop_the_command_with_exit_code_78_naming_the_variable() -> None:
    result = run("demo", env={"EDGEFED_MQTT__KEEPALIVE_S": "not-a-number"})
    assert result.returncode == 78
    assert "EDGEFED_MQTT__KEEPALIVE_S" in result.stderr


def test_a_missing_config_file_is_a_configuration_error(tmp_path: Path) -> None:
    result = run("--config", str(tmp_path / "nope.toml"), "demo")
    assert result.returncode == 78
    assert "does not exist" in result.stderr


def test_artifact_keygen_sign_verify_and_a_tampered_artifact_is_rejected(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(os.urandom(2048))
    (model / "tokenizer.json").write_text("{}")
    key = tmp_path / "keys" / "signing.key"
    key.parent.mkdir()

    assert run("artifact", "keygen", str(key)).returncode == 0
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    signed = run(
        "artifact",
        "sign",
        str(model),
        "--key",
        str(key),
        "--name",
        "minilm",
        "--version",
        "3",
        "--task",
        "feature-extraction",
    )
    assert signed.returncode == 0, signed.stderr
    pub = str(key.with_suffix(".pub"))
    ok = run("artifact", "verify", str(model), "--trust", pub, "--min-version", "3")
    assert ok.returncode == 0, ok.stderr
    assert "minilm v3" in ok.stdout

    too_old = run("artifact", "verify", str(model), "--trust", pub, "--min-version", "4")
    assert too_old.returncode == 65
    assert "version-too-low" in too_old.stderr

    data = bytearray((model / "model.onnx").read_bytes())
    data[100] ^= 0x01
    (model / "model.onnx").write_bytes(bytes(data))
    tampered = run("artifact", "verify", str(model), "--trust", pub)
    assert tampered.returncode == 65
    assert "hash-mismatch" in tampered.stderr


@pytest.mark.integration
def test_broker_command_serves_until_terminated_and_leaves_nothing_running(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    proc = subprocess.Popen(
        [*EDGEFED, "broker", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**env, "COLUMNS": "200"},
    )
    try:
        assert proc.stdout is not None
        url = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not url:
            line = proc.stdout.readline()
            found = re.search(r"EDGEFED_BROKER_URL=(mqtt://\S+)", line)
            url = found.group(1) if found else ""
        assert url, "the broker command did not print its URL"
        host, port = url.removeprefix("mqtt://").split(":")
        with socket.create_connection((host, int(port)), timeout=2):
            pass
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection((host, int(port)), timeout=1),
    ):
        pass
