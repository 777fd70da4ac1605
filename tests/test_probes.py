"""The probe server shared by agents and cloud workers (/livez, /readyz, /metrics) on a real
socket, and the serving metrics both register under their prefix."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from edgefed.common.probes import ProbeServer, Readiness
from edgefed.common.serving.metrics import PrometheusServingMetrics


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


class Check:
    """A probe check the test sets (or makes raise)."""

    def __init__(self, report: Readiness) -> None:
        self.report = report
        self.broken = False

    def __call__(self) -> Readiness:
        if self.broken:
            raise RuntimeError("boom")
        return self.report


@pytest.fixture
def server() -> Iterator[tuple[str, Check, Check]]:
    ready = Check(Readiness.not_ready("model embed: v2 desired, not loaded yet"))
    live = Check(Readiness(ready=True))
    probes = ProbeServer(
        CollectorRegistry(), host="127.0.0.1", port=0, readiness=ready, liveness=live
    )
    port = probes.start()
    try:
        yield f"http://127.0.0.1:{port}", ready, live
    finally:
        probes.close()


def test_readyz_answers_503_with_the_reasons_then_200_once_ready(
    server: tuple[str, Check, Check],
) -> None:
    url, ready, _ = server
    status, content_type, body = get(f"{url}/readyz")
    assert (status, content_type) == (503, "application/json")
    assert json.loads(body) == {
        "status": "unavailable",
        "reasons": ["model embed: v2 desired, not loaded yet"],
    }
    ready.report = Readiness(ready=True)
    status, _, body = get(f"{url}/readyz")
    assert (status, json.loads(body)) == (200, {"status": "ready", "reasons": []})


def test_livez_answers_200_while_not_ready(server: tuple[str, Check, Check]) -> None:
    url, _, _ = server
    status, content_type, body = get(f"{url}/livez")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"status": "alive", "reasons": []}


def test_a_failing_liveness_is_a_503_with_the_reasons(server: tuple[str, Check, Check]) -> None:
    url, _, live = server
    live.report = Readiness.not_ready("event loop stalled for 31 s")
    status, _, body = get(f"{url}/livez")
    assert status == 503
    assert json.loads(body) == {"status": "unavailable", "reasons": ["event loop stalled for 31 s"]}


@pytest.mark.parametrize(("probe", "path"), [("readiness", "/readyz"), ("liveness", "/livez")])
def test_a_check_that_raises_is_a_503_naming_the_failure(
    server: tuple[str, Check, Check], probe: str, path: str
) -> None:
    url, ready, live = server
    (ready if probe == "readiness" else live).broken = True
    status, _, body = get(f"{url}{path}")
    assert status == 503
    assert json.loads(body)["reasons"] == [f"{probe} check failed: RuntimeError"]


def test_metrics_are_served_beside_the_probes(server: tuple[str, Check, Check]) -> None:
    url, _, _ = server
    status, content_type, _ = get(f"{url}/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")


def test_an_unknown_path_is_a_404_that_lists_the_paths(server: tuple[str, Check, Check]) -> None:
    url, _, _ = server
    status, _, body = get(f"{url}/ready")
    assert status == 404
    assert b"/readyz" in body


def test_without_checks_both_probes_pass() -> None:
    probes = ProbeServer(CollectorRegistry(), host="127.0.0.1", port=0)
    port = probes.start()
    try:
        for path in ("/livez", "/readyz"):
            assert get(f"http://127.0.0.1:{port}{path}")[0] == 200
    finally:
        probes.close()


def test_a_taken_port_is_an_oserror_and_close_frees_the_port() -> None:
    first = ProbeServer(CollectorRegistry(), host="127.0.0.1", port=0)
    port = first.start()
    second = ProbeServer(CollectorRegistry(), host="127.0.0.1", port=port)
    try:
        with pytest.raises(OSError, match="in use"):
            second.start()
    finally:
        first.close()
    first.close()  # idempotent
    with socket.create_server(("127.0.0.1", port)):
        pass  # the port is free again


def test_a_server_starts_once() -> None:
    probes = ProbeServer(CollectorRegistry(), host="127.0.0.1", port=0)
    probes.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            probes.start()
    finally:
        probes.close()


def test_the_serving_metrics_have_the_same_names_under_each_prefix() -> None:
    def names(prefix: str) -> set[str]:
        metrics = PrometheusServingMetrics(prefix)
        metrics.request_done("ok", 0.01)
        metrics.batch_done(2)
        metrics.set_queue_depth({"high": 1})
        return {
            sample.name.removeprefix(prefix)
            for family in metrics.registry.collect()
            for sample in family.samples
        }

    assert names("edgefed_agent") == names("edgefed_worker")
    assert "_requests_total" in names("edgefed_agent")


@pytest.mark.parametrize("prefix", ["", "edgefed_agent_"])
def test_a_prefix_ending_in_an_underscore_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="prefix"):
        PrometheusServingMetrics(prefix)
