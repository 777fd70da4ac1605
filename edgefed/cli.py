"""The ``edgefed`` command line.

Each command builds and validates the settings when it starts (never at import), converts
edgefed errors into a one-line message and an exit code from ``sysexits.h``, and imports heavy
packages only inside the command that needs them, so the edge install stays light.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from edgefed import __version__
from edgefed.cloud.federation.cli import fl_app
from edgefed.cloud.federation.cli import use_settings as use_fl_settings
from edgefed.cloud.orchestration.kube_cli import k8s_app
from edgefed.cloud.orchestration.kube_cli import use_settings as use_k8s_settings
from edgefed.common.errors import ArtifactRejected, ConfigError, EdgefedError
from edgefed.common.settings import Settings, load_settings

if TYPE_CHECKING:
    from edgefed.cloud.settings import CloudSettings

app = typer.Typer(
    name="edgefed",
    help="Cloud-edge federation for transformer models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
artifact_app = typer.Typer(help="Build, sign and verify model artifacts.", no_args_is_help=True)
app.add_typer(artifact_app, name="artifact")
edge_app = typer.Typer(help="The edge agent: join a fleet, run, install as a service.")
app.add_typer(edge_app, name="edge", no_args_is_help=True)
cloud_app = typer.Typer(help="The cloud controller: control API, registry, rollouts, jobs.")
app.add_typer(cloud_app, name="cloud", no_args_is_help=True)
cloud_app.add_typer(k8s_app, name="k8s", no_args_is_help=True)
split_app = typer.Typer(help="Split a model's layers between edge and cloud.")
app.add_typer(split_app, name="split", no_args_is_help=True)
app.add_typer(fl_app, name="fl", no_args_is_help=True)


def _default_state_dir() -> Path:
    import os

    if os.geteuid() == 0:
        return Path("/var/lib/edgefed")
    return Path.home() / ".local" / "state" / "edgefed"


StateDirOption = Annotated[
    Path | None,
    typer.Option(
        "--state-dir",
        envvar="EDGEFED_STATE_DIR",
        help="Agent state: config, models, outbox (default /var/lib/edgefed as root, "
        "~/.local/state/edgefed otherwise).",
    ),
]

out = Console()
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (also $EDGEFED_CONFIG).",
        exists=False,
        dir_okay=False,
    ),
]


class _State:
    config: Path | None = None
    log_level: str | None = None


_state = _State()


@app.callback()
def _root(
    config: ConfigOption = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
    ] = None,
) -> None:
    _state.config = config
    _state.log_level = log_level


def _drop_color_message(record: logging.LogRecord) -> bool:
    """uvicorn attaches an ANSI-coloured copy of some messages; it is noise outside a terminal."""
    record.__dict__.pop("color_message", None)
    return True


def _log_handler(settings: Settings) -> logging.Handler:
    """Where log records go: a rich console, or one JSON object per line on stderr."""
    if settings.log_format == "rich":
        handler: logging.Handler = RichHandler(console=err, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_drop_color_message)
    if settings.log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(process)d %(message)s",
                rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
                datefmt="%Y-%m-%dT%H:%M:%S%z",
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def _settings(*, settings_cls: type[Settings] = Settings, **overrides: Any) -> Settings:
    if _state.log_level:
        overrides.setdefault("log_level", _state.log_level.upper())
    settings = load_settings(_state.config, settings_cls=settings_cls, **overrides)
    logging.basicConfig(level=settings.log_level, handlers=[_log_handler(settings)], force=True)
    # Request lines of HTTP clients and migration chatter are noise at INFO.
    for noisy in ("httpx", "httpx2", "httpcore", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    return settings


def _cloud_settings(**overrides: Any) -> CloudSettings:
    from edgefed.cloud.settings import CloudSettings

    # One load with the cloud model: the common model alone refuses a config file's
    # [controller] and [worker] tables as unknown.
    return cast("CloudSettings", _settings(settings_cls=CloudSettings, **overrides))


use_fl_settings(_cloud_settings)
use_k8s_settings(_cloud_settings)


@app.command()
def version() -> None:
    """Print the edgefed version."""
    out.print(f"edgefed {__version__}")


@app.command()
def broker(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1; 0 picks a free one.")] = 0,
    persistence: Annotated[
        bool | None, typer.Option(help="Keep sessions and retained messages on disk.")
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder for config, persistence and log.")
    ] = None,
) -> None:
    """Run a private mosquitto on loopback until Ctrl-C."""
    from edgefed.common.broker import PrivateBroker

    settings = _settings()
    b = PrivateBroker(
        port=port or None,
        persistence=settings.broker.persistence if persistence is None else persistence,
        data_dir=data_dir or settings.broker.data_dir,
        mosquitto_path=settings.broker.mosquitto_path,
        start_timeout_s=settings.broker.start_timeout_s,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with b:
        out.print(f"[green]mosquitto running[/green] at [bold]{b.url}[/bold] (pid {b.pid})")
        out.print(f"  export EDGEFED_BROKER_URL={b.url}")
        out.print(f"  config and log in {b.data_dir}; Ctrl-C stops it")
        try:
            while not stop.wait(0.5):
                if not b.running:
                    raise EdgefedError(f"mosquitto exited; see {b.log_file}")
        except KeyboardInterrupt:
            pass
    out.print("mosquitto stopped")


# --------------------------------------------------------------------------- simulation

OutOption = Annotated[
    Path | None,
    typer.Option("--out", help="Report folder (default: ./edgefed-reports/SCENARIO-TIME)."),
]
CacheOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir", help="Prepared models are kept here (default ~/.cache/edgefed/sim)."
    ),
]
TinyOption = Annotated[
    bool,
    typer.Option(
        "--tiny", help="Serve the tiny model instead of MiniLM (also EDGEFED_SIM_TINY=1)."
    ),
]


def _run_simulation(
    scenario_file: Path,
    *,
    out_dir: Path | None,
    cache_dir: Path | None,
    duration_s: float | None = None,
    rate: float | None = None,
    tiny: bool = False,
    mode: str | None = None,
) -> None:
    import time as _time

    from edgefed.simulation.runner import RunOptions, override, run_scenario
    from edgefed.simulation.scenario import ScenarioError, load_scenario

    _settings()
    if not _state.log_level:  # the fleet's own chatter would bury the progress bars
        logging.getLogger().setLevel(logging.WARNING)
    try:
        scenario = load_scenario(scenario_file)
        if duration_s is not None or rate is not None:
            scenario = override(scenario, duration_s=duration_s, rate_per_s=rate)
    except ScenarioError:
        raise  # a ConfigError: its message names the file, line and field
    except ValueError as exc:  # an override that breaks the scenario's own checks
        raise ConfigError(f"{scenario_file}: the overrides do not fit: {exc}") from None
    if mode is not None and mode not in ("processes", "in-process"):
        raise ConfigError(f"--mode must be processes or in-process (got {mode!r})")
    stamp = _time.strftime("%Y%m%d-%H%M%S")
    out_dir = out_dir or Path("edgefed-reports") / f"{scenario.name}-{stamp}"
    options = RunOptions(
        out_dir=out_dir, cache_dir=cache_dir, force_tiny=tiny or None, mode=mode, console=out
    )
    files = asyncio.run(run_scenario(scenario, options))
    if files.summary.totals.lost:
        err.print(f"[red]{files.summary.totals.lost} request(s) lost[/red]")
        raise typer.Exit(70)


@app.command()
def simulate(
    scenario_file: Annotated[
        Path | None, typer.Argument(help="Scenario YAML (see simulation/scenarios/).")
    ] = None,
    out_dir: OutOption = None,
    cache_dir: CacheOption = None,
    duration_s: Annotated[
        float | None,
        typer.Option("--duration-s", min=1, help="Run this long (the timeline scales to fit)."),
    ] = None,
    rate: Annotated[
        float | None, typer.Option("--rate", min=0.01, help="Base request rate per second.")
    ] = None,
    mode: Annotated[
        str | None, typer.Option(help="Override the scenario's mode: processes or in-process.")
    ] = None,
    tiny: TinyOption = False,
    list_builtin: Annotated[
        bool, typer.Option("--list", help="List the scenarios that ship with edgefed.")
    ] = False,
) -> None:
    """Run a scenario: a whole fleet on this machine (broker, controller, workers, agents as
    real processes behind shaped links), its workload, faults and rollouts; then the report."""
    from edgefed.simulation.scenario import builtin_scenario, builtin_scenario_names

    if list_builtin:
        for name in builtin_scenario_names():
            out.print(f"{name:20} {builtin_scenario(name)}")
        return
    if scenario_file is None:
        raise ConfigError("name a scenario file (or --list the built-in ones)")
    if not scenario_file.exists() and scenario_file.name in builtin_scenario_names():
        scenario_file = builtin_scenario(scenario_file.name)
    _run_simulation(
        scenario_file,
        out_dir=out_dir,
        cache_dir=cache_dir,
        duration_s=duration_s,
        rate=rate,
        tiny=tiny,
        mode=mode,
    )


@app.command()
def demo(
    out_dir: OutOption = None,
    cache_dir: CacheOption = None,
    tiny: TinyOption = False,
    duration_s: Annotated[
        float | None,
        typer.Option("--duration-s", min=1, help="A shorter run (the timeline scales to fit)."),
    ] = None,
) -> None:
    """The main job on embedded defaults: compress MiniLM, run 4 heterogeneous agents on
    different links with split plans, a routed workload, a killed agent, a cut link and a
    canary rollout; then the summary and the report."""
    from edgefed.simulation.scenario import builtin_scenario

    _run_simulation(
        builtin_scenario("demo"),
        out_dir=out_dir,
        cache_dir=cache_dir,
        tiny=tiny,
        duration_s=duration_s,
    )


# --------------------------------------------------------------------------- compression


def _parse_gate(entries: list[str], option: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for entry in entries:
        metric, sep, value = entry.partition("=")
        try:
            if not sep or not metric:
                raise ValueError
            out[metric.strip()] = float(value)
        except ValueError:
            raise ConfigError(
                f"{option} {entry!r}: use METRIC=VALUE, e.g. cosine_mean=0.9"
            ) from None
    return out


@app.command()
def compress(
    teacher: Annotated[Path, typer.Argument(help="Local Hugging Face model directory.")],
    task: Annotated[
        str, typer.Option(help="feature-extraction, text-classification or text-generation.")
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Artifact store (artifacts go to OUT/NAME/vN/TARGET).")
    ],
    target: Annotated[
        list[str] | None,
        typer.Option(
            help="Device target (repeatable): fp32, x86-avx2, x86-avx512-vnni, arm64, "
            "static-int8, gpu-fp16."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Text file, JSONL or datasets dir; built-in corpus if unset."),
    ] = None,
    layers: Annotated[
        str | None, typer.Option(help="Teacher layers the student keeps, e.g. 0,2,5.")
    ] = None,
    depth: Annotated[int | None, typer.Option(min=1, help="Student depth (even spread).")] = None,
    distill: Annotated[
        bool, typer.Option(help="Distil a student (off: export the teacher).")
    ] = True,
    max_steps: Annotated[int, typer.Option(min=0, help="Distillation steps at most.")] = 1000,
    time_budget: Annotated[
        float | None, typer.Option(help="Distillation time budget in seconds.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    max_length: Annotated[int, typer.Option(min=8, help="Tokens per training text.")] = 64,
    max_examples: Annotated[int | None, typer.Option(min=2, help="Use at most N texts.")] = None,
    seed: int = 0,
    name: Annotated[
        str | None, typer.Option(help="Artifact name (default: teacher dir name).")
    ] = None,
    version: Annotated[int | None, typer.Option(min=1, help="Version (default: next).")] = None,
    signing_key: Annotated[
        Path | None, typer.Option(help="Ed25519 key (default: OUT/signing.key, made if missing).")
    ] = None,
    gate_min: Annotated[
        list[str] | None, typer.Option("--min", help="Gate minimum METRIC=VALUE (repeatable).")
    ] = None,
    gate_max: Annotated[
        list[str] | None, typer.Option("--max", help="Gate maximum METRIC=VALUE (repeatable).")
    ] = None,
) -> None:
    """Distil, export, quantize per target, validate, gate and publish signed artifacts."""
    from pydantic import ValidationError

    from edgefed.cloud.compress import cli_view
    from edgefed.cloud.compress.config import (
        CompressConfig,
        DistillSettings,
        GateThresholds,
        StudentSpec,
    )
    from edgefed.cloud.compress.pipeline import compress as run_compress

    _settings()
    try:
        student = StudentSpec(
            layers=tuple(int(x) for x in layers.split(",")) if layers else None, depth=depth
        )
        gate = None
        if gate_min or gate_max:
            gate = GateThresholds(
                minimums=_parse_gate(gate_min or [], "--min"),
                maximums=_parse_gate(gate_max or [], "--max"),
            )
        config = CompressConfig(
            teacher_dir=teacher,
            task=task,
            targets=tuple(target or ["x86-avx2"]),
            out_dir=out_dir,
            name=name,
            version=version,
            data=data,
            max_examples=max_examples,
            student=student,
            distill=DistillSettings(
                enabled=distill,
                max_steps=max_steps,
                time_budget_s=time_budget,
                batch_size=batch_size,
                max_length=max_length,
                seed=seed,
            ),
            gate=gate,
            signing_key=signing_key,
        )
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        detail = (
            "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in exc.errors()
            )
            if isinstance(exc, ValidationError)
            else str(exc)
        )
        raise ConfigError(f"invalid compress options: {detail}") from None
    with cli_view.Progress(out) as view:
        result = run_compress(config, on_step=view.step, on_distill=view.distill)
    cli_view.print_report(out, result)
    if not result.all_published:
        raise typer.Exit(65)


# --------------------------------------------------------------------------- edge agent


def _labels(entries: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise ConfigError(f"--label {entry!r}: use KEY=VALUE, e.g. site=plant-3")
        out[key] = value
    return out


@edge_app.command("join")
def edge_join(
    controller: Annotated[str, typer.Option(help="Controller URL, e.g. https://ctl:8443.")],
    token: Annotated[str, typer.Option(help="Single-use join token from the controller.")],
    state_dir: StateDirOption = None,
    label: Annotated[
        list[str] | None, typer.Option(help="Label KEY=VALUE (repeatable), e.g. site=plant-3.")
    ] = None,
    device_profile: Annotated[
        str | None, typer.Option(help="Device profile, e.g. jetson-orin-nano.")
    ] = None,
) -> None:
    """Enrol this device with the controller and write the agent's configuration."""
    from edgefed.edge.join import join

    _settings()
    config = join(
        controller,
        token,
        state_dir or _default_state_dir(),
        labels=_labels(label or []),
        device_profile=device_profile,
    )
    out.print(
        f"[green]joined[/green] fleet {config.fleet} as {config.agent_id}; "
        f"config in {config.state_dir / 'agent.json'}"
    )
    out.print("  start it with: edgefed edge run" + _state_dir_hint(state_dir))


