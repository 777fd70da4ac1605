"""Settings of the controller's Kubernetes adapter (``[controller.kubernetes]``).

They live beside the adapter rather than in ``cloud/settings.py`` so that the adapter, its CLI
and its tests read one small model; ``ControllerSettings`` embeds it as ``kubernetes``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# An RFC 1123 label: what Kubernetes accepts as a namespace or Deployment name part.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"


class KubernetesSettings(BaseModel):
    """How the controller talks to the Kubernetes API server (any conformant one, k3s included).

    With ``in_cluster = "auto"`` the adapter uses the pod's service account when it runs in a pod
    (``KUBERNETES_SERVICE_HOST`` is set and the token file exists), and the kubeconfig otherwise.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    """Off by default: without Kubernetes the harness starts worker processes itself."""
    namespace: str = Field(default="edgefed", pattern=rf"^{_DNS_LABEL}$", max_length=63)
    """Namespace of the worker Deployments, and of manifest objects that name none."""
    kubeconfig: Path | None = None
    """Kubeconfig file; ``$KUBECONFIG`` or ``~/.kube/config`` when unset."""
    context: str | None = None
    """Kubeconfig context; the file's ``current-context`` when unset."""
    in_cluster: Literal["auto", "true", "false"] = "auto"
    """Use the pod's service account (true), the kubeconfig (false), or whichever applies."""
    service_account_dir: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount")
    """Where the pod's token, ``ca.crt`` and ``namespace`` are mounted (in-cluster config)."""
    field_manager: str = Field(default="edgefed", min_length=1, max_length=128)
    """Field manager of server-side apply and of every patch the controller sends."""
    force_conflicts: bool = False
    """Apply takes over fields owned by another manager instead of failing with a conflict."""
    worker_deployment: str = "edgefed-worker-{pool}"
    """Name of a pool's worker Deployment; ``{pool}`` is replaced by the pool's name."""
    request_timeout_s: float = Field(default=10.0, gt=0, le=300)
    """Timeout of one API request (connect, read, write)."""
    retries: int = Field(default=4, ge=0, le=20)
    """Further attempts after a failure a retry can help (5xx, 429, connection, timeout)."""
    retry_base_s: float = Field(default=0.25, gt=0)
    """First backoff ceiling; it doubles with each attempt (full jitter)."""
    retry_max_s: float = Field(default=10.0, gt=0)
    """Longest wait between attempts, also for a server's Retry-After."""

    @field_validator("worker_deployment")
    @classmethod
    def _template(cls, v: str) -> str:
        if "{pool}" not in v:
            raise ValueError(f"worker_deployment {v!r} must contain {{pool}}")
        try:
            sample = v.format(pool="default")
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"worker_deployment {v!r} may only use the {{pool}} placeholder"
            ) from None
        if not re.fullmatch(_DNS_LABEL, sample) or len(sample) > 63:
            raise ValueError(
                f"worker_deployment {v!r} does not give a valid Deployment name "
                f"(lower-case letters, digits and '-'): {sample!r}"
            )
        return v

    def deployment_for(self, pool: str) -> str:
        """The worker Deployment of ``pool``."""
        return self.worker_deployment.format(pool=pool)
