"""Rollouts end to end: ``edgefed cloud serve`` and three ``edgefed edge run`` agents as real
processes, the session's mosquitto, tiny ONNX models signed with the controller's key.

What a user relies on: a good canary completes; a canary that fails to load, or that errors,
is aborted and rolled back (as a new, higher version with the previous content) and no agent
outside the canary set is ever told to run it; a controller SIGKILLed in the middle of a
rollout resumes it after a restart, with one deployment and the agents serving throughout.
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edgefed.common.artifact import generate_signing_key
from edgefed.common.broker import PrivateBroker, free_port
from tests.cloud.e2e.world import (
    MODEL,
    ControllerProcess,
    Observer,
    World,
    build_sources,
    clean_env,
)

pytestmark = pytest.mark.timeout(240)

LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
"""Longer than the 16 positions of the ``erroring`` model (and well within the good one's)."""


@pytest.fixture(scope="module")
def world(
    broker: PrivateBroker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[World, Observer]]:
    root = tmp_path_factory.mktemp("fleet")
    fleet = f"e2e-{secrets.token_hex(3)}"
    data_dir = root / "controller"
    data_dir.mkdir()
    key = generate_signing_key()
    key.save(data_dir / "signing.key")  # the controller signs rollbacks with this same key
    controller = ControllerProcess(data_dir, free_port(), broker.url, fleet)
    w = World(root, controller, key, build_sources(root / "src"))
    controller.start()
    try:
        with Observer(broker.url, fleet) as observer:
            w.ok(
                "POST",
                "/models",
                json={
                    "name": MODEL,
                    "task": "feature-extraction",
                    "teacher_dir": str(w.sources["good"].parent / "good-hf"),
                },
            )
            w.enrol(3, {"site": "lab"})
            first = w.release("good")
            dep = w.deploy(first, kind="all-at-once", soak_s=0)
            assert w.wait_deployment(dep, {"completed"})["status"] == "completed"
            for agent in w.agents:
                assert observer.serving(agent.config.agent_id, first) == first
            yield w, observer
    finally:
        for agent in w.agents:
            agent.stop()
        controller.stop()


def agent_ids(w: World) -> list[str]:
    return sorted(a.config.agent_id for a in w.agents)


def canary_of(dep: dict[str, object]) -> set[str]:
    agents = dep["agents"]
    assert isinstance(agents, list)
    return {a["agent_id"] for a in agents if a["canary"]}


def test_a_good_canary_goes_to_the_canary_first_then_to_everyone(
    world: tuple[World, Observer],
) -> None:
    w, observer = world
    version = w.release("good")
    dep_id = w.deploy(version, kind="canary", canary_count=1, soak_s=1.5)
    seen_canary_only = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        sent = observer.versions_sent(version)  # read first: the status below is newer
        dep = w.deployment(dep_id)
        if dep["status"] in ("canary", "soaking") and sent:
            assert sent <= canary_of(dep), f"{sent} got v{version} during the canary"
            seen_canary_only = True
        if dep["status"] == "completed":
            break
        time.sleep(0.1)
    dep = w.wait_deployment(dep_id, {"completed"})
    assert seen_canary_only
    assert len(canary_of(dep)) == 1
    assert observer.versions_sent(version) == set(agent_ids(w))
    for agent_id in agent_ids(w):
        assert observer.serving(agent_id, version) == version


def _assert_rolled_back(w: World, observer: Observer, dep: dict[str, object], bad: int) -> None:
    canary = canary_of(dep)
    assert len(canary) == 1
    # Nobody outside the canary set was ever told to run the bad version.
    assert observer.versions_sent(bad) <= canary
    detail = w.ok("GET", f"/models/{MODEL}")
    versions = {v["version"]: v for v in detail["version_details"]}
    rollback = max(versions)
    assert rollback > bad, "a rollback is a new, higher version"
    assert versions[rollback]["parent_version"] < bad
    (agent,) = canary
    assert observer.serving(agent, rollback) == rollback
    for other in set(agent_ids(w)) - canary:
        assert observer.serving(other) < bad  # never moved


def test_a_canary_that_fails_to_load_is_rolled_back_and_goes_no_further(
    world: tuple[World, Observer],
) -> None:
    w, observer = world
    bad = w.release("broken")
    dep_id = w.deploy(bad, kind="canary", canary_count=1, soak_s=1)
    dep = w.wait_deployment(dep_id, {"rolled_back", "completed"})
    assert dep["status"] == "rolled_back", dep
    kinds = [e["kind"] for e in dep["events"]]
    assert "load-failed" in kinds, kinds
    assert "gate-failed" in kinds, kinds
    _assert_rolled_back(w, observer, dep, bad)


def test_a_canary_with_a_high_error_rate_is_rolled_back(world: tuple[World, Observer]) -> None:
    w, observer = world
    bad = w.release("erroring")
    dep_id = w.deploy(
        bad, kind="canary", canary_count=1, soak_s=8, min_requests=10, max_error_rate=0.2
    )

    def load() -> None:
        dep = w.deployment(dep_id)
        for agent_id in canary_of(dep):
            observer.infer(agent_id, LONG_TEXT)

    dep = w.wait_deployment(dep_id, {"rolled_back", "completed"}, during=load)
    assert dep["status"] == "rolled_back", dep
    failures = [o for o in observer.outcomes if o[1] is None and o[0] in canary_of(dep)]
    assert failures, "the erroring version really answered with errors"
    _assert_rolled_back(w, observer, dep, bad)


def test_a_controller_killed_mid_rollout_resumes_it_after_a_restart(
    world: tuple[World, Observer], tmp_path: Path
) -> None:
    w, observer = world
    version = w.release("good")
    dep_id = w.deploy(version, kind="canary", canary_count=1, soak_s=3)
    w.wait_deployment(dep_id, {"soaking", "rolling", "completed"})
    w.controller.kill()
    # The agents keep serving while the controller is gone.
    for agent_id in agent_ids(w):
        assert observer.infer(agent_id)[1] == "ok"
    w.controller.start()
    dep = w.wait_deployment(dep_id, {"completed", "rolled_back", "aborted"})
    assert dep["status"] == "completed", dep
    same = [
        d for d in w.ok("GET", "/deployments") if d["model"] == MODEL and d["version"] == version
    ]
    assert len(same) == 1, "no duplicate deployment after the restart"
    for agent_id in agent_ids(w):
        assert observer.serving(agent_id, version) == version
    # The operator's view: /metrics counts the fleet from the registry.
    metrics = httpx.get(f"{w.controller.url}/metrics", timeout=10).text
    assert 'edgefed_deployments{status="rolled_back"} 2.0' in metrics
    assert "edgefed_rollbacks 2.0" in metrics
    assert 'edgefed_agents{state="online"} 3.0' in metrics
    # Versions only go up: every agent's desired states name ever higher versions.
    for agent_id in agent_ids(w):
        told = [m[MODEL] for a, _, m in observer.desired if a == agent_id and MODEL in m]
        assert told == sorted(told), (agent_id, told)


def test_the_http_gateway_routes_to_agents_and_worker_pools_and_fails_over(
    world: tuple[World, Observer],
) -> None:
    w, observer = world
    serving = {observer.serving(agent_id) for agent_id in agent_ids(w)}
    assert len(serving) == 1
    (version,) = serving
    victim = w.agents[0]
    killed = False
    worker = subprocess.Popen(
        [sys.executable, "-m", "edgefed.cli", "cloud", "worker", "--model", MODEL],
        env=clean_env(
            EDGEFED_BROKER_URL=w.controller.broker_url,
            EDGEFED_FLEET=w.controller.fleet,
            EDGEFED_CONTROLLER__DATA_DIR=str(w.controller.data_dir),
        ),
        stdout=(w.root / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        # The pool has a worker once it answers on the pool's topic (the gateway does not
        # know a pool's workers: a pool without any costs a timeout before it is routed around).
        observer.serving_pool("default")
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (
            set(agent_ids(w)) & seen and any(s.startswith("worker-") for s in seen)
        ):
            answer = w.api("POST", "/infer", json={"model": MODEL, "texts": ["via http"]})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["model"] == MODEL
            assert len(body["outputs"]["results"]) == 1
            seen.add(body["served_by"])
        assert set(agent_ids(w)) & seen, seen  # agents answer...
        assert any(s.startswith("worker-") for s in seen), w.ok("GET", "/infer/targets")

        # An agent that dies is routed around: every request is still answered.
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        killed = True
        answers = [
            w.api("POST", "/infer", json={"model": MODEL, "texts": [f"after {i}"]})
            for i in range(20)
        ]
        assert [a.status_code for a in answers] == [200] * 20
        assert victim.config.agent_id not in {a.json()["served_by"] for a in answers[5:]}

        # Bad requests get the status that says why, from wherever they were routed.
        unknown = w.api("POST", "/infer", json={"model": "no-such-model", "texts": ["x"]})
        assert unknown.status_code == 404, unknown.text
        assert "no-such-model" in unknown.json()["detail"]
        too_long = w.api(
            "POST", "/infer", json={"model": MODEL, "texts": [" ".join(["word"] * 400)]}
        )
        assert too_long.status_code == 422, too_long.text
        assert "at most" in too_long.json()["detail"]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
        if killed:
            victim.start()
    assert version >= 1
