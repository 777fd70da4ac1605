"""``edgefed cloud k8s``: render and apply an overlay, scale a pool, read rollout status, mark
agent nodes; errors leave with the exit code of their type.

No real API server can run here, so the API server is emulated (kmock's KubernetesEmulator on
loopback, see ``kube_emulator.py``; it does no validation or defaulting). The commands run in a
worker thread (CliRunner) or a child process, while the emulator serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import kmock
import pytest
import yaml
from typer.testing import CliRunner, Result

from edgefed.cli import app

from .kube_emulator import DEPLOYMENTS, NODES, Cluster, deployment_manifest, running_cluster

REPO = Path(__file__).resolve().parents[3]
OVERLAYS = sorted(
    p.parent.name for p in (REPO / "manifests" / "overlays").glob("*/kustomization.yaml")
)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for c in running_cluster(tmp_path):
        yield c


@pytest.fixture
def config_file(cluster: Cluster, tmp_path: Path) -> Path:
    path = tmp_path / "edgefed.toml"
    path.write_text(
        "[controller]\n"
        'gateway_pools = ["default", "gpu"]\n'
        "[controller.kubernetes]\n"
        f'kubeconfig = "{cluster.kubeconfig}"\n'
        'context = "emulated"\n'
        'in_cluster = "false"\n'
        "retry_base_s = 0.001\n"
    )
    return path


async def edgefed(config_file: Path, *args: str) -> Result:
    """Run ``edgefed --config CONFIG ARGS`` in a thread, so the emulator keeps serving."""
    runner = CliRunner()
    return await asyncio.to_thread(
        runner.invoke, app, ["--config", str(config_file), *args], env={"COLUMNS": "200"}
    )


def _overlay(folder: Path) -> Path:
    folder.mkdir()
    objects = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "edgefed"}},
        deployment_manifest("edgefed-worker-default", replicas=2),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "w"}, "data": {"a": "1"}},
    ]
    (folder / "objects.yaml").write_text(yaml.safe_dump_all(objects))
    (folder / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "namespace: edgefed\nresources: [objects.yaml]\n"
    )
    return folder


async def test_apply_renders_an_overlay_and_applies_it(
    cluster: Cluster, config_file: Path, tmp_path: Path
) -> None:
    overlay = _overlay(tmp_path / "overlay")

    result = await edgefed(config_file, "cloud", "k8s", "apply", str(overlay))

    assert result.exit_code == 0, result.output
    assert "applied Namespace/edgefed" in result.output
    assert "3 objects applied" in result.output
    assert cluster.deployment("edgefed-worker-default")["spec"]["replicas"] == 2
    assert (kmock.resource("", "v1", "configmaps"), "edgefed", "w") in cluster.api.objects


async def test_apply_dry_run_prints_the_objects_in_order_and_sends_nothing(
    cluster: Cluster, config_file: Path, tmp_path: Path
) -> None:
    overlay = _overlay(tmp_path / "overlay")

    result = await edgefed(config_file, "cloud", "k8s", "apply", str(overlay), "--dry-run")

    assert result.exit_code == 0, result.output
    kinds = [doc["kind"] for doc in yaml.safe_load_all(result.output)]
    assert kinds == ["Namespace", "ConfigMap", "Deployment"]
    assert len(cluster.api) == 0


async def test_apply_of_a_broken_overlay_names_kustomizes_complaint(
    cluster: Cluster, config_file: Path, tmp_path: Path
) -> None:
    overlay = tmp_path / "broken"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text("resources: [missing.yaml]\n")

    result = await edgefed(config_file, "cloud", "k8s", "apply", str(overlay))

    assert result.exit_code != 0
    assert "kubectl kustomize" in str(result.exception)
    assert "missing.yaml" in str(result.exception)
    assert len(cluster.api) == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_every_overlay_of_the_repository_applies(
    cluster: Cluster, config_file: Path, overlay: str
) -> None:
    rendered = await edgefed(
        config_file, "cloud", "k8s", "apply", f"manifests/overlays/{overlay}", "--dry-run"
    )
    count = len(list(yaml.safe_load_all(rendered.output)))

    result = await edgefed(config_file, "cloud", "k8s", "apply", f"manifests/overlays/{overlay}")

    assert result.exit_code == 0, result.output
    assert f"{count} objects applied" in result.output
    assert len(cluster.api["patch"]) == count


async def test_scale_sets_the_replicas_of_the_pools_deployment(
    cluster: Cluster, config_file: Path
) -> None:
    cluster.put(DEPLOYMENTS, "edgefed", deployment_manifest("edgefed-worker-gpu", replicas=1))

    result = await edgefed(config_file, "cloud", "k8s", "scale", "gpu", "3")

    assert result.exit_code == 0, result.output
    assert "Deployment edgefed-worker-gpu scaled to 3" in result.output
    assert cluster.deployment("edgefed-worker-gpu")["spec"]["replicas"] == 3


async def test_status_of_the_pools_exits_75_while_a_rollout_is_in_progress(
    cluster: Cluster, config_file: Path
) -> None:
    for pool, updated in (("default", 2), ("gpu", 1)):
        dep = deployment_manifest(f"edgefed-worker-{pool}", replicas=2)
        dep["metadata"]["generation"] = 1
        dep["status"] = {
            "observedGeneration": 1,
            "replicas": 2,
            "updatedReplicas": updated,
            "readyReplicas": updated,
            "availableReplicas": updated,
        }
        cluster.put(DEPLOYMENTS, "edgefed", dep)

    pools = await edgefed(config_file, "cloud", "k8s", "status")
    one = await edgefed(config_file, "cloud", "k8s", "status", "edgefed-worker-default")

    assert pools.exit_code == 75, pools.output
    assert "successfully rolled out" in pools.output
    assert "1 out of 2 new replicas" in pools.output
    assert one.exit_code == 0, one.output


async def test_label_node_marks_and_unmarks_an_agent_node(
    cluster: Cluster, config_file: Path
) -> None:
    cluster.put(NODES, None, {"metadata": {"name": "pi-1", "labels": {"zone": "lab"}}})

    marked = await edgefed(config_file, "cloud", "k8s", "label-node", "pi-1")
    labels_marked = dict(cluster.api.objects[NODES, None, "pi-1"]["metadata"]["labels"])
    unmarked = await edgefed(config_file, "cloud", "k8s", "label-node", "pi-1", "--remove")

    assert marked.exit_code == 0, marked.output
    assert labels_marked == {"zone": "lab", "edgefed.io/agent": "true"}
    assert unmarked.exit_code == 0, unmarked.output
    assert cluster.api.objects[NODES, None, "pi-1"]["metadata"]["labels"] == {"zone": "lab"}


async def test_a_missing_deployment_exits_66_with_its_name(
    cluster: Cluster, config_file: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edgefed.cli", "--config", str(config_file),
        "cloud", "k8s", "scale", "nowhere", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)

    assert proc.returncode == 66
    assert "Deployment/edgefed-worker-nowhere/scale in namespace 'edgefed' not found" in (
        " ".join(stderr.decode().split())
    )