def _state_dir_hint(state_dir: Path | None) -> str:
    return f" --state-dir {state_dir}" if state_dir else ""


@edge_app.command("run")
def edge_run(state_dir: StateDirOption = None) -> None:
    """Run the agent until SIGINT/SIGTERM."""
    from edgefed.edge.agent import run_agent
    from edgefed.edge.config import AgentConfig

    settings = _settings()
    config = AgentConfig.load(state_dir or _default_state_dir())
    asyncio.run(run_agent(config, settings))


@edge_app.command("install-service")
def edge_install_service(
    state_dir: StateDirOption = None,
    user: Annotated[str | None, typer.Option(help="Run the agent as this user.")] = None,
    output: Annotated[Path, typer.Option(help="Where to write the unit.")] = Path(
        "/etc/systemd/system/edgefed-agent.service"
    ),
) -> None:
    """Write a systemd unit that runs `edgefed edge run` and restarts it."""
    from edgefed.edge.config import AgentConfig
    from edgefed.edge.service import render_unit, write_unit

    directory = (state_dir or _default_state_dir()).resolve()
    config = AgentConfig.load(directory)
    path = write_unit(render_unit(agent_id=config.agent_id, state_dir=directory, user=user), output)
    out.print(
        f"wrote {path}; enable it with: systemctl daemon-reload && "
        f"systemctl enable --now {path.stem}"
    )


# --------------------------------------------------------------------------- artifacts


@artifact_app.command("keygen")
def artifact_keygen(
    key_file: Annotated[Path, typer.Argument(help="Private key file to write (mode 0600).")],
    public_file: Annotated[
        Path | None, typer.Option(help="Public key file; default KEY_FILE with .pub.")
    ] = None,
    overwrite: bool = False,
) -> None:
    """Create an Ed25519 signing key pair."""
    from edgefed.common.artifact import generate_signing_key

    key = generate_signing_key()
    key.save(key_file, overwrite=overwrite)
    pub = public_file or key_file.with_suffix(".pub")
    key.verify_key.save(pub, overwrite=overwrite)
    out.print(f"signing key {key_file} (key id {key.key_id}); public key {pub}")


@artifact_app.command("sign")
def artifact_sign(
    directory: Annotated[Path, typer.Argument(help="Artifact folder with the model files.")],
    key: Annotated[Path, typer.Option(help="Private signing key.")],
    name: Annotated[str, typer.Option(help="Model name.")],
    version: Annotated[int, typer.Option(min=1, help="Version; must only go up.")],
    task: Annotated[str, typer.Option(help="feature-extraction, text-classification, ...")],
    target: Annotated[str, typer.Option(help="Device target profile.")] = "cpu",
) -> None:
    """Write manifest.json and manifest.sig for a folder of model files."""
    from edgefed.common.artifact import load_signing_key, write_artifact

    signing_key = load_signing_key(key)
    manifest = write_artifact(
        directory,
        name=name,
        version=version,
        task=task,  # type: ignore[arg-type]  # validated by the manifest model
        target=target,
        signing_key=signing_key,
    )
    out.print(
        f"signed {manifest.name} v{manifest.version}: {len(manifest.files)} files, "
        f"{manifest.total_size} bytes, key id {signing_key.key_id}"
    )


@artifact_app.command("verify")
def artifact_verify(
    directory: Annotated[Path, typer.Argument(help="Artifact folder.")],
    trust: Annotated[list[Path], typer.Option(help="Trusted public key (repeatable).")],
    min_version: Annotated[int, typer.Option(help="Lowest acceptable version.")] = 0,
) -> None:
    """Verify an artifact: signature, trusted key, version, files, hashes, sizes, paths."""
    from edgefed.common.artifact import load_verify_key, verify

    settings = _settings()
    keys = [load_verify_key(p) for p in trust]
    try:
        manifest = verify(directory, keys, min_version=min_version, limits=settings.artifact)
    except ArtifactRejected as exc:
        err.print(f"[red]rejected[/red] ({exc.reason}): {exc.detail}")
        raise typer.Exit(exc.exit_code) from None
    out.print(f"[green]ok[/green] {manifest.name} v{manifest.version} ({manifest.task})")


@cloud_app.command("serve")
def cloud_serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port (0: a free one).")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Registry, artifact store, signing key, admin token.")
    ] = None,
) -> None:
    """Run the controller: control API, fleet monitor, rollouts and compression jobs."""
    from edgefed.cloud.serve import Running, run_forever

    settings = _cloud_settings()
    updates = {
        k: v for k, v in {"host": host, "port": port, "data_dir": data_dir}.items() if v is not None
    }
    if updates:
        controller = settings.controller.model_validate(
            {**settings.controller.model_dump(), **updates}
        )
        settings = settings.model_copy(update={"controller": controller})

    def ready(running: Running) -> None:
        ctl = running.settings.controller
        out.print(f"[green]controller serving[/green] at [bold]{running.url}[/bold]")
        out.print(f"  fleet {running.settings.fleet}, broker {running.settings.broker_url}")
        out.print(f"  data in {ctl.data_dir}; API docs at {running.url}/docs")
        admin = running.state.admin_token_file
        if admin.exists():
            out.print(f"  first admin token in {admin} (create your own, then revoke it)")

    run_forever(settings, on_ready=ready)


@cloud_app.command("worker")
def cloud_worker(
    model: Annotated[
        list[str] | None, typer.Option(help="NAME or NAME@VERSION to serve (repeatable).")
    ] = None,
    pool: Annotated[str | None, typer.Option(help="The pool whose requests it takes.")] = None,
    store: Annotated[Path | None, typer.Option(help="The controller's artifact store.")] = None,
) -> None:
    """Serve models from the artifact store to a pool's requests (MQTT shared subscription)."""
    from edgefed.cloud.worker.pool import WorkerState, run_worker

    settings = _cloud_settings()
    updates: dict[str, Any] = {}
    if model:
        updates["models"] = model
    if pool:
        updates["pool"] = pool
    if store:
        updates["artifact_store"] = store
    if updates:
        worker = settings.worker.model_validate({**settings.worker.model_dump(), **updates})
        settings = settings.model_copy(update={"worker": worker})

    async def main() -> WorkerState:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        state = WorkerState(worker_id="", pool=settings.worker.pool)
        task = asyncio.create_task(run_worker(settings, stop=stop, state=state))
        ready = asyncio.create_task(state.ready.wait())
        await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
        if state.ready.is_set():
            served = ", ".join(f"{m.name} v{m.version}" for m in state.models)
            out.print(f"[green]worker {state.worker_id}[/green] serving {served}")
        ready.cancel()
        return await task

    state = asyncio.run(main())
    out.print(f"worker stopped after {state.served} requests")


@cloud_app.command("join-token")
def cloud_join_token(
    controller: Annotated[
        str | None, typer.Option(help="Controller URL (default: this machine's settings).")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="EDGEFED_TOKEN",
            help="An operator or admin API token (default: the controller's admin.token).",
        ),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option(help="Label KEY=VALUE every agent joining with it gets.")
    ] = None,
    expires_in: Annotated[int, typer.Option(min=60, help="Lifetime in seconds.")] = 86_400,
) -> None:
    """Create a single-use join token for `edgefed edge join`."""
    import httpx

    settings = _cloud_settings()
    ctl = settings.controller
    base = (controller or ctl.resolved_public_url).rstrip("/")
    if token is None:
        admin_file = ctl.data_dir / "admin.token"
        if not admin_file.is_file():
            raise ConfigError(f"no --token given and no {admin_file}: pass an operator token")
        token = admin_file.read_text().strip()
    try:
        response = httpx.post(
            f"{base}/api/v1/join-tokens",
            json={"labels": _labels(label or []), "expires_in_s": expires_in},
            headers={"Authorization": f"Bearer {token}"},
            timeout=15.0,
        )
    except httpx.HTTPError as exc:
        raise EdgefedError(f"cannot reach the controller at {base}: {exc}") from exc
    if response.status_code != 201:
        raise EdgefedError(f"the controller answered {response.status_code}: {response.text}")
    body = response.json()
    out.print(body["token"])
    err.print(
        f"single-use join token #{body['id']}, expires {body['expires_at']}; on the device: "
        f"edgefed edge join --controller {base} --token <token>"
    )


@split_app.command("plan")
def split_plan(
    model_dir: Annotated[Path, typer.Argument(help="A Hugging Face model directory.")],
    device: Annotated[str, typer.Option(help="Edge device profile, e.g. jetson-nano.")],
    rtt_ms: Annotated[float, typer.Option("--rtt-ms", help="Link round trip (ms).")],
    bandwidth_mbps: Annotated[
        float, typer.Option("--bandwidth-mbps", help="Link bandwidth (Mbit/s).")
    ],
    cloud: Annotated[str, typer.Option(help="Cloud device profile.")] = "cloud-cpu",
    seq: Annotated[int, typer.Option(min=1, help="Tokens per request.")] = 128,
    keep_raw_input_on_device: Annotated[
        bool, typer.Option(help="Raw input never leaves the device (no all-cloud).")
    ] = False,
    dtype: Annotated[str, typer.Option(help="Activation wire format: fp32, fp16, int8.")] = "fp16",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Profile MODEL_DIR on this host and choose all-edge, all-cloud or a split point for a
    device and a link (every option's estimate is printed, the choice marked)."""
    from edgefed.cloud.split.plan import plan_for

    _settings()
    if dtype not in ("fp32", "fp16", "int8"):
        raise ConfigError(f"--dtype must be fp32, fp16 or int8 (got {dtype!r})")
    with err.status("profiling the model on this host..."):
        plan = plan_for(
            model_dir,
            device,
            rtt_ms,
            bandwidth_mbps,
            cloud_name=cloud,
            seq=seq,
            keep_raw_input_on_device=keep_raw_input_on_device,
            dtype=dtype,  # type: ignore[arg-type]
        )
    if as_json:
        out.print_json(plan.model_dump_json())
        return
    out.print(plan.table(), highlight=False, markup=False)


@split_app.command("publish")
def split_publish(
    model_dir: Annotated[Path, typer.Argument(help="The Hugging Face model directory to split.")],
    name: Annotated[str, typer.Option(help="The model's name in the registry.")],
    version: Annotated[
        int, typer.Option(min=1, help="The model version the pairs belong to (as deployed).")
    ],
    split_points: Annotated[
        str, typer.Option("--split-points", help="Layers kept on the edge, e.g. 2,4.")
    ],
    target: Annotated[
        str, typer.Option(help="Device target of the heads (and tails), e.g. x86-avx2.")
    ] = "x86-avx2",
    seq: Annotated[int, typer.Option(min=1, help="Tokens per request to profile at.")] = 128,
) -> None:
    """Export head and tail at each split point, sign them with the controller's key into its
    artifact store, register them as NAME.kK.head / NAME.kK.tail vVERSION, and store the
    model's reference profile where the controller's split placement finds it."""
    from edgefed.cloud.api.app import open_controller
    from edgefed.cloud.registry.db import session_scope
    from edgefed.cloud.split.publish import parse_split_points, publish_split

    settings = _cloud_settings()
    points = parse_split_points(split_points)
    state = open_controller(settings)
    try:
        with (
            err.status("profiling, exporting and signing..."),
            session_scope(state.write_sessions) as session,
        ):
            done = publish_split(
                model_dir,
                store=state.artifact_store,
                session=session,
                name=name,
                version=version,
                split_points=points,
                target=target,
                signing_key=state.signing_key,
                seq=seq,
            )
    finally:
        state.engine.dispose()
    table = Table("k", "head", "tail")
    for k, arts in done.artifacts.items():
        table.add_row(str(k), str(arts.head_dir), str(arts.tail_dir))
    out.print(table)
    out.print(f"profile: {done.profile_file}")


def main() -> None:
    """Console entry point: run the app, turning edgefed errors into messages and exit codes."""
    try:
        app()
    except ConfigError as exc:
        err.print(f"[red]configuration error:[/red] {exc.message}")
        sys.exit(exc.exit_code)
    except EdgefedError as exc:
        err.print(f"[red]error:[/red] {exc.message}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
