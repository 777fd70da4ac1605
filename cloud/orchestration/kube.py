"""The controller's Kubernetes adapter: server-side apply of rendered manifests, scaling of
worker Deployments, rollout status, node labels; and the :class:`WorkerScaler` of Kubernetes.

The client is **lightkube** (``AsyncClient``), the only module of edgefed that imports it:

- async, so the controller's event loop and the autoscaler never block on the API server;
- native server-side apply (``apply(obj, field_manager=..., force=...)``), the way to own the
  fields of rendered manifests without a client-side ``last-applied`` annotation, and to
  leave alone what others (the HPA, operators) own;
- typed models for every built-in kind (``codecs.from_dict`` turns any rendered object into
  its model without a discovery round trip), generic resources from CRDs for the rest;
- ``KubeConfig`` reads kubeconfig files (contexts) and the pod's service account alike, and
  speaks to any conformant API server, k3s's included.

Spiked against kmock's ``KubernetesEmulator`` beside ``kubernetes_asyncio``: both speak to it,
but kubernetes_asyncio needs a per-kind API method (or its discovery-driven dynamic client) to
apply an arbitrary manifest object, and validates models client-side on every response.

Plain-data helpers live beside it: :mod:`.kube_manifests` (parsing and ordering rendered
objects), :mod:`.kube_rollout` (reading a Deployment's rollout), :mod:`.kube_settings`.

Errors leave this module as :mod:`edgefed.cloud.orchestration.errors`; only
:class:`KubeUnavailable` (5xx, 429 honouring Retry-After, connection refused or reset,
timeouts) is retried, with capped full-jitter backoff, ``retries`` times from the settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import logging
import os
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import httpx2
import yaml
from lightkube import AsyncClient, KubeConfig, codecs
from lightkube.config.kubeconfig import SingleConfig
from lightkube.config.models import User
from lightkube.core.exceptions import ApiError, ConfigError, LoadResourceError
from lightkube.core.resource import NamespacedResource
from lightkube.generic_resource import (
    async_load_in_cluster_generic_resources,
    create_resources_from_crd,
)
from lightkube.resources.apiextensions_v1 import CustomResourceDefinition
from lightkube.resources.apps_v1 import Deployment, DeploymentScale
from lightkube.resources.core_v1 import Node
from lightkube.types import PatchType

from edgefed.cloud.orchestration.errors import (
    InvalidKubeInput,
    KubeApiError,
    KubeClientClosed,
    KubeConfigError,
    KubeConflict,
    KubeForbidden,
    KubeInvalid,
    KubeNotFound,
    KubeUnavailable,
)
from edgefed.cloud.orchestration.kube_manifests import AppliedObject, apply_order
from edgefed.cloud.orchestration.kube_rollout import RolloutStatus, rollout_status_of
from edgefed.cloud.orchestration.kube_settings import KubernetesSettings
from edgefed.common.mqtt import backoff_delay

log = logging.getLogger(__name__)

T = TypeVar("T")


def client_config(settings: KubernetesSettings) -> SingleConfig:
    """The client configuration the settings ask for: the pod's service account in a pod
    (``in_cluster`` true, or auto with ``KUBERNETES_SERVICE_HOST`` set and a token mounted),
    else the kubeconfig (``kubeconfig``, ``$KUBECONFIG`` or ``~/.kube/config``) and ``context``."""
    sa_dir = settings.service_account_dir
    in_pod = "KUBERNETES_SERVICE_HOST" in os.environ and (sa_dir / "token").is_file()
    if settings.in_cluster == "true" or (settings.in_cluster == "auto" and in_pod):
        for name in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            if not os.environ.get(name):
                raise KubeConfigError(f"in-cluster Kubernetes config needs ${name} (set in pods)")
        for file in ("token", "ca.crt", "namespace"):
            if not (sa_dir / file).is_file():
                raise KubeConfigError(
                    f"in-cluster Kubernetes config needs {sa_dir / file} (the pod's service "
                    "account); set controller.kubernetes.in_cluster = 'false' outside a pod"
                )
        in_pod_config = KubeConfig.from_service_account(service_account=sa_dir).get()
        if in_pod_config is None:  # from_one always sets a current context; lightkube types
            raise KubeConfigError(f"no usable in-cluster config from {sa_dir}")
        return in_pod_config
    path = _kubeconfig_path(settings)
    try:
        single = KubeConfig.from_file(path).get(context_name=settings.context)
    except ConfigError as exc:
        raise KubeConfigError(f"kubeconfig {path}: {exc}") from None
    except (OSError, yaml.YAMLError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KubeConfigError(f"kubeconfig {path} cannot be read: {exc!r}") from None
    if single is None:  # get() without a default raises instead; lightkube's typing
        raise KubeConfigError(f"kubeconfig {path} has no current context: set a context")
    if single.user is None:  # a context without a user: anonymous, as kubectl treats it
        single = single._replace(user=User())
    return single


def _kubeconfig_path(settings: KubernetesSettings) -> Path:
    if settings.kubeconfig is not None:
        path = settings.kubeconfig.expanduser()
        source = "controller.kubernetes.kubeconfig"
    elif os.environ.get("KUBECONFIG"):
        # Like kubectl, $KUBECONFIG may list several files; the first one that exists is used
        # (lightkube does not merge them).
        entries = [Path(p).expanduser() for p in os.environ["KUBECONFIG"].split(os.pathsep) if p]
        path = next((p for p in entries if p.is_file()), entries[0])
        source = "$KUBECONFIG"
    else:
        path = Path.home() / ".kube" / "config"
        source = "the default location"
    if not path.is_file():
        raise KubeConfigError(
            f"no kubeconfig at {path} ({source}): set controller.kubernetes.kubeconfig, "
            "$KUBECONFIG, or run in a pod with in_cluster = 'auto'"
        )
    return path


class KubeAdapter:
    """One Kubernetes API server, through one connection pool. Use ``async with``."""

    def __init__(
        self,
        settings: KubernetesSettings,
        config: SingleConfig | None = None,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self._config = config if config is not None else client_config(settings)
        self._client = AsyncClient(
            self._config,
            namespace=settings.namespace,
            timeout=httpx2.Timeout(settings.request_timeout_s),
            field_manager=settings.field_manager,
            trust_env=False,
        )
        self._rng = rng or random.Random()  # noqa: S311  # jitter, not security
        self._crds_loaded = False
        self._closed = False

    @property
    def server(self) -> str:
        """The API server's URL."""
        return str(self._config.cluster.server)

    async def __aenter__(self) -> KubeAdapter:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        await self._client.close()

    # ------------------------------------------------------------------ operations

    async def apply(
        self, objects: Iterable[Mapping[str, Any]], *, force: bool | None = None
    ) -> list[AppliedObject]:
        """Server-side apply ``objects`` (rendered manifests) as the field manager of the
        settings, namespaces first. Every object is checked before the first one is sent.
        ``force`` (default: the settings' ``force_conflicts``) takes over fields that another
        manager owns; without it such a field fails with :class:`KubeConflict`."""
        force = self.settings.force_conflicts if force is None else force
        ordered = apply_order(objects)
        resources = [await self._to_resource(obj, ordered) for obj in ordered]
        applied: list[AppliedObject] = []
        for obj, res in zip(ordered, resources, strict=True):
            kind = str(obj["kind"])
            meta = res.metadata
            name = str(meta.name)
            ns: str | None = None
            if isinstance(res, NamespacedResource):
                ns = meta.namespace or self.settings.namespace
                meta.namespace = ns
            what = _describe(kind, name, ns)

            async def send(res: Any = res) -> Any:
                return await self._client.apply(res, force=force)

            await self._call("apply", what, send)
            applied.append(AppliedObject(kind, name, ns))
            log.info("applied %s", what)
        return applied

    async def scale(self, deployment: str, replicas: int, *, namespace: str | None = None) -> None:
        """Set ``deployment``'s replicas through its scale subresource (what an HPA or
        ``kubectl scale`` does: no other field of the Deployment changes)."""
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
            raise InvalidKubeInput(f"replicas must be a whole number ≥ 0 (got {replicas!r})")
        ns = namespace or self.settings.namespace
        await self._call(
            "patch",
            _describe("Deployment", deployment, ns, "scale"),
            lambda: self._client.patch(
                DeploymentScale,
                deployment,
                {"spec": {"replicas": replicas}},
                namespace=ns,
                patch_type=PatchType.MERGE,
            ),
        )

    async def replicas(self, deployment: str, *, namespace: str | None = None) -> int:
        """``deployment``'s desired replicas (from its scale subresource)."""
        ns = namespace or self.settings.namespace
        scale = await self._call(
            "get",
            _describe("Deployment", deployment, ns, "scale"),
            lambda: self._client.get(DeploymentScale, deployment, namespace=ns),
        )
        return int(scale.spec.replicas or 0) if scale.spec else 0

    async def rollout_status(
        self, deployment: str, *, namespace: str | None = None
    ) -> RolloutStatus:
        """Where ``deployment``'s rollout stands now (one read; poll to wait)."""
        ns = namespace or self.settings.namespace
        obj = await self._call(
            "get",
            _describe("Deployment", deployment, ns),
            lambda: self._client.get(Deployment, deployment, namespace=ns),
        )
        return rollout_status_of(obj.to_dict())

    async def label_node(self, node: str, labels: Mapping[str, str | None]) -> dict[str, str]:
        """Add, change or (value None) remove ``labels`` on ``node`` with a merge patch; the
        node's labels afterwards."""
        if not labels:
            raise InvalidKubeInput("label_node needs at least one label")
        for key, value in labels.items():
            if not key or (value is not None and not isinstance(value, str)):
                raise InvalidKubeInput(f"label {key!r}={value!r}: keys and values are strings")
        patched = await self._call(
            "patch",
            _describe("Node", node, None),
            lambda: self._client.patch(
                Node, node, {"metadata": {"labels": dict(labels)}}, patch_type=PatchType.MERGE
            ),
        )
        return dict(patched.metadata.labels or {}) if patched.metadata else {}

    # ------------------------------------------------------------------ plumbing

    async def _to_resource(self, obj: Mapping[str, Any], batch: list[Mapping[str, Any]]) -> Any:
        """The lightkube model of ``obj``; kinds defined by CRDs (in ``batch`` or installed)
        become generic resources."""
        meta = obj.get("metadata")
        if not isinstance(meta, Mapping) or not meta.get("name"):
            raise InvalidKubeInput(
                f"{obj.get('kind', 'an object')} without metadata.name cannot be applied"
            )
        label = f"{obj.get('kind')}/{meta.get('name')}"
        try:
            return codecs.from_dict(dict(obj))
        except LoadResourceError as exc:
            first = exc
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise InvalidKubeInput(f"{label} is not a valid object: {exc!r}") from None
        if "apiVersion" not in obj or "kind" not in obj:
            raise InvalidKubeInput(f"{label}: {first}")
        for other in batch:
            if other.get("kind") == "CustomResourceDefinition":
                try:
                    crd = cast(
                        CustomResourceDefinition, CustomResourceDefinition.from_dict(dict(other))
                    )
                    create_resources_from_crd(crd)
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    name = (other.get("metadata") or {}).get("name")
                    raise InvalidKubeInput(f"CustomResourceDefinition/{name}: {exc!r}") from None
        if not self._crds_loaded:
            # An API server without apiextensions (404) has no custom kinds to load.
            with contextlib.suppress(KubeNotFound):
                await self._call(
                    "list",
                    "CustomResourceDefinitions",
                    lambda: async_load_in_cluster_generic_resources(self._client),
                )
            self._crds_loaded = True
        try:
            return codecs.from_dict(dict(obj))
        except LoadResourceError:
            raise InvalidKubeInput(
                f"{label}: unknown kind {obj.get('kind')!r} of {obj.get('apiVersion')!r} "
                "(not built in, and no CustomResourceDefinition defines it)"
            ) from None

    async def _call(self, verb: str, what: str, op: Callable[[], Awaitable[T]]) -> T:
        """Run one API request, converting lightkube's and httpx2's errors and retrying
        :class:`KubeUnavailable` with backoff ``retries`` times."""
        if self._closed:
            raise KubeClientClosed(f"cannot {verb} {what}: the Kubernetes adapter is closed")
        attempts = self.settings.retries + 1
        for attempt in range(1, attempts + 1):
            try:
                try:
                    return await op()
                except KeyError as exc:
                    # lightkube reads the Content-Type of an error response with [] and so
                    # raises KeyError when a proxy answers without one: recover the HTTP error.
                    if isinstance(exc.__context__, httpx2.HTTPStatusError):
                        raise exc.__context__ from None
                    raise
            except (httpx2.HTTPStatusError, httpx2.TransportError) as exc:
                error = convert_error(exc, verb, what)
            if not isinstance(error, KubeUnavailable):
                raise error
            if attempt == attempts:
                raise KubeUnavailable(
                    f"{error.message} (gave up after {attempts} attempts)",
                    retry_after=error.retry_after,
                ) from error
            if error.retry_after is not None:
                delay = min(error.retry_after, self.settings.retry_max_s)
            else:
                delay = backoff_delay(
                    attempt, self.settings.retry_base_s, self.settings.retry_max_s, self._rng
                )
            log.warning("%s; retry %d of %d in %.2f s", error.message, attempt, attempts - 1, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover


class KubernetesWorkerScaler:
    """The :class:`~edgefed.cloud.orchestration.scaler.WorkerScaler` of Kubernetes: pool P is
    the Deployment named by the settings' ``worker_deployment`` template in their namespace."""

    def __init__(self, adapter: KubeAdapter) -> None:
        self.adapter = adapter

    def deployment(self, pool: str) -> str:
        name = self.adapter.settings.deployment_for(pool)
        if not _is_dns_label(name):
            raise InvalidKubeInput(
                f"pool {pool!r} gives the Deployment name {name!r}, which Kubernetes refuses "
                "(lower-case letters, digits and '-', at most 63)"
            )
        return name

    async def replicas(self, pool: str) -> int:
        return await self.adapter.replicas(self.deployment(pool))

    async def scale(self, pool: str, replicas: int) -> None:
        await self.adapter.scale(self.deployment(pool), replicas)


def _is_dns_label(name: str) -> bool:
    return len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) is not None


