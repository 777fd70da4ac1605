"""The harness's watchdog: a tiny process that outlives a crashed harness long enough to stop
the fleet's process groups.

The harness starts it (``python -m edgefed.simulation.watchdog GRACE_S``) in a session of its
own with a pipe on its stdin, and writes one line per change: ``+PGID`` when it starts a child
in its own process group, ``-PGID`` when that child is stopped. When the pipe closes -- the
harness exited, was SIGKILLed, or crashed -- the watchdog sends SIGTERM to every group still
listed, waits up to ``GRACE_S`` seconds, then SIGKILLs what is left, and exits. A harness that
cleans up after itself has removed every group by then, so nothing is signalled twice.

Standard library only: it must start in a few milliseconds and depend on nothing that could
fail to import.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a group we may not signal is not ours
        return False
    return True


def _signal_all(groups: set[int], sig: signal.Signals) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def stop_groups(groups: set[int], grace_s: float) -> None:
    """SIGTERM every group, wait up to ``grace_s`` for them to go, SIGKILL the rest."""
    _signal_all(groups, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        groups = {g for g in groups if _alive(g)}
        if not groups:
            return
        time.sleep(0.05)
    _signal_all(groups, signal.SIGKILL)


def main(argv: list[str]) -> int:
    grace_s = float(argv[1]) if len(argv) > 1 else 5.0
    # The terminal's Ctrl-C goes to the harness, which cleans up itself; the watchdog only acts
    # when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        line = line.strip()
        if len(line) < 2 or line[0] not in "+-" or not line[1:].isdigit():
            continue
        pgid = int(line[1:])
        if pgid <= 1:  # 0 would be the watchdog's own group, 1 is init's
            continue
        if line[0] == "+":
            groups.add(pgid)
        else:
            groups.discard(pgid)
    if groups:
        stop_groups(groups, grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
