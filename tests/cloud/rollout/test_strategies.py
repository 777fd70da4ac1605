"""Strategies end to end: deployments created through the real API, rolled out by the real
engine over a real mosquitto to simulated agents that answer like the real one."""

from __future__ import annotations

from typing import Any

import pytest

from edgefed.cloud.registry.models import AgentPhase, DeploymentStatus

from .conftest import (
    MODEL,
    Cloud,
    api_client,
    audit_records,
    desired_spy,
    eventually_event,
    eventually_loaded,
    running_controller,
    sim_agents,
)
from .conftest import wait_status as wait

pytestmark = pytest.mark.integration
S = DeploymentStatus


def body(version: int, agents: list[str] | None = None, **strategy: Any) -> dict[str, Any]:
    selector: dict[str, Any] = {"agents": agents} if agents else {"labels": {"site": "a"}}
    return {
        "model": MODEL,
        "version": version,
        "target": "x86-avx2",
        "selector": selector,
        "strategy": {"min_requests": 5, **strategy},
    }


async def test_all_at_once_gives_every_selected_agent_the_version(cloud: Cloud) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    async with (
        running_controller(cloud) as ctl,
        sim_agents(cloud, "a1", "a2", "a3", site="a") as agents,
        desired_spy(cloud) as spy,
        api_client(cloud, ctl) as api,
    ):
        r = await api.post("/api/v1/deployments", json=body(1, kind="all-at-once", soak_s=0.5))
        assert r.status_code == 201, r.text
        dep = await wait(cloud, r.json()["id"], S.COMPLETED, S.ABORTED, S.ROLLED_BACK)
        assert dep.status == S.COMPLETED, dep.reason

    assert {a: ag.loaded for a, ag in agents.items()} == {a: {MODEL: 1} for a in agents}
    assert all(da.phase == AgentPhase.LOADED for da in dep.agents)
    for agent_id in agents:
        assert spy.versions(agent_id) == [1]
    kinds = [e.kind for e in cloud.events(dep.id)]
    assert kinds[0] == "created"
    assert "selected" in kinds
    assert kinds[-1] == "completed"


async def deploy(api: Any, cloud: Cloud, payload: dict[str, Any], *statuses: S) -> Any:
    r = await api.post("/api/v1/deployments", json=payload)
    assert r.status_code == 201, r.text
    return await wait(cloud, r.json()["id"], *(statuses or (S.COMPLETED,)))


async def test_a_canary_runs_alone_until_its_soak_passes_then_the_rest_follows(
    cloud: Cloud,
) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    cloud.publish_version(2)
    async with (
        running_controller(cloud) as ctl,
        sim_agents(cloud, "a1", "a2", "a3", site="a") as agents,
        api_client(cloud, ctl) as api,
    ):
        await deploy(api, cloud, body(1, soak_s=0))
        async with desired_spy(cloud) as spy:
            canary_body = body(2, kind="canary", canary_count=1, soak_s=1.5)
            soaking = await deploy(api, cloud, canary_body, S.SOAKING)
            canary = [da.agent_id for da in soaking.agents if da.canary]
            rest = sorted(set(agents) - set(canary))
            assert len(canary) == 1
            assert len(rest) == 2
            # During the soak only the canary agent was sent v2.
            assert spy.versions(canary[0]) == [2]
            assert all(spy.versions(a) == [] for a in rest)
            assert all(agents[a].loaded == {MODEL: 1} for a in rest)
            dep = await wait(cloud, soaking.id, S.COMPLETED)

    assert {a: ag.loaded for a, ag in agents.items()} == {a: {MODEL: 2} for a in agents}
    events = cloud.events(dep.id)
    soak_passed = next(e.id for e in events if e.kind == "soak-passed")
    sent = {e.agent_id: e.id for e in events if e.kind == "desired"}
    assert sent[canary[0]] < soak_passed < min(sent[a] for a in rest)
    assert dep.previous_version == 1
    assert [e.kind for e in events].count("selected") == 1


async def test_blue_green_waits_for_an_operator_to_confirm_then_completes(cloud: Cloud) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    cloud.publish_version(2)
    async with (
        running_controller(cloud) as ctl,
        sim_agents(cloud, "a1", "a2", site="a") as agents,
        api_client(cloud, ctl) as api,
    ):
        await deploy(api, cloud, body(1, soak_s=0))
        r = await api.post("/api/v1/deployments", json=body(2, kind="blue-green", soak_s=0.3))
        dep_id = r.json()["id"]
        await wait(cloud, dep_id, S.SOAKING)
        await eventually_event(cloud, dep_id, "awaiting-confirmation")
        assert cloud.deployment(dep_id).status == S.SOAKING  # not finished on its own
        assert all(ag.loaded == {MODEL: 2} for ag in agents.values())

        other = await api.post("/api/v1/deployments/1/confirm")
        assert other.status_code == 409
        assert "only a blue-green deployment that is soaking" in other.json()["detail"]

        confirmed = await api.post(f"/api/v1/deployments/{dep_id}/confirm")
        assert confirmed.status_code == 200, confirmed.text
        assert confirmed.json()["status"] == "completed"
        dep = await wait(cloud, dep_id, S.COMPLETED)
        again = await api.post(f"/api/v1/deployments/{dep_id}/confirm")
        assert again.status_code == 409

    assert all(ag.loaded == {MODEL: 2} for ag in agents.values())
    kinds = [e.kind for e in cloud.events(dep.id)]
    assert "confirmed" in kinds
    assert kinds[-1] == "completed"
    audit = audit_records(cloud, f"deployment:{dep_id}")
    assert any(a.action.endswith("/confirm") and a.outcome == 200 for a in audit)


async def test_an_abort_through_the_api_rolls_the_canary_back(cloud: Cloud) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    cloud.publish_version(2)
    async with (
        running_controller(cloud) as ctl,
        sim_agents(cloud, "a1", "a2", "a3", site="a") as agents,
        api_client(cloud, ctl) as api,
        desired_spy(cloud) as spy,
    ):
        await deploy(api, cloud, body(1, soak_s=0))
        r = await api.post("/api/v1/deployments", json=body(2, kind="canary", soak_s=600))
        dep_id = r.json()["id"]
        await wait(cloud, dep_id, S.SOAKING)
        aborted = await api.post(f"/api/v1/deployments/{dep_id}/abort")
        assert aborted.status_code == 202, aborted.text
        dep = await wait(cloud, dep_id, S.ROLLED_BACK)
        canary = [da.agent_id for da in dep.agents if da.canary]
        await eventually_loaded(agents, canary, 3)
        assert (await api.post(f"/api/v1/deployments/{dep_id}/abort")).status_code == 409

    assert dep.rollback_version == 3
    assert dep.reason.startswith("aborted by")
    assert spy.versions(canary[0]) == [1, 2, 3]
    for other in set(agents) - set(canary):
        assert 2 not in spy.versions(other)
        assert agents[other].loaded == {MODEL: 1}
    v3 = cloud.versions()[3]
    assert v3.parent_version == 1
