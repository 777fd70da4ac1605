"""The Flower SuperLink beside the controller: started, watched, restarted, stopped.

The controller runs ``flower-superlink`` (the executable next to its own Python) as a child in a
process group of its own, with its state database and ``FLWR_HOME`` in the controller's data
directory, so that runs and registered SuperNodes survive a restart. Flower 1.41 serves the
Fleet API (SuperNodes), the Control API (``flwr run/stop/list``) and the Runtime API (its own
ServerApp processes) on one HTTP port.

Flower starts helpers of its own (``flower-superexec``, one ``flwr-serverapp`` per run) in new
sessions that watch their parent's pid and exit when it is gone; :meth:`SuperLinkSupervisor.stop`
also signals every descendant it can see so that nothing outlives a stop.

Runtime dependency installation (``uv sync`` of a Flower app's dependencies from a package
index, which would pull CUDA wheels for torch) is always off:
``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``; the apps run in the controller's own
environment. Flower's update check and telemetry are off too (they dial the internet and stall
each Flower process for seconds where there is none).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from edgefed.cloud.settings import FederationSettings
from edgefed.common.errors import EdgefedError, PermanentError, TemporaryError

log = logging.getLogger(__name__)

CONNECTION = "edgefed"
"""Name of the SuperLink connection in ``FLWR_HOME/config.toml`` that ``flwr`` commands use."""
PORT_FILE = "superlink.port"


class FederationEngineError(EdgefedError):
    """The deployment engine (SuperLink, Flower commands, runs) failed."""


class SuperLinkUnavailable(FederationEngineError, TemporaryError):
    """The SuperLink is not running or does not accept connections (yet)."""


class FlowerCommandError(FederationEngineError, PermanentError):
    """A ``flwr`` command failed; the message carries what Flower said."""


def flower_executable(name: str) -> Path:
    """A Flower executable of this environment (next to ``sys.executable``), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return candidate
    import shutil

    found = shutil.which(name)
    if found is None:
        raise FederationEngineError(
            f"{name} is not installed next to {sys.executable} nor on PATH: install "
            "edgefed with its federation extra (flwr)"
        )
    return Path(found)


