"""A small real HTTP server standing in for the controller until its issue lands: the agent's
join endpoint and artifact downloads (with Range requests and bearer tokens), on loopback.

It speaks the contract written down in ``edgefed.edge.join`` and ``edgefed.edge.fetch``:

* ``POST /api/v1/agents/join`` with ``{"token", "hostname", "labels", "device_profile",
  "agent_version"}`` -> 200 ``{"agent_id", "fleet", "broker_url", "mqtt_username",
  "mqtt_password", "agent_token", "artifact_signing_keys": [base64]}``; 401 for a bad or used
  token (join tokens are single-use);
* ``GET /api/v1/artifacts/<name>/v<version>/<target>/<file>`` -> the file under the artifact
  store, 401 without the agent's bearer token, 206 for ``Range: bytes=N-``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"^bytes=(\d+)-$")


@dataclass
class ControllerStub:
    store: Path
    fleet: str
    broker_url: str
    signing_keys: list[str]
    join_tokens: set[str] = field(default_factory=set)
    agent_token: str = "agent-secret-token"
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    joined: list[dict[str, Any]] = field(default_factory=list)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, path, Range header) of every request, for tests."""
    fail_after_bytes: int | None = None
    """Cut every file download after this many bytes (to test resumption)."""
    url: str = ""

    def artifact_url(self, name: str, version: int, target: str) -> str:
        return f"{self.url}/api/v1/artifacts/{name}/v{version}/{target}"


def _handler(stub: ControllerStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in separate writes

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _json(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            stub.requests.append(("POST", self.path, None))
            length = int(self.headers.get("Content-Length", "0"))
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                self._json(400, {"detail": "body is not JSON"})
                return
            if self.path != "/api/v1/agents/join":
                self._json(404, {"detail": "not found"})
                return
            token = body.get("token")
            if token not in stub.join_tokens:
                self._json(401, {"detail": "join token is invalid or already used"})
                return
            stub.join_tokens.discard(token)
            agent_id = f"agent-{len(stub.joined) + 1}"
            stub.joined.append({"agent_id": agent_id, **body})
            self._json(
                200,
                {
                    "agent_id": agent_id,
                    "fleet": stub.fleet,
                    "broker_url": stub.broker_url,
                    "mqtt_username": stub.mqtt_username,
                    "mqtt_password": stub.mqtt_password,
                    "agent_token": stub.agent_token,
                    "artifact_signing_keys": stub.signing_keys,
                },
            )

        def do_GET(self) -> None:
            stub.requests.append(("GET", self.path, self.headers.get("Range")))
            prefix = "/api/v1/artifacts/"
            if not self.path.startswith(prefix):
                self._json(404, {"detail": "not found"})
                return
            if self.headers.get("Authorization") != f"Bearer {stub.agent_token}":
                self._json(401, {"detail": "agent token required"})
                return
            rel = self.path[len(prefix) :]
            target = (stub.store / rel).resolve()
            if stub.store.resolve() not in target.parents or not target.is_file():
                self._json(404, {"detail": f"no such artifact file {rel}"})
                return
            data = target.read_bytes()
            start = 0
            status = HTTPStatus.OK
            match = _RANGE.match(self.headers.get("Range", ""))
            if match:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status = HTTPStatus.PARTIAL_CONTENT
            body = data[start:]
            cut = stub.fail_after_bytes
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if status == HTTPStatus.PARTIAL_CONTENT:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if cut is not None and len(body) > cut:
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self.wfile.write(body)

    return Handler


@contextmanager
def running_controller(stub: ControllerStub) -> Iterator[ControllerStub]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stub))
    stub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
