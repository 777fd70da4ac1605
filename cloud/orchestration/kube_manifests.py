"""Rendered manifests as the adapter applies them: parsed from ``kubectl kustomize``'s YAML
stream, put in an order the API server accepts, printed for ``--dry-run``. No Kubernetes client
here: this is plain data, testable without a server."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from edgefed.cloud.orchestration.errors import InvalidKubeInput

# The order objects are applied in: what others refer to first (namespaces, then accounts,
# storage and RBAC, then workloads, then what selects workloads). Unknown kinds (custom
# resources such as a ServiceMonitor) go last, after the CRDs that define them. Helm's
# install order, shortened to what edgefed's manifests hold.
APPLY_ORDER = (
    "Namespace",
    "CustomResourceDefinition",
    "PriorityClass",
    "RuntimeClass",
    "StorageClass",
    "ResourceQuota",
    "LimitRange",
    "NetworkPolicy",
    "ServiceAccount",
    "Secret",
    "ConfigMap",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Service",
    "DaemonSet",
    "Deployment",
    "StatefulSet",
    "Job",
    "CronJob",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "IngressClass",
    "Ingress",
)
_RANK = {kind: i for i, kind in enumerate(APPLY_ORDER)}


def apply_order(objects: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``objects`` in an order the API server accepts them in (stable within a kind)."""
    listed = list(objects)
    for obj in listed:
        if not isinstance(obj, Mapping):
            raise InvalidKubeInput(f"a manifest object must be a mapping, not {type(obj).__name__}")
    return sorted(listed, key=lambda o: _RANK.get(str(o.get("kind")), len(APPLY_ORDER)))


@dataclass(frozen=True)
class AppliedObject:
    """One object the API server accepted."""

    kind: str
    name: str
    namespace: str | None

    def __str__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else ""
        return f"{self.kind}/{self.name}{where}"


def parse_manifest_stream(text: str) -> list[dict[str, Any]]:
    """The objects of a multi-document YAML stream (``kubectl kustomize`` output); ``List``
    kinds are unfolded, empty documents skipped."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise InvalidKubeInput(f"rendered manifests are not valid YAML: {exc}") from None
    objects: list[dict[str, Any]] = []
    for doc in docs:
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise InvalidKubeInput(f"a manifest document is a {type(doc).__name__}, not a mapping")
        if str(doc.get("kind", "")).endswith("List") and isinstance(doc.get("items"), list):
            objects.extend(doc["items"])
        else:
            objects.append(doc)
    return objects


def dump_objects(objects: Iterable[Mapping[str, Any]]) -> str:
    """``objects`` as a YAML stream (for ``--dry-run``)."""
    return yaml.safe_dump_all([dict(o) for o in objects], sort_keys=False)
