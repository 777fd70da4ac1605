"""An emulated Kubernetes API server for the adapter's tests.

No real API server can run here (no container engine, no kube-apiserver or k3s in the package
registries), so the tests talk over real HTTP on loopback to kmock's ``KubernetesEmulator``:
an in-memory object store that creates, reads, merge-patches and deletes objects. It does no
validation, no defaulting and no field ownership (server-side apply is a plain merge there,
conflicts never arise by themselves), so tests inject the responses a real server gives
(409, 403, 5xx, Retry-After) with kmock's reactions.

Two additions in :class:`ApplyingEmulator`: a real API server creates the object a server-side
apply names when it does not exist, where the emulator answers 404 to any PATCH of a missing
object, so apply patches (content type ``application/apply-patch+yaml``) create it first; and
kmock 0.8 reads ``/api/v1/namespaces/NAME`` as "namespace NAME, no resource" (404), so the
Namespace objects themselves are served here.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp.web
import kmock
import yaml
from kmock import KubernetesEmulator, Server
from kmock._internal import rendering

from edgefed.cloud.orchestration.kube import KubeAdapter
from edgefed.cloud.orchestration.kube_settings import KubernetesSettings

APPLY_PATCH = "application/apply-patch+yaml"
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
NODES = kmock.resource("", "v1", "nodes")
NAMESPACES = kmock.resource("", "v1", "namespaces")
_NAMESPACE_PATH = re.compile(r"/api/v1/namespaces/([^/]+)")


class ApplyingEmulator(KubernetesEmulator):
    """The emulator, plus create-on-apply as a real API server does it."""

    async def _handle(self, request: rendering.Request) -> aiohttp.web.StreamResponse:
        content_type = request.headers.get("Content-Type", "")
        namespace_path = _NAMESPACE_PATH.fullmatch(request.url.path)
        if namespace_path is not None:
            return await self._namespace(request, namespace_path.group(1))
        if (
            request.method == kmock.method.PATCH
            and content_type.startswith(APPLY_PATCH)
            and request.resource is not None
            and request.name is not None
            and not request.subresource
        ):
            key = (request.resource, request.namespace, request.name)
            async with self._lock:
                if key not in self.objects:
                    self.objects[key] = {}
                elif self.objects[key].deleted:
                    self.objects[key].create({})
        return await super()._handle(request)

    async def _namespace(self, request: rendering.Request, name: str) -> aiohttp.web.Response:
        key = (NAMESPACES, None, name)
        async with self._lock:
            if request.method == kmock.method.PATCH:
                if key not in self.objects:
                    self.objects[key] = {}
                self.objects[key].patch(request.data)
            if key not in self.objects or self.objects[key].deleted:
                status = {"kind": "Status", "code": 404, "message": f"namespace {name} not found"}
                return aiohttp.web.json_response(status, status=404)
            return aiohttp.web.json_response(self.objects[key].raw)


@dataclass
class Cluster:
    """A running emulator and the kubeconfig that points at it."""

    api: ApplyingEmulator
    server: Server
    kubeconfig: Path

    def settings(self, **overrides: Any) -> KubernetesSettings:
        """Adapter settings for this cluster; retries wait milliseconds, not seconds."""
        values: dict[str, Any] = {
            "enabled": True,
            "kubeconfig": self.kubeconfig,
            "context": "emulated",
            "in_cluster": "false",
            "retries": 3,
            "retry_base_s": 0.001,
            "retry_max_s": 0.01,
            "request_timeout_s": 5.0,
        }
        values.update(overrides)
        return KubernetesSettings(**values)

    def adapter(self, **overrides: Any) -> KubeAdapter:
        return KubeAdapter(self.settings(**overrides))

    def deployment(self, name: str, namespace: str = "edgefed") -> dict[str, Any]:
        """The stored Deployment, as the emulator holds it now."""
        return dict(self.api.objects[DEPLOYMENTS, namespace, name].raw)

    def put(self, resource: kmock.resource, namespace: str | None, obj: dict[str, Any]) -> None:
        """Store ``obj`` as if someone else had created it."""
        self.api.objects[resource, namespace, obj["metadata"]["name"]] = obj


def write_kubeconfig(path: Path, server: str, *, token: str = "test-token") -> Path:
    """A kubeconfig with two contexts: ``emulated`` (the emulator) and ``elsewhere`` (current,
    a port nothing listens on), so a test that reaches the emulator chose its context."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "elsewhere",
        "clusters": [
            {"name": "emulated", "cluster": {"server": server}},
            {"name": "elsewhere", "cluster": {"server": "http://127.0.0.1:9"}},
        ],
        "users": [{"name": "tester", "user": {"token": token}}],
        "contexts": [
            {"name": "emulated", "context": {"cluster": "emulated", "user": "tester"}},
            {"name": "elsewhere", "context": {"cluster": "elsewhere", "user": "tester"}},
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def running_cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """Start an emulator on a free loopback port (use as a fixture body)."""
    async with ApplyingEmulator() as api, Server(api) as server:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", str(server.url).rstrip("/"))
        yield Cluster(api, server, kubeconfig)


def deployment_manifest(
    name: str, *, replicas: int = 1, image: str = "ghcr.io/edgefed/worker:0.1.0"
) -> dict[str, Any]:
    labels = {"app.kubernetes.io/name": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "worker", "image": image}]},
            },
        },
    }
