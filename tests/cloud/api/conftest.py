"""Fixtures of the control API's tests: a real controller app (real SQLite file, real Alembic
migrations, real signing key) started through its lifespan, the bootstrap admin token it
wrote, and helpers to make more tokens and enrol agents through the API itself."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from edgefed.cloud.api.app import create_app
from edgefed.cloud.settings import CloudSettings, load_cloud_settings
from edgefed.common.broker import PrivateBroker

BROKER_URL = "mqtt://127.0.0.1:1883"
"""Recorded by the controller and handed to joining agents; these tests never dial it."""


def controller_settings(data_dir: Path, **controller: Any) -> CloudSettings:
    """Settings of a controller keeping everything under ``data_dir``."""
    return load_cloud_settings(
        broker_url=BROKER_URL,
        fleet="apitest",
        controller={"data_dir": data_dir, **controller},
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Api:
    """A started controller app and its bootstrap admin token."""

    client: TestClient
    settings: CloudSettings
    admin_token: str
    _agents: dict[str, str] = field(default_factory=dict)

    @property
    def app(self) -> FastAPI:
        app = self.client.app
        assert isinstance(app, FastAPI)
        return app

    @property
    def admin(self) -> dict[str, str]:
        return bearer(self.admin_token)

    def token(
        self,
        *scopes: str,
        name: str = "t",
        agent_id: str | None = None,
        expires_in_s: int | None = None,
    ) -> tuple[int, str]:
        """A new API token (id, secret) made by the admin through the API."""
        body: dict[str, Any] = {"name": name, "scopes": list(scopes)}
        if agent_id is not None:
            body["agent_id"] = agent_id
        if expires_in_s is not None:
            body["expires_in_s"] = expires_in_s
        r = self.client.post("/api/v1/tokens", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        return int(r.json()["id"]), str(r.json()["token"])

    def join_token(self, **body: Any) -> str:
        r = self.client.post("/api/v1/join-tokens", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def enrol(self, hostname: str = "dev", **labels: str) -> tuple[str, str]:
        """Enrol an agent through the join route: (agent id, agent token)."""
        r = self.client.post(
            "/api/v1/agents/join",
            json={"token": self.join_token(), "hostname": hostname, "labels": labels},
        )
        assert r.status_code == 200, r.text
        return str(r.json()["agent_id"]), str(r.json()["agent_token"])


def start_api(data_dir: Path, **controller: Any) -> Iterator[Api]:
    settings = controller_settings(data_dir, **controller)
    with TestClient(create_app(settings)) as client:
        token_file = data_dir / "admin.token"
        token = token_file.read_text().strip() if token_file.exists() else ""
        yield Api(client, settings, token)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    """A started controller of this test's own (data in ``tmp_path/ctl``)."""
    yield from start_api(tmp_path / "ctl")


@pytest.fixture(scope="module")
def shared_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """One started controller for a whole module (tests that do not disturb each other)."""
    yield from start_api(tmp_path_factory.mktemp("ctl"))


def loopback_socket() -> socket.socket:
    """A listening-ready TCP socket bound to a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServedApp:
    """An app served by a real uvicorn server on a loopback socket, in a thread."""

    def __init__(self, app: FastAPI, sock: socket.socket | None = None) -> None:
        self.sock = sock or loopback_socket()
        config = uvicorn.Config(app, log_level="warning", lifespan="on", ws="none")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ServedApp:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@dataclass
class Served:
    url: str
    settings: CloudSettings
    admin_token: str

    def client(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers=bearer(token or self.admin_token), timeout=30
        )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, broker: PrivateBroker) -> Iterator[Served]:
    """The controller app behind a real uvicorn server (loopback, free port); its broker URL
    is the session's real mosquitto."""
    data_dir = tmp_path_factory.mktemp("served")
    sock = loopback_socket()
    port = sock.getsockname()[1]
    settings = load_cloud_settings(
        broker_url=broker.url,
        fleet="served",
        controller={"data_dir": data_dir, "port": port, "public_url": f"http://127.0.0.1:{port}"},
    )
    with ServedApp(create_app(settings), sock) as server:
        token = (data_dir / "admin.token").read_text().strip()
        yield Served(server.url, settings, token)
