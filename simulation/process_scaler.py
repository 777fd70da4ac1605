"""The simulation harness's :class:`~edgefed.cloud.orchestration.scaler.WorkerScaler`: a pool
is a set of ``edgefed cloud worker`` processes on this machine, as a Deployment's pods would be.

``scale(pool, n)`` starts processes (without waiting for them: a starting worker loads and
warms its models first, as a pod would, and only a ready one takes requests) or stops the
newest ones gracefully (SIGTERM: the worker says goodbye on its load topic and finishes what
it holds; SIGKILL after ``grace_s``). ``replicas(pool)`` is the pool's asked-for size: the
processes started and still running (one that crashed no longer counts, so the autoscaler
replaces it). :meth:`ready` counts the processes whose ``/readyz`` answers 200, the replicas
that really serve.

Each process gets a free loopback port for its probes (``EDGEFED_WORKER__METRICS_PORT``), so
several workers on one machine never fight over the default one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from edgefed.common.broker import free_port
from edgefed.simulation.procs import Child, Supervisor

log = logging.getLogger(__name__)

__all__ = ["ProcessWorkerScaler", "WorkerCommand", "WorkerProcess"]

WorkerCommand = Callable[[str, int, int], tuple[list[str], dict[str, str]]]
"""(pool, index, probe port) -> (argv, environment) of one worker process."""


@dataclass(eq=False)
class WorkerProcess:
    """One worker process of a pool and the port of its ``/readyz``."""

    pool: str
    index: int
    child: Child
    port: int

    @property
    def running(self) -> bool:
        return self.child.running


class ProcessWorkerScaler:
    """Starts and stops the worker processes of each pool (see the module doc)."""

    def __init__(
        self,
        supervisor: Supervisor,
        command: WorkerCommand,
        *,
        grace_s: float = 10.0,
        on_change: Callable[[str, str], object] | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.command = command
        self.grace_s = grace_s
        self.on_change = on_change
        """Called with (pool, what happened) after every resize (the fleet records events)."""
        self.processes: dict[str, list[WorkerProcess]] = {}
        self._started: dict[str, int] = {}
        self._stopping: set[asyncio.Task[int | None]] = set()

    def start_one(self, pool: str) -> WorkerProcess:
        """Start one more worker of ``pool`` (it is not ready yet when this returns)."""
        index = self._started.get(pool, 0)
        self._started[pool] = index + 1
        port = free_port()
        argv, env = self.command(pool, index, port)
        child = self.supervisor.child(f"worker-{pool}-{index}", argv, env)
        child.start()
        process = WorkerProcess(pool, index, child, port)
        self.processes.setdefault(pool, []).append(process)
        return process

    def running(self, pool: str) -> list[WorkerProcess]:
        """The pool's processes still running, oldest first (crashed ones are forgotten)."""
        alive = [p for p in self.processes.get(pool, []) if p.running]
        gone = len(self.processes.get(pool, [])) - len(alive)
        if gone:
            log.warning("%d worker process(es) of pool %s exited by themselves", gone, pool)
        self.processes[pool] = alive
        return alive

    async def replicas(self, pool: str) -> int:
        return len(self.running(pool))

    async def scale(self, pool: str, replicas: int) -> None:
        if replicas < 0:
            raise ValueError(f"cannot scale pool {pool} to {replicas} workers")
        alive = self.running(pool)
        before = len(alive)
        if replicas > before:
            for _ in range(replicas - before):
                self.start_one(pool)
        elif replicas < before:
            leaving, self.processes[pool] = alive[replicas:], alive[:replicas]
            for process in reversed(leaving):  # the newest first, as a ReplicaSet picks
                task = asyncio.create_task(
                    process.child.stop(self.grace_s), name=f"stop:{process.child.name}"
                )
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
        else:
            return
        log.info("pool %s: %d -> %d worker processes", pool, before, replicas)
        if self.on_change is not None:
            self.on_change(pool, f"{before} -> {replicas} workers")

    async def ready(self, pool: str) -> int:
        """How many of the pool's processes answer ``/readyz`` with 200 now."""
        alive = self.running(pool)
        if not alive:
            return 0
        async with httpx.AsyncClient(timeout=1.0, trust_env=False) as http:
            answers = await asyncio.gather(
                *(http.get(f"http://127.0.0.1:{p.port}/readyz") for p in alive),
                return_exceptions=True,
            )
        return sum(1 for a in answers if isinstance(a, httpx.Response) and a.status_code == 200)

    async def wait_stopped(self) -> None:
        """Until the processes being stopped have exited (each bounded by ``grace_s``)."""
        if self._stopping:
            await asyncio.gather(*list(self._stopping), return_exceptions=True)
