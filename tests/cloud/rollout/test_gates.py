"""The gates: a failed one aborts and rolls back automatically, and no more than the canary set
ever runs the bad version. Real engine, monitor and publisher on a real mosquitto; simulated
agents that answer like the real one."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from edgefed.cloud.fleet.desired import artifact_path
from edgefed.cloud.registry.models import AgentPhase, DeploymentStatus
from edgefed.common.artifact import MANIFEST_NAME, verify

from .conftest import (
    MODEL,
    TARGET,
    Cloud,
    api_client,
    desired_spy,
    eventually_loaded,
    running_controller,
    sim_agents,
)
from .conftest import wait_status as wait

pytestmark = pytest.mark.integration
S = DeploymentStatus
AGENTS = ("a1", "a2", "a3", "a4")


def body(version: int, **strategy: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "version": version,
        "target": TARGET,
        "selector": {"labels": {"site": "a"}},
        "strategy": {"kind": "canary", "canary_count": 1, "min_requests": 5, **strategy},
    }


async def rollout_v2(cloud: Cloud, setup: Any, strategy: dict[str, Any], *until: S) -> Any:
    """v1 everywhere, then a canary of v2 with ``strategy``; the agents as ``setup`` makes
    them. Returns (deployment, agents, spy)."""
    async with (
        running_controller(cloud) as ctl,
        sim_agents(cloud, *AGENTS, site="a") as agents,
        api_client(cloud, ctl) as api,
    ):
        first = await api.post(
            "/api/v1/deployments", json=body(1, kind="all-at-once", soak_s=0) | {}
        )
        assert first.status_code == 422  # canary_count is only for kind=canary
        ok = {k: v for k, v in body(1).items()}
        ok["strategy"] = {"kind": "all-at-once", "soak_s": 0}
        r = await api.post("/api/v1/deployments", json=ok)
        await wait(cloud, r.json()["id"], S.COMPLETED)
        for agent in agents.values():
            setup(agent)
        async with desired_spy(cloud) as spy:
            r = await api.post("/api/v1/deployments", json=body(2, **strategy))
            assert r.status_code == 201, r.text
            dep = await wait(cloud, r.json()["id"], *until)
            canary = [da.agent_id for da in dep.agents if da.canary]
            if dep.status == S.ROLLED_BACK:
                await eventually_loaded(agents, canary, dep.rollback_version)
        return dep, agents, spy


def assert_only_the_canary_saw_v2(dep: Any, spy: Any) -> list[str]:
    canary = [da.agent_id for da in dep.agents if da.canary]
    assert canary == ["a1"]  # online agents first, then by id
    for agent_id in AGENTS:
        if agent_id not in canary:
            assert 2 not in spy.versions(agent_id), agent_id
            assert spy.versions(agent_id) == []
    return canary


async def test_a_canary_that_cannot_load_aborts_and_is_rolled_forward_to_the_old_content(
    cloud: Cloud,
) -> None:
    cloud.add_model()
    v1 = cloud.publish_version(1)
    cloud.publish_version(2)

    def fail(agent: Any) -> None:
        agent.fail_versions.add(2)

    dep, agents, spy = await rollout_v2(cloud, fail, {"soak_s": 30}, S.ROLLED_BACK)

    canary = assert_only_the_canary_saw_v2(dep, spy)
    assert dep.reason.startswith("load gate:")
    assert dep.previous_version == 1
    assert dep.rollback_version == 3
    assert spy.versions("a1") == [2, 3]
    assert agents["a1"].loaded == {MODEL: 3}
    assert all(agents[a].loaded == {MODEL: 1} for a in AGENTS if a not in canary)
    # v3 is registered, re-signed by the controller's key, with v1's content.
    v3 = cloud.versions()[3]
    assert v3.parent_version == 1
    assert "rollback of v2 to the content of v1" in (v3.note or "")
    folder = artifact_path(cloud.store, MODEL, 3, TARGET)
    manifest = verify(folder, [cloud.state.signing_key.verify_key], min_version=3)
    assert manifest.version == 3
    assert manifest.parent_version == 1
    assert (folder / "model.onnx").read_bytes() == (v1 / "model.onnx").read_bytes()
    registered = cloud.versions()[3].id
    assert registered is not None
    sha = hashlib.sha256((folder / MANIFEST_NAME).read_bytes()).hexdigest()
    assert any(e.detail.get("manifest_sha256") == sha for e in cloud.events(dep.id))
    phases = {da.agent_id: da.phase for da in dep.agents}
    assert phases["a1"] == AgentPhase.ROLLED_BACK
    assert all(phases[a] == AgentPhase.WAITING for a in AGENTS if a not in canary)


async def test_an_error_rate_above_the_limit_rolls_back(cloud: Cloud) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    cloud.publish_version(2)

    def errors(agent: Any) -> None:
        agent.error_rate[2] = 0.5

    dep, agents, spy = await rollout_v2(
        cloud, errors, {"soak_s": 30, "max_error_rate": 0.1}, S.ROLLED_BACK
    )

    assert_only_the_canary_saw_v2(dep, spy)
    assert dep.reason.startswith("error_rate gate:"), dep.reason
    failed = next(e for e in cloud.events(dep.id) if e.kind == "gate-failed")
    assert failed.detail["error_rate"] > 0.1
    assert failed.detail["requests"] >= 5
    assert agents["a1"].loaded == {MODEL: 3}


async def test_requests_refused_as_the_callers_fault_do_not_roll_a_version_back(
    cloud: Cloud,
) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    cloud.publish_version(2)

    def bad_callers(agent: Any) -> None:
        agent.caller_error_rate[2] = 0.5  # half the texts too long: the callers' fault

    dep, agents, _ = await rollout_v2(
        cloud, bad_callers, {"soak_s": 2, "max_error_rate": 0.1}, S.COMPLETED, S.ROLLED_BACK
    )

    assert dep.status == S.COMPLETED, dep.reason
    gates = [e for e in cloud.events(dep.id) if e.kind == "gate-failed"]
    assert gates == []
    assert all(agent.loaded == {MODEL: 2} for agent in agents.values())


async def test_a_latency_regression_rolls_back(cloud: Cloud) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    cloud.publish_version(2)

    def slow(agent: Any) -> None:
        agent.latency_ms[2] = 50.0  # 5x the 10 ms of v1

    dep, agents, spy = await rollout_v2(
        cloud, slow, {"soak_s": 30, "max_latency_ratio": 2.0}, S.ROLLED_BACK
    )

    assert_only_the_canary_saw_v2(dep, spy)
    assert dep.reason.startswith("latency gate:"), dep.reason
    failed = next(e for e in cloud.events(dep.id) if e.kind == "gate-failed")
    assert failed.detail["ratio"] == pytest.approx(5.0)
    assert agents["a1"].loaded == {MODEL: 3}


async def test_an_artifact_below_the_minimum_quality_is_refused_before_anything_is_published(
    cloud: Cloud,
) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    cloud.publish_version(2, metrics={"cosine_mean": 0.81})

    async with (
        running_controller(cloud) as ctl,
        sim_agents(cloud, *AGENTS, site="a") as agents,
        api_client(cloud, ctl) as api,
        desired_spy(cloud) as spy,
    ):
        low = await api.post("/api/v1/deployments", json=body(2, min_quality={"cosine_mean": 0.9}))
        missing = await api.post(
            "/api/v1/deployments", json=body(2, min_quality={"agreement": 0.9})
        )
        listed = await api.get("/api/v1/deployments")

    assert low.status_code == 422, low.text
    assert "cosine_mean = 0.81 is below the minimum of 0.9" in low.json()["detail"]
    assert missing.status_code == 422, missing.text
    assert "has no figure 'agreement'" in missing.json()["detail"]
    assert listed.json() == []  # nothing written
    assert spy.seen == []  # nothing published
    assert all(ag.loaded == {} for ag in agents.values())
    assert 3 not in cloud.versions()
