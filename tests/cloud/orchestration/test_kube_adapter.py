"""The Kubernetes adapter against an emulated API server: server-side apply creates and then
updates objects, in an order that works; scaling patches the scale subresource; rollout status
reads a Deployment's status; node labels are added and removed.

No real API server can run here, so the API server is emulated (kmock's KubernetesEmulator over
real HTTP on loopback, see ``kube_emulator.py``); it does no validation or defaulting, so what
these tests show is what the adapter sends and how it reads the answers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import kmock
import pytest

from edgefed.cloud.orchestration.errors import InvalidKubeInput, KubeClientClosed, KubeNotFound
from edgefed.cloud.orchestration.kube import KubernetesWorkerScaler
from edgefed.cloud.orchestration.kube_rollout import rollout_status_of
from edgefed.cloud.orchestration.scaler import WorkerScaler

from .kube_emulator import (
    APPLY_PATCH,
    DEPLOYMENTS,
    NODES,
    Cluster,
    deployment_manifest,
    running_cluster,
)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for c in running_cluster(tmp_path):
        yield c


def _namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def _config_map(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


async def test_apply_creates_objects_then_a_second_apply_updates_them(cluster: Cluster) -> None:
    manifests = [deployment_manifest("edgefed-worker-default", replicas=2), _namespace("edgefed")]

    async with cluster.adapter() as kube:
        first = await kube.apply(manifests)
        changed = deployment_manifest(
            "edgefed-worker-default", replicas=2, image="ghcr.io/edgefed/worker:0.2.0"
        )
        await kube.apply([changed])

    assert [str(o) for o in first] == [
        "Namespace/edgefed",
        "Deployment/edgefed-worker-default in edgefed",
    ]
    stored = cluster.deployment("edgefed-worker-default")
    containers = stored["spec"]["template"]["spec"]["containers"]
    assert containers[0]["image"] == "ghcr.io/edgefed/worker:0.2.0"
    assert stored["metadata"]["namespace"] == "edgefed"
    assert (kmock.resource("", "v1", "namespaces"), None, "edgefed") in cluster.api.objects


async def test_apply_is_server_side_apply_as_the_edgefed_field_manager(cluster: Cluster) -> None:
    async with cluster.adapter() as kube:
        await kube.apply([_config_map("routes", {"a": "1"})])

    (request,) = list(cluster.api["patch"])
    assert request.headers["Content-Type"].startswith(APPLY_PATCH)
    assert request.params["fieldManager"] == "edgefed"
    assert request.params.get("force", "false") == "false"
    assert request.url.path == "/api/v1/namespaces/edgefed/configmaps/routes"


async def test_apply_sends_namespaces_and_rbac_before_workloads(cluster: Cluster) -> None:
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "controller"},
        "rules": [{"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["patch"]}],
    }
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "controller"}}
    pdb = {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": "worker"},
        "spec": {"minAvailable": 1},
    }
    manifests = [pdb, deployment_manifest("w"), role, account, _namespace("edgefed")]

    async with cluster.adapter() as kube:
        applied = await kube.apply(manifests)

    assert [o.kind for o in applied] == [
        "Namespace",
        "ServiceAccount",
        "Role",
        "Deployment",
        "PodDisruptionBudget",
    ]
    paths = [r.url.path for r in cluster.api["patch"]]
    assert paths[0] == "/api/v1/namespaces/edgefed"
    assert paths[2] == "/apis/rbac.authorization.k8s.io/v1/namespaces/edgefed/roles/controller"


async def test_apply_keeps_the_namespace_an_object_names(cluster: Cluster) -> None:
    cm = _config_map("dash", {"k": "v"})
    cm["metadata"]["namespace"] = "monitoring"

    async with cluster.adapter() as kube:
        (applied,) = await kube.apply([cm])

    assert applied.namespace == "monitoring"
    assert (kmock.resource("", "v1", "configmaps"), "monitoring", "dash") in cluster.api.objects


async def test_apply_with_force_takes_over_conflicting_fields(cluster: Cluster) -> None:
    async with cluster.adapter(force_conflicts=True) as kube:
        await kube.apply([_config_map("routes", {"a": "1"})])

    (request,) = list(cluster.api["patch"])
    assert request.params["force"] == "true"


async def test_apply_of_a_custom_resource_uses_the_crd_in_the_same_batch(cluster: Cluster) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "names": {"kind": "ServiceMonitor", "plural": "servicemonitors"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": True, "storage": True}],
        },
    }
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "controller"},
        "spec": {"endpoints": [{"port": "metrics"}]},
    }

    async with cluster.adapter() as kube:
        applied = await kube.apply([monitor, crd])

    assert [o.kind for o in applied] == ["CustomResourceDefinition", "ServiceMonitor"]
    key = (
        kmock.resource("monitoring.coreos.com", "v1", "servicemonitors"),
        "edgefed",
        "controller",
    )
    assert key in cluster.api.objects


async def test_apply_of_an_unknown_kind_fails_before_anything_is_sent(cluster: Cluster) -> None:
    unknown = {"apiVersion": "example.com/v1", "kind": "Gizmo", "metadata": {"name": "g"}}

    async with cluster.adapter() as kube:
        with pytest.raises(InvalidKubeInput, match="unknown kind 'Gizmo'"):
            await kube.apply([_namespace("edgefed"), unknown])

    assert len(cluster.api["patch"]) == 0


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}, "without metadata.name"),
        ({"kind": "ConfigMap", "metadata": {"name": "x"}}, "apiVersion"),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)
async def test_apply_refuses_malformed_objects_with_a_clear_error(
    cluster: Cluster, obj: Any, message: str
) -> None:
    async with cluster.adapter() as kube:
        with pytest.raises(InvalidKubeInput, match=message):
            await kube.apply([obj])

    assert len(cluster.api["patch"]) == 0


async def test_scale_patches_the_scale_subresource_and_replicas_reads_it(cluster: Cluster) -> None:
    cluster.put(DEPLOYMENTS, "edgefed", deployment_manifest("edgefed-worker-default", replicas=1))

    async with cluster.adapter() as kube:
        await kube.scale("edgefed-worker-default", 5)
        replicas = await kube.replicas("edgefed-worker-default")

    assert replicas == 5
    assert cluster.deployment("edgefed-worker-default")["spec"]["replicas"] == 5
    (patch,) = list(cluster.api["patch"])
    assert patch.url.path.endswith("/deployments/edgefed-worker-default/scale")
    assert patch.data == {"spec": {"replicas": 5}}
    assert patch.headers["Content-Type"] == "application/merge-patch+json"


async def test_scale_refuses_negative_replicas(cluster: Cluster) -> None:
    async with cluster.adapter() as kube:
        with pytest.raises(InvalidKubeInput, match="replicas must be a whole number"):
            await kube.scale("edgefed-worker-default", -1)

    assert len(cluster.api) == 0


async def test_scale_of_a_missing_deployment_names_it(cluster: Cluster) -> None:
    async with cluster.adapter() as kube:
        with pytest.raises(KubeNotFound, match="Deployment/nope/scale in namespace 'edgefed'"):
            await kube.scale("nope", 2)


async def test_worker_scaler_maps_pools_to_worker_deployments(cluster: Cluster) -> None:
    cluster.put(DEPLOYMENTS, "edgefed", deployment_manifest("edgefed-worker-gpu", replicas=2))

    async with cluster.adapter() as kube:
        scaler = KubernetesWorkerScaler(kube)
        before = await scaler.replicas("gpu")
        await scaler.scale("gpu", 4)
        after = await scaler.replicas("gpu")

    assert isinstance(scaler, WorkerScaler)
    assert (before, after) == (2, 4)
    assert cluster.deployment("edgefed-worker-gpu")["spec"]["replicas"] == 4


async def test_worker_scaler_follows_the_name_template_and_namespace(cluster: Cluster) -> None:
    cluster.put(DEPLOYMENTS, "serving", deployment_manifest("workers-cpu", replicas=3))

    async with cluster.adapter(namespace="serving", worker_deployment="workers-{pool}") as kube:
        replicas = await KubernetesWorkerScaler(kube).replicas("cpu")

    assert replicas == 3


async def test_worker_scaler_refuses_a_pool_kubernetes_cannot_name(cluster: Cluster) -> None:
    async with cluster.adapter() as kube:
        with pytest.raises(InvalidKubeInput, match="pool 'GPU_pool'"):
            await KubernetesWorkerScaler(kube).scale("GPU_pool", 1)


async def test_rollout_status_reads_the_deployment_status(cluster: Cluster) -> None:
    dep = deployment_manifest("edgefed-worker-default", replicas=3)
    dep["metadata"]["generation"] = 4
    dep["status"] = {
        "observedGeneration": 4,
        "replicas": 4,
        "updatedReplicas": 3,
        "readyReplicas": 3,
        "availableReplicas": 3,
    }
    cluster.put(DEPLOYMENTS, "edgefed", dep)

    async with cluster.adapter() as kube:
        status = await kube.rollout_status("edgefed-worker-default")

    assert (status.desired, status.updated, status.ready, status.available) == (3, 3, 3, 3)
    assert status.observed_generation_current
    assert not status.complete
    assert status.message == "1 old replicas of 'edgefed-worker-default' are pending termination"


def _dep(generation: int, **status: Any) -> dict[str, Any]:
    dep = deployment_manifest("w", replicas=2)
    dep["metadata"]["generation"] = generation
    dep["status"] = status
    return dep


@pytest.mark.parametrize(
    ("dep", "complete", "message"),
    [
        (_dep(2, observedGeneration=1, replicas=2, updatedReplicas=2), False, "to be observed"),
        (_dep(2, observedGeneration=2, replicas=2, updatedReplicas=1), False, "1 out of 2 new"),
        (
            _dep(2, observedGeneration=2, replicas=2, updatedReplicas=2, availableReplicas=1),
            False,
            "1 of 2 updated replicas",
        ),
        (
            _dep(
                2,
                observedGeneration=2,
                replicas=2,
                updatedReplicas=2,
                readyReplicas=2,
                availableReplicas=2,
            ),
            True,
            "successfully rolled out",
        ),
    ],
)
def test_rollout_status_follows_kubectl(dep: dict[str, Any], complete: bool, message: str) -> None:
    status = rollout_status_of(dep)

    assert status.complete is complete
    assert message in status.message


def test_rollout_status_reports_an_exceeded_progress_deadline() -> None:
    dep = _dep(
        3,
        observedGeneration=3,
        replicas=2,
        updatedReplicas=1,
        conditions=[
            {"type": "Available", "status": "True"},
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"},
        ],
    )

    status = rollout_status_of(dep)

    assert status.failed
    assert not status.complete
    assert "exceeded its progress deadline" in status.message


async def test_label_node_adds_then_removes_labels(cluster: Cluster) -> None:
    cluster.put(NODES, None, {"metadata": {"name": "jetson-1", "labels": {"arch": "arm64"}}})

    async with cluster.adapter() as kube:
        added = await kube.label_node("jetson-1", {"edgefed.io/agent": "true"})
        removed = await kube.label_node("jetson-1", {"edgefed.io/agent": None})

    assert added == {"arch": "arm64", "edgefed.io/agent": "true"}
    assert removed == {"arch": "arm64"}
    first, second = (r.data for r in cluster.api["patch"])
    assert first == {"metadata": {"labels": {"edgefed.io/agent": "true"}}}
    assert second == {"metadata": {"labels": {"edgefed.io/agent": None}}}


async def test_label_node_needs_a_label(cluster: Cluster) -> None:
    async with cluster.adapter() as kube:
        with pytest.raises(InvalidKubeInput, match="at least one label"):
            await kube.label_node("jetson-1", {})


async def test_a_closed_adapter_says_so(cluster: Cluster) -> None:
    async with cluster.adapter() as kube:
        pass

    with pytest.raises(KubeClientClosed, match="adapter is closed"):
        await kube.replicas("edgefed-worker-default")
    assert len(cluster.api) == 0