def flower_env(flwr_home: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process the controller starts."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        env["PATH"] = bin_dir + (os.pathsep + path if path else "")
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
        }
    )
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def stop_tree(proc: subprocess.Popen[bytes], grace_s: float, what: str) -> None:
    """SIGTERM ``proc`` and every descendant seen now, SIGKILL what is left after the grace."""
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
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", what, proc.pid, grace_s)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class SuperLinkSupervisor:
    """One ``flower-superlink`` for the controller (see the module's docstring).

    :meth:`start` blocks until the SuperLink accepts connections; :meth:`run` (an asyncio task,
    cancelled to stop) restarts it with a doubling backoff whenever it dies; :meth:`stop` ends
    it. ``flwr`` commands reach it through :attr:`env` (``FLWR_HOME`` holds a connection named
    :data:`CONNECTION`)."""

    def __init__(
        self,
        settings: FederationSettings,
        data_dir: Path,
        *,
        stop_grace_s: float = 10.0,
        check_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.dir = data_dir / "federation"
        self.home = self.dir / "flwr-home"
        self.database = self.dir / "superlink.db"
        self.log_file = self.dir / "superlink.log"
        self.stop_grace_s = stop_grace_s
        self.check_s = check_s
        self.port = settings.port
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        """Times the SuperLink was started again after it died."""
        self._stopping = False

    # ------------------------------------------------------------------ facts

    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def address(self) -> str:
        """``host:port`` of the Fleet and Control APIs (what SuperNodes and ``flwr`` dial)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return flower_env(self.home)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    # ------------------------------------------------------------------ start / stop

    def _resolve_port(self) -> int:
        """The configured port, or for 0 the one chosen at the first start (kept in a file so
        that agents and ``flwr`` find it again after a restart)."""
        if self.settings.port:
            return self.settings.port
        port_file = self.dir / PORT_FILE
        if port_file.is_file():
            try:
                return int(port_file.read_text().strip())
            except ValueError:
                log.warning("%s does not hold a port number; choosing a new one", port_file)
        port = free_port(self.host)
        port_file.write_text(f"{port}\n")
        return port

    def _write_connection(self) -> None:
        """``FLWR_HOME/config.toml`` with the connection ``flwr`` commands use."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        lines = [
            "[superlink]",
            f"default = {_toml_string(CONNECTION)}",
            "",
            f"[superlink.{CONNECTION}]",
            f"address = {_toml_string(self.address)}",
        ]
        if self.settings.tls:
            assert self.settings.tls_ca is not None
            lines.append(f"root-certificates = {_toml_string(str(self.settings.tls_ca))}")
        else:
            lines.append("insecure = true")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        s = self.settings
        cmd = [
            str(flower_executable("flower-superlink")),
            "--host",
            s.host,
            "--port",
            str(self.port),
            "--database",
            str(self.database),
            "--disable-runtime-dependency-installation",
        ]
        if s.tls:
            cmd += [
                "--ssl-certfile",
                str(s.tls_cert),
                "--ssl-keyfile",
                str(s.tls_key),
                "--ssl-ca-certfile",
                str(s.tls_ca),
            ]
        else:
            cmd.append("--insecure")
        if s.supernode_auth:
            cmd.append("--enable-supernode-auth")
        return cmd

    def start(self) -> None:
        """Start the SuperLink and wait until it accepts connections (blocking)."""
        if self.running:
            return
        self._stopping = False
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.port = self._resolve_port()
        self._write_connection()
        if accepts(self.host, self.port):
            raise SuperLinkUnavailable(
                f"port {self.port} on {self.host} is already taken: another SuperLink or "
                "program listens there; set controller.federation.port to a free one"
            )
        with self.log_file.open("ab") as output:
            self.proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
                cwd=self.dir,
            )
        deadline = time.monotonic() + self.settings.start_timeout_s
        while not accepts(self.host, self.port):
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise SuperLinkUnavailable(
                    f"flower-superlink exited with code {code} while starting: {self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise SuperLinkUnavailable(
                    f"flower-superlink did not accept connections on {self.address} within "
                    f"{self.settings.start_timeout_s:.0f} s: {self.log_tail()}"
                )
            time.sleep(0.1)
        log.info("Flower SuperLink (pid %d) serving on %s", self.proc.pid, self.address)
        if self.settings.supernode_auth:
            self.register_supernodes()

    def register_supernodes(self) -> None:
        """Register the configured SuperNode public keys (those already known are kept)."""
        for key in self.settings.supernode_public_keys:
            self.register_supernode(key)

    def register_supernode(self, public_key: Path) -> None:
        """Allow the SuperNode holding the private half of ``public_key`` to connect."""
        done = subprocess.run(
            [
                str(flower_executable("flwr")),
                "supernode",
                "register",
                str(public_key),
                CONNECTION,
                "--format",
                "json",
            ],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )
        answer = (done.stdout + done.stderr).strip()
        if done.returncode == 0:
            log.info("SuperNode key %s registered with the SuperLink", public_key)
            return
        if "already" in answer.lower() or "in use" in answer.lower():
            log.info("SuperNode key %s was registered already", public_key)
            return
        raise FlowerCommandError(
            f"registering the SuperNode key {public_key} failed: {_last_lines(answer)}"
        )

    def stop(self) -> None:
        """SIGTERM the SuperLink and its helpers; SIGKILL after the grace period."""
        self._stopping = True
        proc, self.proc = self.proc, None
        if proc is None:
            return
        stop_tree(proc, self.stop_grace_s, "flower-superlink")
        log.info("Flower SuperLink stopped")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_file})"
        return f"last lines of {self.log_file}:\n{_last_lines(text, lines)}"

    # ------------------------------------------------------------------ supervision

    async def run(self) -> None:
        """Until cancelled: keep the SuperLink running (restart with backoff when it dies);
        stop it on the way out."""
        delay = 1.0
        try:
            while True:
                await asyncio.sleep(self.check_s)
                if self._stopping or self.running:
                    if self.running:
                        delay = 1.0
                    continue
                code = self.proc.returncode if self.proc is not None else None
                log.warning(
                    "the Flower SuperLink died (exit code %s); restarting it in %.0f s",
                    code,
                    delay,
                )
                self.proc = None
                await asyncio.sleep(delay)
                try:
                    await asyncio.to_thread(self.start)
                    self.restarts += 1
                except EdgefedError as exc:
                    log.error("restarting the Flower SuperLink failed: %s", exc.message)
                    delay = min(self.settings.restart_backoff_max_s, delay * 2)
        finally:
            await asyncio.to_thread(self.stop)


def _last_lines(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
