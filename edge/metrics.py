"""Prometheus metrics of the edge agent, on a registry of its own (never the global one, so that
several agents in one process -- the simulation harness, the tests -- do not collide). The first
four are the serving metrics shared with the cloud workers
(:mod:`edgefed.common.serving.metrics`); :class:`edgefed.common.probes.ProbeServer` serves them.

Exposed names (``edgefed_agent_`` prefix):

=========================================  =========  ===========================================
``requests_total{outcome}``                counter    answered requests: ``ok`` or the error code
``request_latency_seconds``                histogram  arrival to answer, 1 ms .. 10 s buckets
``batch_size``                             histogram  requests per model run
``queue_depth{priority}``                  gauge      requests waiting per priority
``model_version{model}``                   gauge      version of each served model
``model_swaps_total{outcome}``             counter    model changes: ok / failed / rejected
``artifact_download_bytes_total``          counter    artifact bytes downloaded
``telemetry_sent_total``                   counter    queued telemetry messages delivered
``placement_in_force{model,mode}``         gauge      1 for the mode local requests go to first
``offload_requests_total{target}``         counter    local requests answered by target kind
``info{agent_id}``                         gauge      1, labelled with the agent's id
=========================================  =========  ===========================================
"""

from __future__ import annotations

import contextlib
from typing import Literal

from prometheus_client import Counter, Gauge

from edgefed.common.serving.metrics import LATENCY_BUCKETS, PrometheusServingMetrics

__all__ = ["LATENCY_BUCKETS", "PREFIX", "AgentMetrics", "SwapOutcome"]

PREFIX = "edgefed_agent"

SwapOutcome = Literal["ok", "failed", "rejected"]


class AgentMetrics(PrometheusServingMetrics):
    """The agent's metrics; the methods are what the other modules call."""

    def __init__(self, agent_id: str | None = None) -> None:
        super().__init__(PREFIX)
        reg = self.registry
        self.model_version = Gauge(
            f"{PREFIX}_model_version", "Version of each served model", ["model"], registry=reg
        )
        self.swaps = Counter(
            f"{PREFIX}_model_swaps", "Model changes, by outcome", ["outcome"], registry=reg
        )
        self.download_bytes = Counter(
            f"{PREFIX}_artifact_download_bytes", "Artifact bytes downloaded", registry=reg
        )
        self.telemetry = Counter(
            f"{PREFIX}_telemetry_sent", "Queued telemetry messages delivered", registry=reg
        )
        self.placement = Gauge(
            f"{PREFIX}_placement_in_force",
            "Where local requests for each model go first (edge, cloud, split, none)",
            ["model", "mode"],
            registry=reg,
        )
        self.offloaded = Counter(
            f"{PREFIX}_offload_requests",
            "Local requests answered, by target kind (local, cloud-pool, split)",
            ["target"],
            registry=reg,
        )
        self.info = Gauge(f"{PREFIX}_info", "The agent's identity", ["agent_id"], registry=reg)
        for outcome in ("ok", "failed", "rejected"):
            self.swaps.labels(outcome=outcome)
        if agent_id is not None:
            self.set_agent_id(agent_id)

    # ------------------------------------------------------------------ what modules call

    def set_agent_id(self, agent_id: str) -> None:
        self.info.clear()
        self.info.labels(agent_id=agent_id).set(1)

    def model_loaded(self, name: str, version: int) -> None:
        self.model_version.labels(model=name).set(version)

    def model_removed(self, name: str) -> None:
        with contextlib.suppress(KeyError):
            self.model_version.remove(name)

    def swap(self, outcome: SwapOutcome | str) -> None:
        """One model change: ``ok``, ``failed`` (could not load) or ``rejected`` (verification)."""
        self.swaps.labels(outcome=outcome).inc()

    def downloaded(self, nbytes: int) -> None:
        """``nbytes`` more artifact bytes arrived (an increment, not a running total)."""
        if nbytes > 0:
            self.download_bytes.inc(nbytes)

    def placement_in_force(self, model: str, mode: str) -> None:
        """``mode`` (edge, cloud, split or none) is where ``model``'s local requests go first."""
        for other in ("edge", "cloud", "split", "none"):
            self.placement.labels(model=model, mode=other).set(1 if other == mode else 0)

    def routed(self, target_kind: str) -> None:
        """One local request answered by a target of ``target_kind``."""
        self.offloaded.labels(target=target_kind).inc()

    def telemetry_sent(self, count: int = 1) -> None:
        if count > 0:
            self.telemetry.inc(count)
