"""The agent's HTTP side on ``metrics_port`` (9464): Prometheus metrics and Kubernetes probes.

* ``/metrics``: the agent's own registry, by prometheus_client's WSGI exposition app;
* ``/livez``: 200 while the process runs (the server answers from its own thread, so a long
  model load or TensorRT engine build never makes the kubelet restart the agent);
* ``/readyz``: 200 once the agent is ready (:mod:`edgefed.edge.readiness`), else 503 with a JSON
  body naming the reasons.

Served by the standard library's threading WSGI server in a daemon thread, as
``prometheus_client.start_http_server`` does: no web framework in the edge install.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from edgefed.edge.readiness import Readiness

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

ReadinessCheck = Callable[[], Readiness]
"""Called from the server's thread for each ``/readyz``; must be thread-safe."""

_JSON = "application/json"


def _always_ready() -> Readiness:
    return Readiness(ready=True)


def probe_app(registry: CollectorRegistry, readiness: ReadinessCheck) -> WSGIApplication:
    """The WSGI app: ``/metrics``, ``/livez`` and ``/readyz``; 404 elsewhere."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            answer: Iterable[bytes] = metrics(environ, start_response)
            return answer
        if path == "/livez":
            status, content_type, body = "200 OK", _JSON, b'{"status": "alive"}'
        elif path == "/readyz":
            try:
                report = readiness()
            except Exception as exc:  # a failing check is a 503 that names it
                log.warning("the readiness check failed", exc_info=True)
                report = Readiness.not_ready(f"readiness check failed: {type(exc).__name__}")
            status = "200 OK" if report.ready else "503 Service Unavailable"
            content_type, body = _JSON, report.to_json()
        else:
            status, content_type = "404 Not Found", "text/plain; charset=utf-8"
            body = b"not found: try /metrics, /livez or /readyz\n"
        start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    """No access-log line per probe (the kubelet and Prometheus call every few seconds)."""

    def log_message(self, format: str, *args: Any) -> None:
        return


def start_probe_server(
    registry: CollectorRegistry,
    port: int,
    addr: str = "0.0.0.0",  # noqa: S104 - the kubelet and Prometheus reach it from outside the pod
    readiness: ReadinessCheck | None = None,
) -> tuple[WSGIServer, int]:
    """Serve :func:`probe_app` on ``addr:port`` (port 0: a free one) in a daemon thread.

    Returns the server (``server.shutdown()`` then ``server.server_close()`` stop it) and the
    port really bound. Without ``readiness``, ``/readyz`` always answers 200.
    """
    app = probe_app(registry, readiness or _always_ready)
    server = make_server(addr, port, app, server_class=_Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="agent-http", daemon=True)
    thread.start()
    return server, int(server.server_port)
