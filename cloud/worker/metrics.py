"""A cloud worker's Prometheus metrics (``edgefed_worker_`` prefix), served with the probes by
:class:`edgefed.common.probes.ProbeServer` on ``worker.metrics_port``.

The serving metrics are the agent's (:mod:`edgefed.common.serving.metrics`):
``requests_total{outcome}``, ``request_latency_seconds`` (histogram, arrival to answer),
``batch_size`` (histogram), ``queue_depth{priority}``; the worker adds ``ready`` (1/0, what the
autoscaler counts) and ``info{worker_id,pool}``.
"""

from __future__ import annotations

from prometheus_client import Gauge

from edgefed.common.serving.metrics import PrometheusServingMetrics

__all__ = ["PREFIX", "WorkerMetrics"]

PREFIX = "edgefed_worker"


class WorkerMetrics(PrometheusServingMetrics):
    """The worker's metrics on a registry of its own (several workers may share a process in
    tests); it is the serving engine's ``ServingMetrics``."""

    def __init__(self, worker_id: str, pool: str) -> None:
        super().__init__(PREFIX)
        reg = self.registry
        self.ready = Gauge(f"{PREFIX}_ready", "1 when the worker takes requests", registry=reg)
        info = Gauge(f"{PREFIX}_info", "The worker's identity", ["worker_id", "pool"], registry=reg)
        info.labels(worker_id=worker_id, pool=pool).set(1)
