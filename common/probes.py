"""The HTTP side of an agent or a cloud worker: Kubernetes probes and Prometheus metrics on one
small port.

* ``/livez``: 200 while the liveness check passes (the agent's always does: the server answers
  from its own thread, so a long model load never makes the kubelet restart the pod; the
  worker's fails when its event loop is wedged);
* ``/readyz``: 200 once the readiness check passes, else 503;
* ``/metrics``: the process's own registry, by prometheus_client's WSGI exposition app.

Both probes answer the same JSON, ``{"status": ..., "reasons": [...]}``, so that ``kubectl
describe pod`` says what is missing; a check that raises is a 503 naming the failure.

Served by the standard library's threading WSGI server in a daemon thread, as
``prometheus_client.start_http_server`` does: probes still answer while a batch holds the event
loop, and neither the edge nor the worker install needs a web framework.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

__all__ = ["ProbeCheck", "ProbeServer", "Readiness", "always", "probe_app"]

_JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Readiness:
    """The answer of a probe: passing, or the reasons why not (in the order they matter)."""

    ready: bool
    reasons: tuple[str, ...] = ()

    @classmethod
    def not_ready(cls, *reasons: str) -> Readiness:
        return cls(ready=False, reasons=reasons)

    def to_json(self, passing: str = "ready") -> bytes:
        """The probe's body; ``passing`` is the status word when it passes (``alive`` for
        ``/livez``), ``unavailable`` otherwise."""
        body = {"status": passing if self.ready else "unavailable", "reasons": list(self.reasons)}
        return json.dumps(body).encode()


ProbeCheck = Callable[[], Readiness]
"""Called from the server's thread for each probe; must be thread-safe."""


def always() -> Readiness:
    """A check that always passes (the agent's liveness, a readiness not given)."""
    return Readiness(ready=True)


def _answer(check: ProbeCheck, probe: str) -> Readiness:
    try:
        return check()
    except Exception as exc:  # a failing check is a 503 that names it
        log.warning("the %s check failed", probe, exc_info=True)
        return Readiness.not_ready(f"{probe} check failed: {type(exc).__name__}")


def probe_app(
    registry: CollectorRegistry, *, readiness: ProbeCheck, liveness: ProbeCheck = always
) -> WSGIApplication:
    """The WSGI app: ``/metrics``, ``/livez`` and ``/readyz``; 404 elsewhere."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            served: Iterable[bytes] = metrics(environ, start_response)
            return served
        if path == "/livez":
            report = _answer(liveness, "liveness")
            status, content_type, body = _status(report), _JSON, report.to_json("alive")
        elif path == "/readyz":
            report = _answer(readiness, "readiness")
            status, content_type, body = _status(report), _JSON, report.to_json()
        else:
            status, content_type = "404 Not Found", "text/plain; charset=utf-8"
            body = b"not found: try /metrics, /livez or /readyz\n"
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    return app


def _status(report: Readiness) -> str:
    return "200 OK" if report.ready else "503 Service Unavailable"


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    """No access-log line per probe (the kubelet and Prometheus call every few seconds)."""

    def log_message(self, format: str, *args: Any) -> None:
        return


class ProbeServer:
    """Serves :func:`probe_app` on ``host:port`` (port 0: a free one) in a daemon thread.

    Without ``readiness`` or ``liveness``, that probe always answers 200.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        host: str,
        port: int,
        readiness: ProbeCheck = always,
        liveness: ProbeCheck = always,
        name: str = "probes-http",
    ) -> None:
        self._app = probe_app(registry, readiness=readiness, liveness=liveness)
        self.host = host
        self.port = port
        """The port asked for; the port really bound once :meth:`start` returned."""
        self.name = name
        self._server: _Server | None = None

    def start(self) -> int:
        """Bind and serve; the port really bound. ``OSError`` when the port is taken."""
        if self._server is not None:
            raise RuntimeError("the probe server is already started")
        server = make_server(
            self.host, self.port, self._app, server_class=_Server, handler_class=_QuietHandler
        )
        self._server = server
        self.port = int(server.server_port)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=self.name, daemon=True
        )
        thread.start()
        log.info(
            "metrics and probes on http://%s:%d (/metrics, /livez, /readyz)", self.host, self.port
        )
        return self.port

    def close(self) -> None:
        """Stop serving and free the port (blocks up to the 0.2 s poll interval; idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()

    async def aclose(self) -> None:
        """:meth:`close` off the event loop."""
        await asyncio.to_thread(self.close)
