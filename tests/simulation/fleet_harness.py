"""A harness process for the no-orphan tests: starts a small fleet (broker, controller, one
agent process, the watchdog), prints ``PIDS <json list>`` once it is up, then waits to be
signalled or killed. argv = root directory."""

from __future__ import annotations

import asyncio
import faulthandler
import json
import signal
import sys
from pathlib import Path

from edgefed.simulation.fleet import Fleet
from edgefed.simulation.fleet_spec import AgentSpec, FleetSpec


async def main(root: Path) -> None:
    spec = FleetSpec(agents=[AgentSpec(name="solo")])
    async with Fleet(spec, root=root) as fleet:
        print("PIDS", json.dumps(fleet.pids()), flush=True)
        await asyncio.Event().wait()


def as_from_a_shell() -> None:
    """SIGINT and SIGTERM as a shell hands them to a program it starts. An ignored or blocked
    signal survives exec, and the test worker that starts this harness may have had its own
    changed by an earlier test in the same process (a SIGINT run that hung was seen only under
    pytest-xdist): Python then never turns Ctrl-C into KeyboardInterrupt. Say what came in."""
    inherited = signal.getsignal(signal.SIGINT)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    print(f"harness: inherited SIGINT handler {inherited!r}, blocked {blocked}", file=sys.stderr)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    # SIGUSR1 dumps every thread's stack to stderr (the test's harness.log) when a stop hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    as_from_a_shell()
    asyncio.run(main(Path(sys.argv[1])))
