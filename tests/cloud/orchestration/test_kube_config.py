"""How the Kubernetes adapter finds its API server: a kubeconfig file (path and context from
the settings, or ``$KUBECONFIG``) outside a cluster, the pod's service account (token, CA,
``KUBERNETES_SERVICE_HOST/PORT``) inside one; and the ``[controller.kubernetes]`` settings.

No real API server can run here, so the API server is emulated (kmock's KubernetesEmulator on
loopback, see ``kube_emulator.py``; for the in-cluster case served over TLS with a test CA, as
a pod sees it). It does no validation or defaulting.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp.test_utils
import pytest
from kmock import Server

from edgefed.cloud.orchestration.errors import KubeConfigError
from edgefed.cloud.orchestration.kube import KubeAdapter, client_config
from edgefed.cloud.orchestration.kube_settings import KubernetesSettings
from edgefed.cloud.settings import load_cloud_settings
from tests import certs

from .kube_emulator import (
    DEPLOYMENTS,
    ApplyingEmulator,
    Cluster,
    deployment_manifest,
    running_cluster,
)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async for c in running_cluster(tmp_path):
        c.put(DEPLOYMENTS, "edgefed", deployment_manifest("edgefed-worker-default", replicas=2))
        yield c


@pytest.fixture(autouse=True)
def _outside_a_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG"):
        monkeypatch.delenv(name, raising=False)


async def test_kubeconfig_context_from_settings_reaches_its_server_with_its_token(
    cluster: Cluster,
) -> None:
    async with cluster.adapter(context="emulated") as kube:
        replicas = await kube.replicas("edgefed-worker-default")

    assert replicas == 2
    (request,) = list(cluster.api["get"])
    assert request.headers["Authorization"] == "Bearer test-token"


async def test_kubeconfig_from_the_environment_uses_its_current_context(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))

    settings = KubernetesSettings(in_cluster="auto")
    config = client_config(settings)

    assert config.context_name == "elsewhere"
    assert config.cluster.server == "http://127.0.0.1:9"


def test_an_unknown_context_is_a_config_error_naming_it(cluster: Cluster) -> None:
    with pytest.raises(KubeConfigError, match="Context 'prod' not found"):
        client_config(cluster.settings(context="prod"))


def test_a_missing_kubeconfig_says_where_it_looked(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    with pytest.raises(KubeConfigError, match=r"no kubeconfig at .*nope\.yaml") as err:
        client_config(KubernetesSettings(kubeconfig=missing, in_cluster="false"))

    assert err.value.exit_code == 78


def test_a_kubeconfig_that_is_not_yaml_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "config"
    broken.write_text("clusters: [unclosed\n")

    with pytest.raises(KubeConfigError, match="cannot be read"):
        client_config(KubernetesSettings(kubeconfig=broken, in_cluster="false"))


def _tls_server_cls(context: ssl.SSLContext) -> type[aiohttp.test_utils.RawTestServer]:
    class TlsServer(aiohttp.test_utils.RawTestServer):
        async def start_server(self, loop: Any = None, **kwargs: Any) -> None:
            await super().start_server(loop=loop, ssl=context, **kwargs)

    return TlsServer


def _service_account(folder: Path, ca: certs.TestCa, token: str) -> Path:
    folder.mkdir()
    (folder / "token").write_text(token)
    (folder / "namespace").write_text("edgefed")
    (folder / "ca.crt").write_bytes(ca.cert_file.read_bytes())
    return folder


async def test_in_a_pod_the_service_account_and_cluster_ca_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = certs.TestCa.create(tmp_path / "pki", "cluster-ca")
    issued = ca.issue("kubernetes", server=True)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(issued.cert_file, issued.key_file)
    sa_dir = _service_account(tmp_path / "sa", ca, "pod-token")

    async with ApplyingEmulator() as api, Server(api, server_cls=_tls_server_cls(tls)) as server:
        api.objects[DEPLOYMENTS, "edgefed", "edgefed-worker-default"] = deployment_manifest(
            "edgefed-worker-default", replicas=1
        )
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
        settings = KubernetesSettings(in_cluster="auto", service_account_dir=sa_dir)

        async with KubeAdapter(settings) as kube:
            await kube.scale("edgefed-worker-default", 3)

        assert kube.server == f"https://127.0.0.1:{server.port}"
        (request,) = list(api["patch"])
        assert request.headers["Authorization"] == "Bearer pod-token"
        stored = api.objects[DEPLOYMENTS, "edgefed", "edgefed-worker-default"]
        assert stored["spec"]["replicas"] == 3


def test_in_cluster_true_without_a_mounted_token_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.43.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")

    with pytest.raises(KubeConfigError, match=r"needs .*/token"):
        client_config(KubernetesSettings(in_cluster="true", service_account_dir=tmp_path))


def test_outside_a_pod_auto_falls_back_to_the_kubeconfig(cluster: Cluster) -> None:
    config = client_config(cluster.settings(in_cluster="auto"))

    assert config.context_name == "emulated"


def test_controller_settings_read_the_kubernetes_table(tmp_path: Path) -> None:
    config_file = tmp_path / "edgefed.toml"
    config_file.write_text(
        "[controller.kubernetes]\n"
        "enabled = true\n"
        'namespace = "serving"\n'
        'worker_deployment = "workers-{pool}"\n'
        "retries = 2\n"
    )

    kube = load_cloud_settings(config_file).controller.kubernetes

    assert kube.enabled
    assert kube.namespace == "serving"
    assert kube.deployment_for("gpu") == "workers-gpu"
    assert kube.retries == 2
    assert kube.field_manager == "edgefed"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("edgefed-worker", "must contain {pool}"),
        ("{pool}-{zone}", "only use the {pool} placeholder"),
        ("Workers_{pool}", "valid Deployment name"),
    ],
)
def test_a_bad_worker_deployment_template_is_refused(template: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KubernetesSettings(worker_deployment=template)
