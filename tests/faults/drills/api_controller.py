"""A real controller for the API drills (rows 12 and 13): ``edgefed cloud serve`` as a process
on a free loopback port, with a mosquitto of its own, and helpers to make tokens and enrol
agents through the API the way an operator and an agent do."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from edgefed.common.broker import PrivateBroker


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token is not None else {}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Controller:
    """A started controller process and its bootstrap admin token."""

    url: str
    admin_token: str
    proc: subprocess.Popen[bytes]
    data_dir: Path

    def call(self, method: str, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", headers=bearer(token), timeout=30, **kw)

    def token(self, *scopes: str, name: str = "t", **body: Any) -> tuple[int, str]:
        """A new API token (id, secret), made by the admin."""
        r = self.call(
            "POST",
            "/api/v1/tokens",
            self.admin_token,
            json={"name": name, "scopes": list(scopes), **body},
        )
        if r.status_code != 201:
            raise RuntimeError(f"token not created: {r.status_code} {r.text}")
        return int(r.json()["id"]), str(r.json()["token"])

    def enrol(self, hostname: str) -> tuple[str, str]:
        """An agent enrolled through the join route: (agent id, agent token)."""
        r = self.call("POST", "/api/v1/join-tokens", self.admin_token, json={})
        if r.status_code != 201:
            raise RuntimeError(f"join token not created: {r.status_code} {r.text}")
        join = self.call(
            "POST",
            "/api/v1/agents/join",
            json={"token": r.json()["token"], "hostname": hostname, "labels": {}},
        )
        if join.status_code != 200:
            raise RuntimeError(f"agent not enrolled: {join.status_code} {join.text}")
        return str(join.json()["agent_id"]), str(join.json()["agent_token"])

    def rss_bytes(self) -> int:
        """Resident memory of the controller process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS for the controller process")


@contextmanager
def controller(workdir: Path, **settings: str) -> Iterator[Controller]:
    """``edgefed cloud serve`` with ``[controller]`` ``settings`` (as environment variables),
    ready (``/readyz``) on a free loopback port; stopped (SIGTERM, then SIGKILL) on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = workdir / "controller"
    port = free_port()
    with PrivateBroker(data_dir=workdir / "broker") as broker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
        env.update(
            EDGEFED_BROKER_URL=broker.url,
            EDGEFED_FLEET="apidrill",
            EDGEFED_LOG_FORMAT="plain",
            EDGEFED_CONTROLLER__DATA_DIR=str(data_dir),
            EDGEFED_CONTROLLER__PORT=str(port),
        )
        env.update({f"EDGEFED_CONTROLLER__{k.upper()}": v for k, v in settings.items()})
        command = [sys.executable, "-m", "edgefed.cli", "cloud", "serve"]
        with (workdir / "controller.log").open("wb") as log:
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_ready(proc, url, workdir / "controller.log")
            admin = (data_dir / "admin.token").read_text().strip()
            yield Controller(url, admin, proc, data_dir)
        finally:
            _stop(proc)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"the controller exited with {proc.returncode}: {log.read_text()[-2000:]}"
            )
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the controller was not ready in 60 s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
