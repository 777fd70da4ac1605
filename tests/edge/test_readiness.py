"""The agent's readiness rule, and its metrics and readiness served together on a real socket."""

from __future__ import annotations

import json

from edgefed.common.probes import ProbeServer
from edgefed.edge.metrics import AgentMetrics
from edgefed.edge.readiness import Readiness, assess
from tests.test_probes import get


def ready_when(**changes: object) -> Readiness:
    """:func:`assess` of a started, connected, subscribed agent serving what it was asked,
    with ``changes`` applied."""
    inputs: dict[str, object] = {
        "started": True,
        "connected": True,
        "subscribed": True,
        "desired": {"embed": 2},
        "serving": {"embed": 2},
    }
    inputs.update(changes)
    return assess(**inputs)  # type: ignore[arg-type]


def test_an_agent_serving_every_desired_model_at_its_version_is_ready() -> None:
    assert ready_when() == Readiness(ready=True)


def test_an_agent_without_a_desired_state_is_ready_once_connected_and_subscribed() -> None:
    assert ready_when(desired=None, serving={}).ready


def test_a_starting_agent_is_not_ready_whatever_else_holds() -> None:
    report = ready_when(started=False)
    assert report == Readiness.not_ready("starting: restoring the installed models")


def test_a_stopping_agent_is_not_ready() -> None:
    assert ready_when(stopping=True) == Readiness.not_ready("stopping")


def test_an_agent_cut_off_from_the_broker_is_not_ready_even_with_its_models() -> None:
    report = ready_when(connected=False)
    assert not report.ready
    assert report.reasons == ("not connected to the cloud broker",)


def test_an_agent_not_yet_subscribed_to_its_desired_state_is_not_ready() -> None:
    assert ready_when(subscribed=False).reasons == ("not yet subscribed to the desired state",)


def test_each_desired_model_not_served_at_its_version_is_named() -> None:
    report = ready_when(desired={"embed": 2, "classify": 1, "chat": 3}, serving={"embed": 1})
    assert not report.ready
    assert report.reasons == (
        "model chat: v3 desired, not loaded yet",
        "model classify: v1 desired, not loaded yet",
        "model embed: v2 desired, v1 serving",
    )


def test_a_model_served_beyond_the_desired_state_does_not_matter() -> None:
    assert ready_when(serving={"embed": 2, "head-of-split": 1}).ready


def test_the_report_is_json_with_a_status_and_reasons() -> None:
    body = json.loads(Readiness.not_ready("a", "b").to_json())
    assert body == {"status": "unavailable", "reasons": ["a", "b"]}
    assert json.loads(Readiness(ready=True).to_json()) == {"status": "ready", "reasons": []}


# --------------------------------------------------------------------------- HTTP
# The probe server itself (paths, bodies, failing checks) is tested in tests/test_probes.py.


def test_the_agents_metrics_and_readiness_are_served_on_one_port() -> None:
    metrics = AgentMetrics("agent-7")
    metrics.request_done("ok", 0.01)
    not_loaded = Readiness.not_ready("model embed: v2 desired, not loaded yet")
    server = ProbeServer(metrics.registry, host="127.0.0.1", port=0, readiness=lambda: not_loaded)
    port = server.start()
    try:
        status, _, body = get(f"http://127.0.0.1:{port}/readyz")
        assert (status, json.loads(body)["reasons"]) == (503, list(not_loaded.reasons))
        status, content_type, body = get(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.close()
    assert status == 200
    assert content_type.startswith("text/plain")
    assert 'edgefed_agent_requests_total{outcome="ok"} 1.0' in body.decode()
    assert 'edgefed_agent_info{agent_id="agent-7"} 1.0' in body.decode()
