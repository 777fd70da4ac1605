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


if __name__ == "__main__":
    # SIGUSR1 dumps every thread's stack to stderr (the test's harness.log) when a stop hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    asyncio.run(main(Path(sys.argv[1])))
