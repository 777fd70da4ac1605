"""``edgefed cloud serve`` and ``edgefed cloud join-token`` as a user runs them: one process,
a private broker when none is configured (same port after a restart, so enrolled agents keep
reaching it), JSON log lines when asked, a clean stop on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from edgefed.common.broker import free_port
from edgefed.edge.join import join
from tests.cloud.e2e.world import clean_env

pytestmark = pytest.mark.timeout(120)

CLI = (sys.executable, "-m", "edgefed.cli")


def serve(data_dir: Path, port: int, **env: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "edgefed.cli", "cloud", "serve", "--port", str(port)]
    command += ["--data-dir", str(data_dir)]
    return subprocess.Popen(
        command,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the controller never became ready")


def stop(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def test_serve_starts_a_private_broker_enrols_agents_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "ctl"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve(data_dir, port, EDGEFED_LOG_FORMAT="json")
    try:
        wait_ready(url, proc)
        token_run = subprocess.run(
            [*CLI, "cloud", "join-token", "--controller", url, "--label", "site=lab"],
            env=clean_env(EDGEFED_CONTROLLER__DATA_DIR=str(data_dir)),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert token_run.returncode == 0, token_run.stderr
        config = join(url, token_run.stdout.strip(), tmp_path / "agent")
    finally:
        code, _, err = stop(proc)
    assert code == 0, err
    broker_port = int((data_dir / "broker" / "port").read_text())
    assert config.broker_url == f"mqtt://127.0.0.1:{broker_port}"
    assert config.labels == {"site": "lab"}
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert records, err
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    assert any(r["message"] == "controller stopped" for r in records)
    assert all("color_message" not in r for r in records)

    # A restart brings the private broker back on the port the agent was given.
    proc = serve(data_dir, port)
    try:
        wait_ready(url, proc)
        with socket_to(broker_port):
            pass
    finally:
        code, _, err = stop(proc)
    assert code == 0, err


def test_join_token_without_a_token_or_admin_file_says_what_to_do(tmp_path: Path) -> None:
    run = subprocess.run(
        [*CLI, "cloud", "join-token", "--controller", "http://127.0.0.1:9"],
        env=clean_env(EDGEFED_CONTROLLER__DATA_DIR=str(tmp_path / "none")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 78  # EX_CONFIG
    said = run.stderr.replace("\n", "")  # the console wraps a long path
    assert "admin.token" in said
    assert "--token" in said


class socket_to:  # noqa: N801 - used as a context manager
    """A TCP connection to a loopback port (fails when nothing listens)."""

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)

    def __enter__(self) -> socket_to:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
