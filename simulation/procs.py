"""The harness's child processes: each in a process group of its own, each stopped for sure.

Three layers make sure no process outlives the harness:

1. every child starts in a new session (its own process group), so stopping it signals the
   whole group -- whatever it started (a controller's compression jobs) goes with it, and the
   terminal's Ctrl-C reaches only the harness, which then stops the children in order;
2. on Linux every child gets ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel signals it when
   the harness dies, even by SIGKILL (the signal follows the *thread* that started the child,
   so children are started from the event loop's thread, which lives as long as the fleet);
3. a watchdog process (:mod:`edgefed.simulation.watchdog`) holds the list of groups and stops
   them (SIGTERM, then SIGKILL after a grace period) when its pipe from the harness closes --
   this also catches grandchildren and processes that ignore SIGTERM, and processes the harness
   did not start itself but owns (the private mosquitto, registered with :meth:`watch`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _death_signal_setup() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks the kernel to SIGTERM the child when its parent dies (Linux);
    None elsewhere. libc is looked up here, in the parent, so the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def setup() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the harness died between fork and prctl
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@dataclass
class Child:
    """One command the harness runs (again after a restart), with its output in ``log_path``."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    supervisor: Supervisor
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        with self.log_path.open("ab") as out:
            out.write(f"\n=== {self.name} start #{self.starts}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_death_signal_setup(),
            )
        self.supervisor.watch(self.proc.pid)
        log.info("started %s (pid %d)", self.name, self.proc.pid)

    async def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM the group, wait up to ``grace_s``, then SIGKILL it; the exit status."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            if not await _wait(proc, grace_s):
                log.warning("%s did not stop within %.0f s: killing it", self.name, grace_s)
        return await self._finish(proc)

    async def kill(self) -> int | None:
        """SIGKILL the group at once (a crash); the exit status."""
        proc = self.proc
        if proc is None:
            return None
        return await self._finish(proc)

    async def _finish(self, proc: subprocess.Popen[bytes]) -> int | None:
        # Killing the group also ends what the child started, even when the child itself is gone.
        _signal_group(proc.pid, signal.SIGKILL)
        await _wait(proc, 10.0)
        self.supervisor.unwatch(proc.pid)
        return proc.returncode

    def stop_now(self) -> None:
        """Synchronous last resort (no event loop): SIGKILL the group."""
        if self.proc is not None:
            _signal_group(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
            self.supervisor.unwatch(self.proc.pid)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


async def _wait(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Poll (without blocking the event loop) until ``proc`` exits; False on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while proc.poll() is None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True


@dataclass
class Supervisor:
    """Starts children and the watchdog that outlives a crashed harness; see the module doc."""

    log_dir: Path
    grace_s: float = 5.0
    children: list[Child] = field(default_factory=list)
    _watchdog: subprocess.Popen[bytes] | None = None
    _pipe: IO[bytes] | None = None

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "edgefed.simulation.watchdog", str(self.grace_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=(self.log_dir / "watchdog.log").open("ab"),
            start_new_session=True,
        )
        self._pipe = self._watchdog.stdin

    @property
    def watchdog_pid(self) -> int | None:
        return self._watchdog.pid if self._watchdog is not None else None

    def _tell(self, line: str) -> None:
        if self._pipe is None:
            return
        try:
            self._pipe.write(line.encode() + b"\n")
            self._pipe.flush()
        except (BrokenPipeError, ValueError):
            log.warning("the watchdog is gone; children are stopped only by the harness")
            self._pipe = None

    def watch(self, pgid: int) -> None:
        """Have the watchdog stop process group ``pgid`` if the harness dies."""
        self._tell(f"+{pgid}")

    def unwatch(self, pgid: int) -> None:
        self._tell(f"-{pgid}")

    def child(self, name: str, argv: list[str], env: Mapping[str, str]) -> Child:
        """A child (not started yet) logging to ``log_dir/NAME.log``."""
        child = Child(name, list(argv), dict(env), self.log_dir / f"{name}.log", self)
        self.children.append(child)
        return child

    async def stop_all(self, grace_s: float = 10.0) -> None:
        """Stop every child at once (SIGTERM, then SIGKILL after ``grace_s``)."""
        await asyncio.gather(*(c.stop(grace_s) for c in self.children if c.proc is not None))

    def close(self) -> None:
        """Stop what is left (synchronously) and let the watchdog exit."""
        for child in self.children:
            if child.running:
                child.stop_now()
        if self._pipe is not None:
            with contextlib.suppress(OSError):
                self._pipe.close()
            self._pipe = None
        if self._watchdog is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._watchdog.wait(self.grace_s + 5)
            self._watchdog = None


def child_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The harness's environment without the user's ``EDGEFED_*`` settings and HTTP proxies
    (the fleet's own settings and proxies are passed explicitly), plus ``extra``."""
    source = os.environ if base is None else base
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    env = {
        k: v for k, v in source.items() if not k.startswith("EDGEFED_") and k.lower() not in proxies
    }
    env.update(extra)
    return env
