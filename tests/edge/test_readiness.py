"""The agent's readiness rule and its HTTP side (/livez, /readyz, /metrics) on a real socket."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from edgefed.edge.metrics import AgentMetrics
from edgefed.edge.readiness import Readiness, assess


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


class Switch:
    """A readiness check the test flips (or makes fail)."""

    def __init__(self) -> None:
        self.report = Readiness.not_ready("model embed: v2 desired, not loaded yet")
        self.broken = False

    def __call__(self) -> Readiness:
        if self.broken:
            raise RuntimeError("boom")
        return self.report


@pytest.fixture
def served() -> Iterator[tuple[str, Switch, AgentMetrics]]:
    metrics = AgentMetrics("agent-7")
    switch = Switch()
    server, port = metrics.start_http_server(0, addr="127.0.0.1", readiness=switch)
    try:
        yield f"http://127.0.0.1:{port}", switch, metrics
    finally:
        server.shutdown()
        server.server_close()


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_readyz_answers_503_with_the_reasons_then_200_once_ready(
    served: tuple[str, Switch, AgentMetrics],
) -> None:
    url, switch, _ = served
    status, content_type, body = get(f"{url}/readyz")
    assert (status, content_type) == (503, "application/json")
    assert json.loads(body)["reasons"] == ["model embed: v2 desired, not loaded yet"]

    switch.report = Readiness(ready=True)
    status, _, body = get(f"{url}/readyz")
    assert status == 200
    assert json.loads(body)["status"] == "ready"


def test_livez_answers_200_while_the_agent_is_not_ready(
    served: tuple[str, Switch, AgentMetrics],
) -> None:
    url, _, _ = served
    status, _, body = get(f"{url}/livez")
    assert status == 200
    assert json.loads(body) == {"status": "alive"}


def test_metrics_keep_being_served_beside_the_probes(
    served: tuple[str, Switch, AgentMetrics],
) -> None:
    url, _, metrics = served
    metrics.request_done("ok", 0.01)
    status, content_type, body = get(f"{url}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert 'edgefed_agent_requests_total{outcome="ok"} 1.0' in body.decode()
    assert 'edgefed_agent_info{agent_id="agent-7"} 1.0' in body.decode()


def test_a_failing_readiness_check_is_a_503_naming_the_failure(
    served: tuple[str, Switch, AgentMetrics],
) -> None:
    url, switch, _ = served
    switch.broken = True
    status, _, body = get(f"{url}/readyz")
    assert status == 503
    assert json.loads(body)["reasons"] == ["readiness check failed: RuntimeError"]


def test_an_unknown_path_is_a_404_that_lists_the_paths(
    served: tuple[str, Switch, AgentMetrics],
) -> None:
    url, _, _ = served
    status, _, body = get(f"{url}/ready")
    assert status == 404
    assert b"/readyz" in body
