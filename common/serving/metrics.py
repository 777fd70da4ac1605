"""The serving engine's Prometheus metrics, the same for an agent and a cloud worker but for the
prefix (``edgefed_agent``, ``edgefed_worker``): the Grafana dashboard plots both with one query
shape, so the names, labels and buckets must not drift apart.

Exposed names (after the prefix):

============================  =========  ===========================================
``requests_total{outcome}``   counter    answered requests: ``ok`` or the error code
``request_latency_seconds``   histogram  arrival to answer, 1 ms .. 10 s buckets
``batch_size``                histogram  requests per model run
``queue_depth{priority}``     gauge      requests waiting per priority
============================  =========  ===========================================

Each instance has a registry of its own (never the global one), so that several agents or
workers in one process -- the simulation harness, the tests -- do not collide. Only
prometheus_client is needed (a base dependency), not the ``edge`` extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "PrometheusServingMetrics"]

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
"""Request latency buckets in seconds, 1 ms to 10 s (plus +Inf)."""
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)


class PrometheusServingMetrics:
    """The serving engine's ``ServingMetrics`` on a registry of its own, names under ``prefix``;
    the agent's and the worker's metrics add theirs to :attr:`registry`."""

    def __init__(self, prefix: str) -> None:
        if not prefix or prefix.endswith("_"):
            raise ValueError(f"a metric prefix without a trailing underscore, not {prefix!r}")
        self.prefix = prefix
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            f"{prefix}_requests",
            "Inference requests answered, by outcome",
            ["outcome"],
            registry=reg,
        )
        self.latency = Histogram(
            f"{prefix}_request_latency_seconds",
            "Inference request latency from arrival to answer",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.batch_size = Histogram(
            f"{prefix}_batch_size",
            "Requests per model run (micro-batching)",
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.queue_depth = Gauge(
            f"{prefix}_queue_depth", "Requests waiting, by priority", ["priority"], registry=reg
        )

    def request_done(self, outcome: str, seconds: float) -> None:
        """One request answered: ``outcome`` is ``ok`` or an error code (``expired``, ...)."""
        self.requests.labels(outcome=outcome).inc()
        self.latency.observe(max(0.0, seconds))

    def batch_done(self, size: int) -> None:
        self.batch_size.observe(size)

    def set_queue_depth(self, depth: Mapping[Any, int]) -> None:
        """Waiting requests per priority (a :class:`~edgefed.common.schemas.Priority` or str)."""
        for priority, count in depth.items():
            self.queue_depth.labels(priority=str(priority)).set(count)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric in :attr:`registry`."""
        return generate_latest(self.registry)
