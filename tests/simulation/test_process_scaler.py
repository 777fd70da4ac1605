"""The harness's WorkerScaler: real ``edgefed cloud worker`` processes on a real mosquitto.
Scaling up starts processes that become ready (their ``/readyz``), scaling down stops the
newest with SIGTERM (a clean exit), and a crashed process is no longer counted."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from edgefed.cloud.orchestration.scaler import WorkerScaler
from edgefed.common.artifact import SigningKey
from edgefed.common.broker import PrivateBroker
from edgefed.simulation.process_scaler import ProcessWorkerScaler
from edgefed.simulation.procs import Supervisor
from tests.cloud.e2e.world import clean_env
from tests.cloud.worker.test_worker_pool import MODEL, store

__all__ = ["store"]  # the module-scoped fixture of the worker tests: tiny signed artifacts

pytestmark = pytest.mark.timeout(120)


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 45) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s:g} s")
        await asyncio.sleep(0.2)


async def test_processes_start_ready_stop_gracefully_newest_first_and_crashes_do_not_count(
    broker: PrivateBroker, fleet: str, store: tuple[Path, SigningKey], tmp_path: Path
) -> None:
    def command(pool: str, index: int, port: int) -> tuple[list[str], dict[str, str]]:
        argv = [sys.executable, "-m", "edgefed.cli", "cloud", "worker", "--model", MODEL]
        env = clean_env(
            EDGEFED_BROKER_URL=broker.url,
            EDGEFED_FLEET=fleet,
            EDGEFED_CONTROLLER__DATA_DIR=str(store[0].parent),
            EDGEFED_WORKER__POOL=pool,
            EDGEFED_WORKER__INTRA_OP_THREADS="1",
            EDGEFED_WORKER__METRICS_HOST="127.0.0.1",
            EDGEFED_WORKER__METRICS_PORT=str(port),
        )
        return argv, env

    supervisor = Supervisor(tmp_path / "logs", grace_s=5.0)
    supervisor.start()
    changes: list[tuple[str, str]] = []
    scaler = ProcessWorkerScaler(
        supervisor, command, grace_s=15.0, on_change=lambda p, w: changes.append((p, w))
    )
    assert isinstance(scaler, WorkerScaler)
    try:
        await scaler.scale("gpu-a", 2)
        asked = await scaler.replicas("gpu-a")
        await until(lambda: _equals(scaler.ready("gpu-a"), 2), "two workers ready")
        oldest, newest = scaler.processes["gpu-a"]

        await scaler.scale("gpu-a", 1)
        after_down = await scaler.replicas("gpu-a")
        await scaler.wait_stopped()
        ready_after_down = await scaler.ready("gpu-a")

        assert oldest.child.proc is not None
        oldest.child.proc.kill()  # a crash, not a scale-down
        await until(lambda: _equals(scaler.replicas("gpu-a"), 0), "the crash noticed", 10)
    finally:
        await supervisor.stop_all(5.0)
        supervisor.close()
    assert asked == 2
    assert after_down == 1
    assert newest.child.proc is not None
    assert newest.child.proc.returncode == 0  # SIGTERM: the worker stopped cleanly
    assert "worker stopped after" in newest.child.log_tail()
    assert ready_after_down == 1
    assert changes == [("gpu-a", "0 -> 2 workers"), ("gpu-a", "2 -> 1 workers")]


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected
