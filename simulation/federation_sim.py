"""Federated rounds in simulation: edgefed's real ServerApp and ClientApp with N virtual
clients, each holding one Dirichlet partition of the chatterbot-corpus task
(:mod:`edgefed.simulation.federation_data`).

Two paths run the same apps:

* :func:`run_engine` -- **Flower's simulation engine**, as a user runs it: a Flower app
  directory (``pyproject.toml`` naming ``edgefed.cloud.federation.server_app:app`` and
  ``edgefed.edge.training.client_app:app``, the run config in ``[tool.flwr.app.config]``), a
  private simulation-mode SuperLink on free loopback ports, and ``flwr run --stream``. The
  SuperLink runs the ServerApp in ``flwr-simulation``, which starts Ray actors for the virtual
  SuperNodes. Costs ~10-20 s of start-up (SuperLink, Ray, torch imports in each actor).
* :func:`run_in_process` -- the ServerApp's ``run_federation`` over a ``LocalGrid`` that
  calls the ClientApp's handlers in this process: no Ray, no sockets, and a ``reply_hook`` to
  tamper with replies (Byzantine clients in tests and the bench). Same strategies, validation
  and progress file; used where many runs are compared.

Both return a :class:`FederationOutcome` read from the ServerApp's ``progress.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import psutil

from edgefed.cloud.federation.flower_app import (
    CLIENT_APP,
    RUN_CONFIG_DEFAULTS,
    SERVER_APP,
    write_app_dir,
)
from edgefed.common.errors import PermanentError, TemporaryError
from edgefed.simulation.federation_data import FederationData

__all__ = [
    "CLIENT_APP",
    "SERVER_APP",
    "FederationOutcome",
    "FederationSimError",
    "RoundFigures",
    "RunConfig",
    "federation_run_config",
    "read_progress",
    "run_engine",
    "run_in_process",
    "sign_flip_train",
    "write_flower_app",
]

if TYPE_CHECKING:
    from flwr.app import Context, Message

    Handler = Callable[[Message, Context], Message]

RunConfig = dict[str, str | int | float | bool]
Path_ = Literal["simulation-engine", "in-process"]

_SUPERLINK_START_S = 60.0


class FederationSimError(PermanentError):
    """A simulated federation could not be set up or did not finish."""


class FederationSimTimeout(TemporaryError):
    """The run did not finish in time (the machine may just be slow)."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RoundFigures:
    """One round as the ServerApp's progress file reports it."""

    round: int
    accepted: int
    rejected: list[dict[str, Any]]
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    seconds: float | None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> RoundFigures:
        def num(key: str) -> float | None:
            value = row.get(key)
            return float(value) if isinstance(value, int | float) else None

        return cls(
            round=int(row["round"]),
            accepted=int(row.get("accepted") or 0),
            rejected=list(row.get("rejected") or []),
            train_loss=num("train_loss"),
            eval_loss=num("eval_loss"),
            eval_accuracy=num("eval_accuracy"),
            seconds=num("seconds"),
        )


@dataclass(frozen=True)
class FederationOutcome:
    """What a simulated run produced."""

    path: Path_
    status: str
    """``succeeded``, ``failed`` or ``running`` (a run cut off before its end)."""
    strategy: str
    num_rounds: int
    rounds: list[RoundFigures]
    error: str | None
    model_dir: Path | None
    wall_s: float
    out_dir: Path
    log_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    initial_accuracy: float | None = None
    """Held-out accuracy of the starting model (round 0)."""

    @property
    def accuracies(self) -> list[float | None]:
        return [r.eval_accuracy for r in self.rounds]

    @property
    def final_accuracy(self) -> float | None:
        return self.rounds[-1].eval_accuracy if self.rounds else None

    def rounds_to(self, target: float) -> int | None:
        """The first round whose held-out accuracy reaches ``target`` (``None``: never)."""
        for r in self.rounds:
            if r.eval_accuracy is not None and r.eval_accuracy >= target:
                return r.round
        return None


