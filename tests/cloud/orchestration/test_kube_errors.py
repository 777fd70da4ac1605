"""Errors of the Kubernetes API become edgefed's errors, and only those a retry can help are
retried: 5xx, 429 (honouring Retry-After) and unreachable servers, a bounded number of times;
never 4xx, counted by the requests the server saw.

No real API server can run here, so the API server is emulated (kmock's KubernetesEmulator over
real HTTP on loopback, see ``kube_emulator.py``). It does no validation or defaulting and never
refuses anything by itself, so the refusals are injected as kmock reactions that answer the way
the API server does (a ``Status`` object with the HTTP code).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kmock import KubernetesError

from edgefed.cloud.orchestration.errors import (
    KubeConflict,
    KubeForbidden,
    KubeInvalid,
    KubeNotFound,
    KubeUnavailable,
    OrchestrationError,
)
from edgefed.common.errors import PermanentError, TemporaryError

from .kube_emulator import DEPLOYMENTS, Cluster, deployment_manifest, running_cluster

WORKER = "edgefed-worker-default"


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for c in running_cluster(tmp_path):
        c.put(DEPLOYMENTS, "edgefed", deployment_manifest(WORKER, replicas=1))
        yield c


def _status(code: int, message: str) -> dict[str, Any]:
    return {"kind": "Status", "status": "Failure", "code": code, "message": message}


def _fail_first(times: int, code: int, message: str) -> Any:
    """A reaction that answers the first ``times`` requests with ``code`` and lets later ones
    through to the emulator."""
    seen: list[object] = []

    def react(request: object) -> KubernetesError | None:
        seen.append(request)
        if len(seen) <= times:
            return KubernetesError(status=code, reason="Injected", message=message)
        return None  # no answer: the emulator serves it

    return react


async def test_missing_object_is_not_found_naming_it_and_not_retried(cluster: Cluster) -> None:
    async with cluster.adapter() as kube:
        with pytest.raises(KubeNotFound, match="Deployment/absent in namespace 'edgefed'") as err:
            await kube.rollout_status("absent")

    assert isinstance(err.value, PermanentError)
    assert err.value.status == 404
    assert len(cluster.api["get"]) == 1


async def test_conflict_on_apply_suggests_force_and_is_not_retried(cluster: Cluster) -> None:
    (
        cluster.api["patch"]
        << 409
        << _status(
            409,
            'Apply failed with 1 conflict: conflict with "kubectl" using apps/v1: .spec.replicas',
        )
    )

    async with cluster.adapter() as kube:
        with pytest.raises(KubeConflict, match="force_conflicts") as err:
            await kube.apply([deployment_manifest(WORKER, replicas=3)])

    assert 'conflict with "kubectl"' in err.value.message
    assert isinstance(err.value, PermanentError)
    assert len(cluster.api["patch"]) == 1


@pytest.mark.parametrize(
    ("code", "words"), [(403, "forbidden by RBAC"), (401, "not authenticated")]
)
async def test_refused_credentials_name_the_verb_and_resource(
    cluster: Cluster, code: int, words: str
) -> None:
    (
        cluster.api["patch"]
        << code
        << _status(
            code, 'deployments.apps "edgefed-worker-default" is forbidden: User cannot patch'
        )
    )

    async with cluster.adapter() as kube:
        with pytest.raises(KubeForbidden) as err:
            await kube.scale(WORKER, 3)

    assert words in err.value.message
    assert f"cannot patch Deployment/{WORKER}/scale in namespace 'edgefed'" in err.value.message
    assert err.value.exit_code == 77
    assert len(cluster.api["patch"]) == 1


async def test_invalid_object_is_reported_with_the_servers_reason(cluster: Cluster) -> None:
    cluster.api["patch"] << 422 << _status(422, "spec.replicas: Invalid value: -1")

    async with cluster.adapter() as kube:
        with pytest.raises(KubeInvalid, match=r"spec\.replicas: Invalid value"):
            await kube.apply([deployment_manifest(WORKER)])

    assert len(cluster.api["patch"]) == 1


async def test_a_503_then_success_is_retried_and_succeeds(cluster: Cluster) -> None:
    cluster.api["patch"] << _fail_first(1, 503, "etcdserver: leader changed")

    async with cluster.adapter() as kube:
        await kube.scale(WORKER, 3)

    assert len(cluster.api["patch"]) == 2
    assert cluster.deployment(WORKER)["spec"]["replicas"] == 3


async def test_a_server_that_keeps_failing_gives_up_after_the_configured_retries(
    cluster: Cluster,
) -> None:
    cluster.api["get"] << 500 << _status(500, "internal error")

    async with cluster.adapter(retries=2) as kube:
        with pytest.raises(KubeUnavailable, match="gave up after 3 attempts") as err:
            await kube.replicas(WORKER)

    assert isinstance(err.value, TemporaryError)
    assert "internal error" in err.value.message
    assert len(cluster.api["get"]) == 3


async def test_429_is_retried_after_the_servers_retry_after(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.api["get"][:1] << 429 << {"Retry-After": "0.05"} << _status(429, "slow down")

    with caplog.at_level(logging.WARNING, logger="edgefed.cloud.orchestration.kube"):
        async with cluster.adapter(retry_max_s=1.0) as kube:
            replicas = await kube.replicas(WORKER)

    assert replicas == 1
    assert len(cluster.api["get"]) == 2
    assert "retry 1 of 3 in 0.05 s" in caplog.text


async def test_a_proxys_bare_502_is_temporary(cluster: Cluster) -> None:
    # A load balancer in front of the API server answers without a body or Content-Type.
    cluster.api["get"] << 502 << b""

    async with cluster.adapter(retries=1) as kube:
        with pytest.raises(KubeUnavailable, match="answered 502"):
            await kube.replicas(WORKER)

    assert len(cluster.api["get"]) == 2


async def test_an_unreachable_server_is_temporary_after_retries(cluster: Cluster) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once the socket is closed
    emulator = str(cluster.server.url).rstrip("/")
    config = cluster.kubeconfig.read_text().replace(emulator, f"http://127.0.0.1:{port}")
    cluster.kubeconfig.write_text(config)

    async with cluster.adapter(retries=1) as kube:
        with pytest.raises(KubeUnavailable, match="unreachable") as err:
            await kube.replicas(WORKER)

    assert isinstance(err.value, OrchestrationError)
    assert "gave up after 2 attempts" in err.value.message