def _describe(kind: str, name: str, namespace: str | None, subresource: str | None = None) -> str:
    sub = f"/{subresource}" if subresource else ""
    where = f" in namespace {namespace!r}" if namespace else ""
    return f"{kind}/{name}{sub}{where}"


def convert_error(
    exc: httpx2.HTTPStatusError | httpx2.TransportError, verb: str, what: str
) -> KubeApiError | KubeUnavailable:
    """The edgefed error of a failed request to ``verb`` ``what``."""
    if isinstance(exc, httpx2.TransportError):
        if isinstance(exc, httpx2.TimeoutException | httpx2.NetworkError | httpx2.ProtocolError):
            return KubeUnavailable(
                f"Kubernetes API server unreachable ({verb} {what}): "
                f"{type(exc).__name__}: {exc or 'no detail'}"
            )
        return KubeApiError(f"cannot {verb} {what}: {type(exc).__name__}: {exc}", status=0)
    response = exc.response
    code = response.status_code
    detail = _server_message(exc)
    if code in (429,) or code >= 500:
        return KubeUnavailable(
            f"Kubernetes API server answered {code} to {verb} {what}: {detail}",
            retry_after=_retry_after(response.headers.get("Retry-After")),
        )
    if code == 404:
        return KubeNotFound(f"{what} not found ({verb}): {detail}", status=code)
    if code == 409:
        hint = (
            "; a field is owned by another field manager: apply with force_conflicts "
            "(--force-conflicts) to take it over"
            if verb == "apply"
            else ""
        )
        return KubeConflict(f"conflict on {verb} {what}: {detail}{hint}", status=code)
    if code in (401, 403):
        why = "not authenticated" if code == 401 else "forbidden by RBAC"
        return KubeForbidden(
            f"{why}: cannot {verb} {what}: {detail} (grant the controller's service account "
            f"the '{verb}' verb on this resource)",
            status=code,
        )
    if code in (400, 422):
        return KubeInvalid(f"{what} is invalid ({verb}): {detail}", status=code)
    return KubeApiError(f"Kubernetes API answered {code} to {verb} {what}: {detail}", status=code)


def _server_message(exc: httpx2.HTTPStatusError) -> str:
    """The API server's own message (a Status object), else the start of the body."""
    if isinstance(exc, ApiError) and exc.status is not None and exc.status.message:
        return str(exc.status.message)
    response = exc.response
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    text = response.text.strip()
    return text[:200] if text else response.reason_phrase or "no detail"


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the API server sends seconds; HTTP dates are honoured too)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
