"""A controller stopped mid-rollout (tasks cancelled, MQTT client closed) and started fresh over
the same registry resumes: no duplicate deployment, no desired state published twice, versions
only go up."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from edgefed.cloud.registry.models import Deployment, DeploymentStatus

from .conftest import MODEL, TARGET, Cloud, api_client, desired_spy, running_controller, sim_agents
from .conftest import wait_status as wait

pytestmark = pytest.mark.integration
S = DeploymentStatus


async def test_a_restarted_controller_resumes_the_rollout_without_duplicates(
    cloud: Cloud,
) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    cloud.publish_version(2)
    selector = {"labels": {"site": "a"}}
    async with sim_agents(cloud, "a1", "a2", "a3", site="a") as agents, desired_spy(cloud) as spy:
        async with running_controller(cloud) as ctl, api_client(cloud, ctl) as api:
            r = await api.post(
                "/api/v1/deployments",
                json={
                    "model": MODEL,
                    "version": 1,
                    "target": TARGET,
                    "selector": selector,
                    "strategy": {"soak_s": 0},
                },
            )
            await wait(cloud, r.json()["id"], S.COMPLETED)

        # Created while no rollout engine runs: it waits in pending.
        async with api_client(cloud, None) as api:
            r = await api.post(
                "/api/v1/deployments",
                json={
                    "model": MODEL,
                    "version": 2,
                    "target": TARGET,
                    "selector": selector,
                    "strategy": {"kind": "canary", "canary_count": 1, "soak_s": 1.5},
                },
            )
            assert r.status_code == 201, r.text
            dep_id = r.json()["id"]
        assert cloud.deployment(dep_id).status == S.PENDING

        async with running_controller(cloud):  # first life: up to the soak
            await wait(cloud, dep_id, S.SOAKING)
        stopped = cloud.deployment(dep_id)
        assert stopped.status == S.SOAKING
        published_before = len(spy.seen)
        await asyncio.sleep(0.3)

        async with running_controller(cloud) as ctl:  # second life: to the end
            dep = await wait(cloud, dep_id, S.COMPLETED)
            assert ctl.publisher.published == len(spy.seen) - published_before

    assert cloud.count(Deployment) == 2
    kinds = Counter(e.kind for e in cloud.events(dep_id))
    assert kinds["selected"] == 1
    assert kinds["soaking"] == 1
    assert kinds["completed"] == 1
    assert kinds["desired"] == 3  # one per agent, across both lives
    for agent_id, agent in agents.items():
        generations = spy.generations(agent_id)
        assert generations == sorted(set(generations)), (agent_id, generations)
        assert spy.versions(agent_id) == [1, 2]
        assert agent.loaded == {MODEL: 2}
    assert dep.previous_version == 1
