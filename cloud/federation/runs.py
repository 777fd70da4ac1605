"""Flower runs on the controller's SuperLink, through Flower's own CLI (``flwr run|stop|list``
with ``--format json``) against the SuperLink's Control API.

A run's settings go in as a TOML run-config file (``<out-dir>/run-config.toml``: no quoting
trouble with paths, and a record of what the run was given); its progress comes back as the
``progress.json`` the ServerApp writes into the run's ``out-dir`` after every round.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefed.cloud.federation.flower_app import RunConfigValue, toml_table
from edgefed.cloud.federation.superlink import (
    CONNECTION,
    FlowerCommandError,
    SuperLinkUnavailable,
    flower_executable,
)

log = logging.getLogger(__name__)

PROGRESS_FILE = "progress.json"
RUN_CONFIG_FILE = "run-config.toml"
FINISHED_PREFIX = "finished"


@dataclass(frozen=True)
class FlowerRun:
    """What the SuperLink says about one run."""

    run_id: int
    status: str
    """``pending``, ``starting``, ``running`` or ``finished:<completed|failed|stopped>``."""
    details: str | None = None

    @property
    def finished(self) -> bool:
        return self.status.startswith(FINISHED_PREFIX)

    @property
    def outcome(self) -> str | None:
        """``completed``, ``failed``, ``stopped`` once finished, else None."""
        return self.status.partition(":")[2] or None if self.finished else None


class FlowerRunner:
    """Starts, stops and looks up runs with ``flwr`` in ``env`` (which names the SuperLink
    through ``FLWR_HOME``; see :class:`~edgefed.cloud.federation.superlink.SuperLinkSupervisor`)."""

    def __init__(
        self, env: Mapping[str, str], *, connection: str = CONNECTION, timeout_s: float = 180.0
    ) -> None:
        self.env = dict(env)
        self.connection = connection
        self.timeout_s = timeout_s

    def _flwr(self, *args: str, cwd: Path | None = None) -> dict[str, Any]:
        command = [str(flower_executable("flwr")), *args, "--format", "json"]
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                env=self.env,
                timeout=self.timeout_s,
                cwd=cwd,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SuperLinkUnavailable(
                f"`flwr {args[0]}` did not answer within {self.timeout_s:.0f} s"
            ) from exc
        answer = _json_tail(done.stdout)
        if done.returncode != 0 or answer is None or answer.get("success") is False:
            said = (answer or {}).get("error-message") or (done.stderr + done.stdout).strip()
            message = f"`flwr {args[0]}` failed (exit code {done.returncode}): {_tail(said)}"
            if _unreachable(said):
                raise SuperLinkUnavailable(message)
            raise FlowerCommandError(message)
        return answer

    def start(
        self, app_dir: Path, run_config: Mapping[str, RunConfigValue], config_file: Path
    ) -> int:
        """Submit a run of the app in ``app_dir`` with ``run_config``; its Flower run id."""
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(toml_table(run_config))
        answer = self._flwr("run", str(app_dir), self.connection, "--run-config", str(config_file))
        run_id = answer.get("run-id")
        if run_id is None:
            raise FlowerCommandError(f"`flwr run` answered without a run id: {answer}")
        return int(run_id)

    def stop(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run (it ends the ServerApp and drops pending messages)."""
        try:
            self._flwr("stop", str(run_id), self.connection)
        except FlowerCommandError as exc:
            if "already finished" not in exc.message.lower():
                raise

    def lookup(self, run_id: int) -> FlowerRun | None:
        """The run as the SuperLink knows it; None when it does not know it (another
        SuperLink database, or it was never submitted)."""
        try:
            answer = self._flwr("list", self.connection, "--run-id", str(run_id))
        except FlowerCommandError as exc:
            if "not found" in exc.message.lower() or "does not exist" in exc.message.lower():
                return None
            raise
        for run in answer.get("runs", []):
            if str(run.get("run-id")) == str(run_id):
                details = run.get("status-details")
                return FlowerRun(
                    run_id=run_id,
                    status=str(run.get("status", "")),
                    details=None if details in (None, "", "N/A") else str(details),
                )
        return None


def read_progress(out_dir: Path) -> dict[str, Any] | None:
    """The run's ``progress.json`` (None while there is none or it cannot be read: the
    ServerApp replaces it atomically, so a bad one means it is not there yet)."""
    try:
        value = json.loads((out_dir / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _json_tail(stdout: str) -> dict[str, Any] | None:
    """The JSON object ``flwr --format json`` prints (after any other lines)."""
    start = stdout.find("{")
    while start != -1:
        try:
            value = json.loads(stdout[start:])
        except ValueError:
            start = stdout.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def _unreachable(said: str) -> bool:
    lowered = said.lower()
    return any(
        sign in lowered
        for sign in ("connection refused", "connecterror", "unavailable", "failed to connect")
    )


def _tail(text: str, limit: int = 800) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else "..." + text[-limit:]
