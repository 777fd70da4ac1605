"""No process outlives the harness: a harness process starts a fleet (broker, controller, an
agent process, the watchdog) and is then interrupted (Ctrl-C), terminated, or SIGKILLed --
afterwards none of the fleet's processes is left running."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.timeout(300)

HARNESS = Path(__file__).with_name("fleet_harness.py")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_harness(root: Path) -> tuple[subprocess.Popen[str], list[int]]:
    proc = subprocess.Popen(
        [sys.executable, str(HARNESS), str(root)],
        stdout=subprocess.PIPE,
        stderr=(root.parent / "harness.log").open("w"),
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the fleet is up (or the harness died)
    if not line.startswith("PIDS "):
        proc.kill()
        raise AssertionError(
            f"the harness did not start: {(root.parent / 'harness.log').read_text()}"
        )
    return proc, json.loads(line.split(" ", 1)[1])


def wait_all_gone(pids: list[int], timeout_s: float = 30) -> list[int]:
    """The pids still alive once they are all gone or ``timeout_s`` passed (a wait for the
    state, not an assertion on how long cleanup takes)."""
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_no_fleet_process_survives_the_harness(tmp_path: Path, sig: signal.Signals) -> None:
    proc, pids = start_harness(tmp_path / "fleet")
    assert len(pids) == 4
    assert all(alive(p) for p in pids)

    proc.send_signal(sig)
    try:
        proc.wait(150)  # a graceful stop of the whole fleet, on a loaded 2-core machine
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # the harness dumps its threads' stacks to its log
        time.sleep(2)
        proc.kill()
        for pid in pids:
            if alive(pid):
                psutil.Process(pid).kill()
        log = (tmp_path / "harness.log").read_text()
        pytest.fail(f"the harness did not exit 150 s after {sig.name}; its log:\n{log[-12000:]}")

    left = wait_all_gone(pids)
    for pid in left:  # do not leak them into the rest of the suite, then fail
        psutil.Process(pid).kill()
    assert left == [], f"{sig.name} left {left} running"
