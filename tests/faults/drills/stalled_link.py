"""Row 1, the other way an agent dies for its router: its uplink goes silent under load (no
TCP reset: the bytes stop), the broker notices after 1.5 keepalives and publishes its last
will, the router sends the agent's requests in flight elsewhere; then the link comes back and
the agent reconnects to its session, where the broker held those requests, unacknowledged, and
re-delivers them. They must not run a second time.

Not a row module of its own (the bench would show two row 1s): :mod:`.row01_agent_killed`
runs it in its full version and merges its figures as ``stalled_*``; its own test runs it
alone. Two real agents behind the router as in :mod:`.row01_agent_killed`; ``a1`` reaches the broker
through the simulation's link proxy, which stalls it (60 s one-way delay) until the router
has seen the will, then resets it and lets the agent reconnect. The agent's MQTT keepalive is
5 s, so the broker notices within about 7.5 s.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edgefed.common.routing import Health, RouterConfig
from edgefed.simulation.linkproxy import LinkProfile

from . import DrillResult
from .agent_fleet import Rig, running_rig, wait_answering
from .request_load import run_load

ROW = 1
INJECT = "an agent's uplink stalls (no reset) at request 200 of 600 until its will; then back"
MUST_HOLD = "none lost; a request failed over is not run again when the broker re-delivers it"

KEEPALIVE_S = 5
TIMEOUT_S = 30.0
CONCURRENCY = 8
STALL = LinkProfile(delay_ms=60_000)


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    n = 600
    return asyncio.run(_run(workdir, n=n, stall_at=n // 3))


async def _run(workdir: Path, *, n: int, stall_at: int) -> DrillResult:
    config = RouterConfig(policy="round-robin")
    env = {"EDGEFED_MQTT__KEEPALIVE_S": str(KEEPALIVE_S)}
    async with running_rig(
        workdir, ("a1", "a2"), router_config=config, proxied=("a1",), agent_env=env
    ) as rig:
        return await _drill(rig, n, stall_at)


async def _drill(rig: Rig, n: int, stall_at: int) -> DrillResult:
    link, a1 = rig.links["a1"], rig.agents["a1"]
    noticed_s: list[float] = []
    restored: list[tuple[float, int]] = []  # when the link came back, a1's executions then

    async def stall_until_will() -> None:
        link.profile = STALL
        started = time.monotonic()
        for _ in range(600):  # the will comes after about 1.5 keepalives
            if rig.router.state("a1").health is Health.OFFLINE:
                break
            await asyncio.sleep(0.05)
        noticed_s.append(time.monotonic() - started)
        restored.append((time.monotonic(), a1.executed_now()))
        link.cut()  # the stalled bytes are dropped with the connection
        link.profile = LinkProfile()
        link.restore()

    stalling: asyncio.Task[None] | None = None

    def on_sent(i: int) -> None:
        nonlocal stalling
        if i == stall_at:
            stalling = asyncio.create_task(stall_until_will())

    load = await run_load(
        rig.router, n, concurrency=CONCURRENCY, timeout_s=TIMEOUT_S, prefix="s1", on_sent=on_sent
    )
    assert stalling is not None
    await stalling
    await wait_answering(rig.requester, rig.topics, "a1")  # reconnected: re-deliveries are in
    await asyncio.sleep(1.0)

    executed = sum(a.executed_now() for a in rig.agents.values())
    distinct = len(rig.tap.answers)
    answered_twice = rig.tap.twice()
    duplicated = max(answered_twice, executed - distinct)
    # a1's executions since its link came back, less those of requests sent since then: the
    # re-delivered requests it ran although the router had sent them elsewhere
    back_at, executed_then = restored[0]
    fresh = sum(
        1
        for at, by, rid in rig.tap.log
        if by == "a1"
        and at > back_at
        and (rid.startswith("probe-") or load.sent_at.get(rid, 0.0) > back_at)
    )
    rerun = a1.executed_now() - executed_then - fresh
    held = not load.lost and rerun == 0 and len(load.answered) + len(load.failed) == n
    return DrillResult(
        row=ROW,
        figures={
            "requests": n,
            "answered": len(load.answered),
            "failed": len(load.failed),
            "lost": len(load.lost),
            "rerun_after_reconnect": rerun,
            "duplicated": duplicated,
            "failed_over": load.failed_over,
            "will_after_s": round(noticed_s[0], 1),
        },
        held=held,
        notes=[
            f"a1's uplink stalled as request {stall_at} was sent; keepalive {KEEPALIVE_S} s; "
            f"{CONCURRENCY} in flight, round robin over 2 agents, {TIMEOUT_S:g} s deadline",
            f"answered by: {dict(load.by_target)}; errors: {dict(load.summary_of_errors())}",
            f"executions on the agents {executed} for {distinct} distinct requests (incl. "
            f"probes); answered twice on the wire: {answered_twice}",
            "rerun_after_reconnect: re-delivered requests a1 ran after its link came back "
            "(must be 0); duplicated also counts requests a1 was already running when its "
            "link went silent, then run again elsewhere: at-least-once, inherent to failover",
        ],
    )
