"""``edgefed fl start|status|stop``: federated runs through the control API (httpx), like the
other commands that talk to a controller. Registered on the main CLI as ``fl``.

The token comes from ``--token``/``$EDGEFED_TOKEN`` or, on the controller's machine, its
``admin.token``; the controller URL from ``--controller`` or this machine's settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from edgefed.common.errors import ConfigError, EdgefedError

if TYPE_CHECKING:
    from edgefed.cloud.settings import CloudSettings

fl_app = typer.Typer(
    help="Federated learning: start runs on the controller's Flower SuperLink, watch, stop.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)

ControllerOption = Annotated[
    str | None,
    typer.Option(
        envvar="EDGEFED_CONTROLLER_URL", help="Controller URL (default: this machine's settings)."
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        envvar="EDGEFED_TOKEN",
        help="An API token (operator to start/stop; default: the controller's admin.token).",
    ),
]


def _default_settings() -> CloudSettings:
    from edgefed.cloud.settings import load_cloud_settings

    return load_cloud_settings()


_loader: list[Callable[[], CloudSettings]] = [_default_settings]


def use_settings(loader: Callable[[], CloudSettings]) -> None:
    """How the commands load the controller's settings (the main CLI passes its own, which
    honours ``--config`` and sets up logging)."""
    _loader[0] = loader


def _target(controller: str | None, token: str | None) -> tuple[str, str]:
    ctl = _loader[0]().controller
    base = (controller or ctl.resolved_public_url).rstrip("/")
    if token is None:
        admin_file = ctl.data_dir / "admin.token"
        if not admin_file.is_file():
            raise ConfigError(f"no --token given and no {admin_file}: pass an API token")
        token = admin_file.read_text().strip()
    return base, token


def _call(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> Any:
    import httpx

    try:
        response = httpx.request(
            method,
            url,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
        )
    except httpx.HTTPError as exc:
        raise EdgefedError(f"cannot reach the controller at {url}: {exc}") from exc
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = response.text
        raise EdgefedError(f"the controller answered {response.status_code}: {detail}")
    return response.json()


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_run(run: dict[str, Any], console: Console = out) -> None:
    """A run's summary line and a table of its rounds (accepted/rejected updates with the
    reasons, losses, accuracy)."""
    progress = run.get("progress") or {}
    total = progress.get("num_rounds") or (run.get("spec") or {}).get("rounds")
    console.print(
        f"run [bold]{run['id']}[/bold] of {run['model']}: [bold]{run['status']}[/bold]"
        f" (strategy {(run.get('spec') or {}).get('strategy')}, "
        f"{len(progress.get('rounds') or [])}/{total} rounds, Flower run {run.get('flwr_run_id')})"
    )
    rounds = progress.get("rounds") or []
    if rounds:
        table = Table("round", "accepted", "rejected", "train loss", "eval loss", "eval acc", "s")
        reasons: list[str] = []
        for r in rounds:
            rejected = r.get("rejected") or []
            reasons += [
                f"round {r.get('round')}: node {x.get('node_id')} rejected: {x.get('reason')}"
                for x in rejected
            ]
            table.add_row(
                str(r.get("round")),
                _fmt(r.get("accepted")),
                str(len(rejected)),
                _fmt(r.get("train_loss")),
                _fmt(r.get("eval_loss")),
                _fmt(r.get("eval_accuracy")),
                _fmt(r.get("seconds"), 1),
            )
        console.print(table)
        for line in reasons:
            console.print(line, markup=False, highlight=False)
    if run.get("error"):
        console.print(f"[red]error:[/red] {run['error']}")
    if run.get("result"):
        console.print(f"model: {run['result'].get('model_dir')}")
    if run.get("loop"):
        console.print(f"closed loop: {run['loop']}")


@fl_app.command("start")
def fl_start(
    model: Annotated[str, typer.Option(help="The registered model to improve.")],
    strategy: Annotated[
        str,
        typer.Option(
            help="fedavg, fedprox, fedtrimmedavg, fedmedian, krum, multikrum, bulyan or fltrust."
        ),
    ] = "fedavg",
    rounds: Annotated[int, typer.Option(min=1, help="Federated rounds.")] = 3,
    min_nodes: Annotated[int, typer.Option(min=1, help="SuperNodes per round.")] = 2,
    model_dir: Annotated[
        str | None, typer.Option(help="HF model directory on the controller (default: teacher).")
    ] = None,
    eval_data: Annotated[
        str | None, typer.Option(help="Held-out JSONL on the controller (server-side eval).")
    ] = None,
    root_data: Annotated[
        str | None, typer.Option(help="FLTrust root data set (JSONL) on the controller.")
    ] = None,
    lr: Annotated[float, typer.Option(help="Learning rate of local training.")] = 5e-5,
    local_steps: Annotated[int, typer.Option(min=1, help="Local steps per round.")] = 10,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    train_mode: Annotated[str, typer.Option(help="full, top-layers, head or lora.")] = "full",
    proximal_mu: Annotated[float, typer.Option(help="FedProx proximal term (0: off).")] = 0.0,
    max_update_norm: Annotated[
        float, typer.Option(help="Reject updates with a larger L2 norm (0: off).")
    ] = 0.0,
    min_valid_updates: Annotated[
        int, typer.Option(min=1, help="A round fails with fewer valid updates.")
    ] = 1,
    dp_noise: Annotated[
        float | None, typer.Option(help="Central DP noise multiplier (with --dp-clip).")
    ] = None,
    dp_clip: Annotated[float | None, typer.Option(help="Central DP clipping norm.")] = None,
    krum_byzantine: Annotated[int, typer.Option(min=0, help="Malicious nodes tolerated.")] = 0,
    controller: ControllerOption = None,
    token: TokenOption = None,
) -> None:
    """Queue a federated run; prints its id (watch it with `edgefed fl status ID`)."""
    if (dp_noise is None) != (dp_clip is None):
        raise ConfigError("--dp-noise and --dp-clip go together")
    body: dict[str, Any] = {
        "model": model,
        "strategy": strategy,
        "rounds": rounds,
        "min_nodes": min_nodes,
        "model_dir": model_dir,
        "eval_data": eval_data,
        "root_data": root_data,
        "krum_byzantine": krum_byzantine,
        "training": {
            "lr": lr,
            "local_steps": local_steps,
            "batch_size": batch_size,
            "train_mode": train_mode,
            "proximal_mu": proximal_mu,
        },
        "validation": {
            "max_update_norm": max_update_norm,
            "min_valid_updates": min_valid_updates,
        },
    }
    if dp_noise is not None:
        body["dp"] = {"noise_multiplier": dp_noise, "clipping_norm": dp_clip}
    base, secret = _target(controller, token)
    run = _call("POST", f"{base}/api/v1/federation/runs", secret, body)
    out.print(run["id"])
    err.print(f"federated run {run['id']} queued; watch it with: edgefed fl status {run['id']}")


@fl_app.command("status")
def fl_status(
    run_id: Annotated[int | None, typer.Argument(help="A run id (default: list the runs).")] = None,
    controller: ControllerOption = None,
    token: TokenOption = None,
) -> None:
    """One run with a table of its rounds, or the latest runs."""
    base, secret = _target(controller, token)
    if run_id is not None:
        print_run(_call("GET", f"{base}/api/v1/federation/runs/{run_id}", secret))
        return
    runs = _call("GET", f"{base}/api/v1/federation/runs?limit=20", secret)
    table = Table("id", "model", "status", "strategy", "rounds", "created", "error")
    for run in runs:
        spec = run.get("spec") or {}
        done = len((run.get("progress") or {}).get("rounds") or [])
        table.add_row(
            str(run["id"]),
            run["model"],
            run["status"],
            str(spec.get("strategy")),
            f"{done}/{spec.get('rounds')}",
            str(run["created_at"])[:19],
            (run.get("error") or "")[:60],
        )
    out.print(table)


@fl_app.command("stop")
def fl_stop(
    run_id: Annotated[int, typer.Argument(help="The run to stop.")],
    controller: ControllerOption = None,
    token: TokenOption = None,
) -> None:
    """Stop a queued or running federated run."""
    base, secret = _target(controller, token)
    run = _call("POST", f"{base}/api/v1/federation/runs/{run_id}/stop", secret)
    out.print(f"federated run {run['id']}: {run['status']} (stop requested)")
