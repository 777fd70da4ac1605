"""The agent's Flower SuperNode: started when training is enabled, restarted when it dies,
stopped with the agent.

It runs the ``flower-supernode`` executable (from ``edgefed[edge-train]``, next to the agent's
Python) and never imports Flower itself, so the agent stays light when training is off. The
SuperNode connects to the controller's SuperLink, receives the training messages of each run
and starts a ClientApp process for each (``edgefed.edge.training.client_app:app``), which
finds this device's data set through the node config ``data-dir``.

Flower's helpers (``flower-superexec``, the ClientApp processes) start in sessions of their
own and exit when their parent is gone; :meth:`SuperNodeSupervisor.stop` also signals every
descendant it sees, so nothing outlives the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from edgefed.edge.config import TrainingConfig
from edgefed.edge.errors import AgentError

log = logging.getLogger(__name__)

EXECUTABLE = "flower-supernode"


class SuperNodeError(AgentError):
    """The SuperNode cannot be started (not installed, bad settings)."""


def supernode_executable() -> Path:
    candidate = Path(sys.executable).parent / EXECUTABLE
    if candidate.is_file():
        return candidate
    found = shutil.which(EXECUTABLE)
    if found is None:
        raise SuperNodeError(
            f"{EXECUTABLE} is not installed next to {sys.executable} nor on PATH: install "
            "edgefed[edge-train] to take part in federated learning"
        )
    return Path(found)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _node_config_value(text: str) -> str:
    if "'" in text:
        raise SuperNodeError(
            f"training.data_dir {text!r} contains a single quote, which Flower's --node-config "
            "cannot carry; rename the directory"
        )
    return f"'{text}'"


class SuperNodeSupervisor:
    """One ``flower-supernode`` for the agent (see the module's docstring).

    :meth:`start` spawns it; :meth:`run` (an asyncio task, cancelled to stop) starts it, restarts
    it with a doubling backoff whenever it exits, and stops it on the way out."""

    def __init__(
        self,
        config: TrainingConfig,
        state_dir: Path,
        *,
        stop_grace_s: float = 10.0,
        check_s: float = 1.0,
    ) -> None:
        if config.data_dir is None:
            raise SuperNodeError("training is enabled but names no data_dir")
        self.config = config
        self.dir = state_dir / "supernode"
        self.log_file = self.dir / "supernode.log"
        self.stop_grace_s = stop_grace_s
        self.check_s = check_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.runtime_port: int | None = None
        self.restarts = 0
        """Times the SuperNode was started again after it exited."""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def command(self, runtime_port: int) -> list[str]:
        cfg = self.config
        assert cfg.data_dir is not None
        cmd = [
            str(supernode_executable()),
            "--superlink",
            cfg.superlink,
            "--host",
            "127.0.0.1",
            "--port",
            str(runtime_port),
            "--node-config",
            f"data-dir={_node_config_value(str(cfg.data_dir.resolve()))}",
        ]
        if cfg.insecure:
            cmd.append("--insecure")
        elif cfg.root_certificates is not None:
            cmd += ["--root-certificates", str(cfg.root_certificates)]
        if cfg.auth_private_key is not None:
            cmd += ["--auth-supernode-private-key", str(cfg.auth_private_key)]
        return cmd

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = str(Path(sys.executable).parent)
        if bin_dir not in env.get("PATH", "").split(os.pathsep):
            env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env.update(
            {
                "FLWR_HOME": str(self.dir / "flwr-home"),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_TELEMETRY_ENABLED": "0",
                "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            }
        )
        return env

    def start(self) -> None:
        """Spawn the SuperNode (it connects to the SuperLink on its own and keeps retrying)."""
        if self.running:
            return
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.runtime_port = _free_port()
        command = self.command(self.runtime_port)
        with self.log_file.open("ab") as output:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env(),
                cwd=self.dir,
            )
        log.info(
            "Flower SuperNode (pid %d) connecting to %s, data in %s",
            self.proc.pid,
            self.config.superlink,
            self.config.data_dir,
        )

    def stop(self) -> None:
        """SIGTERM the SuperNode and its helpers; SIGKILL what is left after the grace."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            family = []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        for child in family:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        try:
            proc.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            log.warning("the SuperNode ignored SIGTERM; killing it")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        _, alive = psutil.wait_procs(family, timeout=self.stop_grace_s)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        log.info("Flower SuperNode stopped")

    def log_tail(self, lines: int = 10) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    async def run(self) -> None:
        """Until cancelled: keep the SuperNode running; stop it on the way out."""
        delay = 1.0
        started = time.monotonic()
        try:
            await asyncio.to_thread(self.start)
            while True:
                await asyncio.sleep(self.check_s)
                if self.running:
                    if time.monotonic() - started > 60:
                        delay = 1.0  # it ran a while: the next failure starts afresh
                    continue
                code = self.proc.returncode if self.proc is not None else None
                log.warning(
                    "the Flower SuperNode exited (code %s); restarting it in %.0f s: %s",
                    code,
                    delay,
                    self.log_tail(3),
                )
                self.proc = None
                await asyncio.sleep(delay)
                delay = min(self.config.max_restart_backoff_s, delay * 2)
                try:
                    await asyncio.to_thread(self.start)
                    self.restarts += 1
                    started = time.monotonic()
                except (OSError, SuperNodeError) as exc:
                    log.error("restarting the Flower SuperNode failed: %s", exc)
        finally:
            await asyncio.to_thread(self.stop)