def read_progress(path: Path) -> dict[str, Any] | None:
    """The progress file (``None`` while it does not exist or is being replaced)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _outcome(
    path: Path_, out_dir: Path, wall_s: float, log_path: Path | None, notes: list[str]
) -> FederationOutcome:
    progress = read_progress(out_dir / "progress.json")
    if progress is None:
        tail = ""
        if log_path is not None:
            with contextlib.suppress(OSError):
                tail = log_path.read_text(errors="replace")[-3000:]
        raise FederationSimError(
            f"the ServerApp wrote no progress file in {out_dir}"
            + (f"; the end of its log ({log_path}):\n{tail}" if tail else "")
        )
    model_dir = progress.get("model_dir")
    return FederationOutcome(
        path=path,
        status=str(progress.get("status")),
        strategy=str(progress.get("strategy")),
        num_rounds=int(progress.get("num_rounds") or 0),
        rounds=[RoundFigures.of(r) for r in progress.get("rounds") or []],
        error=progress.get("error"),
        model_dir=Path(model_dir) if model_dir else None,
        wall_s=wall_s,
        out_dir=out_dir,
        log_path=log_path,
        notes=notes,
        initial_accuracy=_float_or_none(progress.get("initial_eval_accuracy")),
    )


def _float_or_none(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


# --------------------------------------------------------------------------- run config


def federation_run_config(
    data: FederationData,
    out_dir: Path,
    *,
    strategy: str = "fedavg",
    rounds: int = 3,
    fraction_train: float = 1.0,
    min_train_nodes: int = 2,
    min_valid_updates: int = 1,
    local_steps: int = 10,
    lr: float = 3e-3,
    batch_size: int = 16,
    max_seq_len: int = 32,
    train_mode: str = "full",
    proximal_mu: float | None = None,
    seed: int = 0,
    krum_byzantine: int = 0,
    trimmed_beta: float = 0.2,
    norm_ratio: float = 5.0,
    max_update_norm: float = 0.0,
    extra: Mapping[str, str | int | float | bool] | None = None,
) -> RunConfig:
    """The ServerApp's run config (flat ``key = value``, the contract's keys) for a run over
    ``data``. FedProx gets ``proximal_mu`` 0.1 unless given; other strategies 0 (off)."""
    mu = proximal_mu if proximal_mu is not None else (0.1 if strategy == "fedprox" else 0.0)
    config: RunConfig = {
        "model-dir": str(data.model_dir),
        "out-dir": str(out_dir),
        "num-rounds": rounds,
        "strategy": strategy,
        "fraction-train": fraction_train,
        "min-train-nodes": min_train_nodes,
        "min-valid-updates": min_valid_updates,
        "eval-data": str(data.eval_path),
        "root-data": str(data.root_path),
        "partitions-dir": str(data.partitions_dir),
        "lr": lr,
        "local-steps": local_steps,
        "batch-size": batch_size,
        "max-seq-len": max_seq_len,
        "train-mode": train_mode,
        "top-layers": 1,
        "lora-rank": 4,
        "proximal-mu": mu,
        "seed": seed,
        "max-examples": 0,
        "max-update-norm": max_update_norm,
        "norm-ratio": norm_ratio,
        "max-num-examples": 100_000,
        "dp-noise-multiplier": 0.0,
        "dp-clipping-norm": 0.0,
        "trimmed-beta": trimmed_beta,
        "krum-byzantine": krum_byzantine,
    }
    config.update(extra or {})
    return config


# --------------------------------------------------------------------------- engine path


def write_flower_app(app_dir: Path, run_config: Mapping[str, str | int | float | bool]) -> Path:
    """The controller's generated Flower app directory (edgefed's installed apps as
    components), with ``run_config`` as the run's defaults so ``flwr run`` needs no
    overrides."""
    return write_app_dir(app_dir, defaults={**RUN_CONFIG_DEFAULTS, **run_config})


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _engine_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
        RAY_USAGE_STATS_ENABLED="0",
    )
    return env


def _stop_tree(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM ``proc`` and everything it started (the SuperLink's SuperExec,
    ``flwr-simulation`` and Ray's processes), by PID; SIGKILL what is left after
    ``grace_s``."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    deadline = time.monotonic() + _SUPERLINK_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederationSimError(
                f"flower-superlink exited with status {proc.returncode}; see {log_path}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        time.sleep(0.2)
    raise FederationSimTimeout(
        f"flower-superlink did not answer within {_SUPERLINK_START_S:.0f} s; see {log_path}"
    )


def run_engine(
    run_config: Mapping[str, str | int | float | bool],
    *,
    num_supernodes: int,
    work_dir: Path | None = None,
    actors: int | None = None,
    timeout_s: float = 600.0,
    on_round: Callable[[RoundFigures], None] | None = None,
    stop: threading.Event | None = None,
) -> FederationOutcome:
    """Run the ServerApp and ClientApp in Flower's simulation engine with ``num_supernodes``
        virtual SuperNodes (partition ids ``0..num_supernodes-1``) and wait for the end.

        ``actors``: Ray actors running ClientApps side by side (default: this machine's CPUs, at
        most 4; each holds its own torch). ``on_round`` is called (from this thread) as each round
        appears in the progress file; setting ``stop`` ends the run early (the outcome then says
    ``running``). Everything started is stopped before this returns."""
    if num_supernodes < 1:
        raise FederationSimError(f"num_supernodes must be >= 1 (got {num_supernodes})")
    out_dir = Path(str(run_config["out-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "progress.json").unlink(missing_ok=True)
    own_tmp = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="edgefed-flwr-")) if work_dir is None else work_dir
    work.mkdir(parents=True, exist_ok=True)
    flwr_home = work / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    port = _free_port()
    (flwr_home / "config.toml").write_text(
        '[superlink]\ndefault = "edgefed-sim"\n\n[superlink.edgefed-sim]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n',
        encoding="utf-8",
    )
    app_dir = write_flower_app(work / "app", run_config)
    env = _engine_env(flwr_home)
    n_actors = actors or max(1, min(4, os.cpu_count() or 1))
    superlink_log = work / "superlink.log"
    run_log = work / "flwr-run.log"
    started = time.monotonic()
    superlink: subprocess.Popen[bytes] | None = None
    notes = [f"simulation engine: {num_supernodes} virtual SuperNodes on {n_actors} Ray actor(s)"]
    try:
        with superlink_log.open("ab") as out:
            superlink = subprocess.Popen(
                [
                    "flower-superlink",
                    "--insecure",
                    "--simulation",
                    "--isolation",
                    "subprocess",
                    "--disable-runtime-dependency-installation",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env=env,
                cwd=work,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_healthy(superlink, port, superlink_log)
        federation_config = (
            f"num-supernodes={num_supernodes} client-resources-num-cpus=1 "
            f"init-args-num-cpus={n_actors}"
        )
        with run_log.open("ab") as out:
            run = subprocess.Popen(
                [
                    "flwr",
                    "run",
                    str(app_dir),
                    "edgefed-sim",
                    "--federation-config",
                    federation_config,
                    "--stream",
                ],
                env=env,
                cwd=work,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                _follow(run, out_dir / "progress.json", started + timeout_s, on_round, stop)
            finally:
                if run.poll() is None:
                    _stop_tree(run, grace_s=3)
        if stop is not None and stop.is_set():
            return _outcome(
                "simulation-engine", out_dir, time.monotonic() - started, run_log, notes
            )
        if run.returncode != 0:
            raise FederationSimError(
                f"flwr run exited with status {run.returncode}; see {run_log}:\n"
                + run_log.read_text(errors="replace")[-3000:]
            )
        return _outcome("simulation-engine", out_dir, time.monotonic() - started, run_log, notes)
    finally:
        if superlink is not None:
            _stop_tree(superlink)
        if own_tmp:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def _follow(
    run: subprocess.Popen[bytes],
    progress_path: Path,
    deadline: float,
    on_round: Callable[[RoundFigures], None] | None,
    stop: threading.Event | None = None,
) -> None:
    """Wait for ``flwr run --stream`` to end (it does when the run ends), reporting rounds as
    they land in the progress file."""
    seen = 0
    while True:
        done = run.poll() is not None
        progress = read_progress(progress_path)
        rows = (progress or {}).get("rounds") or []
        if on_round is not None:
            for row in rows[seen:]:
                on_round(RoundFigures.of(row))
        seen = max(seen, len(rows))
        if done or (stop is not None and stop.is_set()):
            return
        status = (progress or {}).get("status")
        if status in ("succeeded", "failed"):
            # The stream ends a moment after the ServerApp; give it that moment.
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.wait(30)
            return
        if time.monotonic() > deadline:
            raise FederationSimTimeout(
                f"the federated run did not finish in time ({len(rows)} round(s) done)"
            )
        time.sleep(0.5)


# --------------------------------------------------------------------------- in-process path


def sign_flip_train(train: Handler, attackers: Collection[int], factor: float = -10.0) -> Handler:
    """``train`` with the replies of the nodes whose partition id is in ``attackers`` replaced
    by a model-poisoning attack: the global weights plus ``factor`` times the honest update
    (``factor`` -10: the sign-flipped update scaled x10). It wraps the handler rather than the
    reply because the attack needs the global weights the message carried. Simulation only:
    the ClientApp has no such knob."""
    from flwr.app import ArrayRecord

    from edgefed.cloud.federation.records import to_record

    attacking = set(attackers)

    def attack(message: Message, context: Context) -> Message:
        reply = train(message, context)
        if int(context.node_config.get("partition-id", -1)) not in attacking:
            return reply
        if reply.has_error():
            return reply
        sent = message.content["arrays"]
        got = reply.content["arrays"]
        assert isinstance(sent, ArrayRecord)
        assert isinstance(got, ArrayRecord)
        poisoned = {}
        for key, local in got.items():
            g = sent[key].numpy()
            poisoned[key] = (g + factor * (local.numpy() - g)).astype(g.dtype)
        reply.content["arrays"] = to_record(poisoned)
        return reply

    return attack


def run_in_process(
    run_config: Mapping[str, str | int | float | bool],
    *,
    num_clients: int,
    byzantine: Collection[int] = (),
    on_round: Callable[[RoundFigures], None] | None = None,
) -> FederationOutcome:
    """Run ``run_federation`` over a ``LocalGrid`` of ``num_clients`` clients in this process
    (partition ids ``0..num_clients-1``), with the ClientApp's own handlers. Clients whose
    partition id is in ``byzantine`` send sign-flipped x10 updates (:func:`sign_flip_train`)."""
    from edgefed.cloud.federation.local_grid import LocalGrid, by_message_type
    from edgefed.cloud.federation.server_app import run_federation
    from edgefed.edge.training.client_app import handle_evaluate, handle_train

    out_dir = Path(str(run_config["out-dir"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "progress.json").unlink(missing_ok=True)
    train: Handler = handle_train
    if byzantine:
        train = sign_flip_train(handle_train, byzantine)
    grid = LocalGrid(
        by_message_type(train=train, evaluate=handle_evaluate),
        num_clients,
        run_config=dict(run_config),
    )
    notes = [f"in-process grid: {num_clients} clients, {len(byzantine)} byzantine"]
    started = time.monotonic()
    error: Exception | None = None
    try:
        run_federation(grid, dict(run_config))
    except Exception as exc:  # noqa: BLE001 - the progress file says failed, with the reason
        error = exc
    outcome = _outcome("in-process", out_dir, time.monotonic() - started, None, notes)
    if error is not None and outcome.status != "failed":
        raise error
    if on_round is not None:
        for r in outcome.rounds:
            on_round(r)
    return outcome
