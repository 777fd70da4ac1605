"""The agent's Prometheus metrics: names, labels, own registry, HTTP endpoint."""

from __future__ import annotations

import urllib.request

from prometheus_client import REGISTRY

from edgefed.common.probes import ProbeServer
from edgefed.common.schemas import Priority
from edgefed.edge.metrics import AgentMetrics


def test_metrics_render_with_the_documented_names() -> None:
    metrics = AgentMetrics("agent-7")
    metrics.request_done("ok", 0.003)
    metrics.request_done("expired", 0.5)
    metrics.set_queue_depth({Priority.HIGH: 1, Priority.NORMAL: 0, Priority.LOW: 4})
    metrics.model_loaded("tiny-embed", 3)
    metrics.swap("ok")
    metrics.swap("rejected")
    metrics.downloaded(1000)
    metrics.downloaded(24)
    metrics.batch_done(4)
    metrics.telemetry_sent(2)
    text = metrics.render().decode()
    for line in (
        'edgefed_agent_requests_total{outcome="ok"} 1.0',
        'edgefed_agent_requests_total{outcome="expired"} 1.0',
        'edgefed_agent_request_latency_seconds_bucket{le="0.001"} 0.0',
        'edgefed_agent_request_latency_seconds_bucket{le="0.005"} 1.0',
        'edgefed_agent_request_latency_seconds_bucket{le="10.0"} 2.0',
        "edgefed_agent_request_latency_seconds_count 2.0",
        'edgefed_agent_queue_depth{priority="high"} 1.0',
        'edgefed_agent_queue_depth{priority="low"} 4.0',
        'edgefed_agent_model_version{model="tiny-embed"} 3.0',
        'edgefed_agent_model_swaps_total{outcome="ok"} 1.0',
        'edgefed_agent_model_swaps_total{outcome="failed"} 0.0',
        'edgefed_agent_model_swaps_total{outcome="rejected"} 1.0',
        "edgefed_agent_artifact_download_bytes_total 1024.0",
        "edgefed_agent_batch_size_count 1.0",
        "edgefed_agent_telemetry_sent_total 2.0",
        'edgefed_agent_info{agent_id="agent-7"} 1.0',
    ):
        assert line in text, line
    metrics.model_removed("tiny-embed")
    metrics.model_removed("never-loaded")
    assert "tiny-embed" not in metrics.render().decode()


def test_each_agent_has_its_own_registry() -> None:
    a, b = AgentMetrics(), AgentMetrics()
    a.request_done("ok", 0.01)
    assert 'edgefed_agent_requests_total{outcome="ok"}' not in b.render().decode()
    assert REGISTRY.get_sample_value("edgefed_agent_requests_total", {"outcome": "ok"}) is None


def test_the_http_endpoint_serves_on_a_free_port() -> None:
    metrics = AgentMetrics("agent-8")
    metrics.request_done("ok", 0.01)
    server = ProbeServer(metrics.registry, host="127.0.0.1", port=0)
    port = server.start()
    try:
        assert port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
        assert 'edgefed_agent_requests_total{outcome="ok"} 1.0' in body
    finally:
        server.close()
