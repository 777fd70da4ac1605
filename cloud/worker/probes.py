"""A cloud worker's HTTP side: Kubernetes probes and Prometheus metrics on one small port.

* ``/livez``: 200 while the worker's event loop keeps ticking (a wedged loop fails it, so the
  kubelet restarts the pod); it says nothing about models or the broker.
* ``/readyz``: 200 once the models are loaded and warmed *and* the pool's MQTT subscription
  is live, 503 with the reason otherwise (loading, broker away, stopping). Readiness gates
  the Deployment's rollout and what the autoscaler counts as a replica.
* ``/metrics``: the worker's own registry in the Prometheus text format.

The server is prometheus_client's WSGI exposition app behind a three-route wrapper, served by
the standard library's threading WSGI server in a daemon thread (as
``prometheus_client.start_http_server`` does): probes still answer while a batch holds the
event loop's worker thread, and the worker needs no web framework.

Exposed metrics (``edgefed_worker_`` prefix): ``requests_total{outcome}``,
``request_latency_seconds`` (histogram, arrival to answer), ``batch_size`` (histogram),
``queue_depth{priority}``, ``ready`` (1/0), ``info{worker_id,pool}``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)

PREFIX = "edgefed_worker"
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)

Readiness = Callable[[], str | None]
"""``None`` when ready, else why not (shown in the 503 body)."""


class WorkerMetrics:
    """The worker's Prometheus metrics on a registry of its own (several workers may share a
    process in tests); it is the serving engine's ``ServingMetrics``."""

    def __init__(self, worker_id: str, pool: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Inference requests answered, by outcome",
            ["outcome"],
            registry=reg,
        )
        self.latency = Histogram(
            f"{PREFIX}_request_latency_seconds",
            "Inference request latency from arrival to answer",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Requests per model run", buckets=BATCH_BUCKETS, registry=reg
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth", "Requests waiting, by priority", ["priority"], registry=reg
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when the worker takes requests", registry=reg)
        info = Gauge(f"{PREFIX}_info", "The worker's identity", ["worker_id", "pool"], registry=reg)
        info.labels(worker_id=worker_id, pool=pool).set(1)

    def request_done(self, outcome: str, seconds: float) -> None:
        self.requests.labels(outcome=outcome).inc()
        self.latency.observe(max(0.0, seconds))

    def batch_done(self, size: int) -> None:
        self.batch_size.observe(size)

    def set_queue_depth(self, depth: Mapping[Any, int]) -> None:
        for priority, count in depth.items():
            self.queue_depth.labels(priority=str(priority)).set(count)


def probe_app(
    registry: CollectorRegistry, readiness: Readiness, liveness: Readiness
) -> Callable[[WSGIEnvironment, StartResponse], Iterable[bytes]]:
    """The WSGI app: ``/livez``, ``/readyz`` and ``/metrics``; 404 elsewhere."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            served: Iterable[bytes] = metrics(environ, start_response)
            return served
        if path in ("/livez", "/readyz"):
            problem = (liveness if path == "/livez" else readiness)()
            status = "200 OK" if problem is None else "503 Service Unavailable"
            body = b"ok\n" if problem is None else f"{problem}\n".encode()
        else:
            status, body = "404 Not Found", b"not found: try /livez, /readyz or /metrics\n"
        start_response(
            status,
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    """No access log line per probe (the kubelet probes every few seconds)."""

    def log_message(self, format: str, *args: Any) -> None:
        return


class ProbeServer:
    """Serves :func:`probe_app` on ``host:port`` (0: a free port) in a daemon thread."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        readiness: Readiness,
        liveness: Readiness,
        host: str,
        port: int,
    ) -> None:
        self._app = probe_app(registry, readiness, liveness)
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Bind and serve; the port really bound. ``OSError`` when the port is taken."""
        server = make_server(
            self.host, self.port, self._app, server_class=_Server, handler_class=_QuietHandler
        )
        self._server = server
        self.port = int(server.server_port)
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()
        log.info(
            "probes and metrics on http://%s:%d (/livez /readyz /metrics)", self.host, self.port
        )
        return self.port

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        await asyncio.to_thread(server.shutdown)
        server.server_close()
