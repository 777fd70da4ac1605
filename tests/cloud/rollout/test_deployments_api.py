"""Bad input on the deployments API: a clear 4xx naming what was wrong, and nothing written."""

from __future__ import annotations

from typing import Any

import pytest

from edgefed.cloud.registry.models import Deployment, DeploymentAgent, RolloutEvent

from .conftest import MODEL, TARGET, Cloud, api_client

pytestmark = pytest.mark.integration


def body(**changes: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "version": 1,
        "target": TARGET,
        "selector": {"labels": {"site": "a"}},
        "strategy": {"kind": "canary", "canary_count": 1, "soak_s": 1},
    } | changes


@pytest.mark.parametrize(
    ("changes", "code", "words"),
    [
        ({"model": "nope"}, 404, "no model named 'nope'"),
        ({"version": 7}, 404, "embed v7 has no artifact for target 'x86-avx2'"),
        ({"target": "arm64"}, 404, "has no artifact for target 'arm64'"),
        ({"selector": {"labels": {"site": "mars"}}}, 422, "the selector matches no enrolled agent"),
        ({"selector": {"agents": ["a1", "ghost"]}}, 422, "unknown agents"),
        ({"selector": {}}, 422, "the selector needs agents or labels"),
        ({"strategy": {"kind": "canary", "soak": 1}}, 422, "soak"),
        ({"strategy": {"max_error_rate": 2}}, 422, "max_error_rate"),
        ({"strategy": {"kind": "all-at-once", "canary_count": 2}}, 422, "only for kind=canary"),
        ({"strategy": {"min_quality": {"cosine_mean": "high"}}}, 422, "min_quality"),
    ],
)
async def test_bad_deployments_are_refused_and_nothing_is_written(
    cloud: Cloud, changes: dict[str, Any], code: int, words: str
) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    cloud.enrol("a1", site="a")
    async with api_client(cloud, None) as api:
        r = await api.post("/api/v1/deployments", json=body(**changes))
    assert r.status_code == code, r.text
    assert words in r.text
    assert cloud.count(Deployment) == cloud.count(DeploymentAgent) == 0
    assert cloud.count(RolloutEvent) == 0


async def test_a_second_deployment_of_the_model_to_the_same_agents_is_a_conflict(
    cloud: Cloud,
) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    cloud.publish_version(2)
    cloud.enrol("a1", site="a")
    cloud.enrol("a2", site="a")
    async with api_client(cloud, None) as api:
        first = await api.post("/api/v1/deployments", json=body())
        assert first.status_code == 201, first.text
        assert first.json()["strategy"]["canary_count"] == 1
        assert first.json()["strategy"]["load_timeout_s"] == 600  # the engine's defaults
        again = await api.post("/api/v1/deployments", json=body(version=2))
        overlap = await api.post("/api/v1/deployments", json=body(selector={"agents": ["a2"]}))
        missing = await api.post("/api/v1/deployments/999/abort")
        confirm = await api.post(f"/api/v1/deployments/{first.json()['id']}/confirm")
    for r in (again, overlap):
        assert r.status_code == 409, r.text
        assert "embed already has an active deployment (#1)" in r.json()["detail"]
    assert missing.status_code == 404
    assert "no deployment with id 999" in missing.text
    assert confirm.status_code == 409  # a canary, and still pending
    assert cloud.count(Deployment) == 1
    assert cloud.count(DeploymentAgent) == 2
    assert cloud.count(RolloutEvent) == 1
