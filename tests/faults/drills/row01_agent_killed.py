"""Row 1: an agent is SIGKILLed under load and restarted 5 s later.

Two real agents (``edgefed edge run`` processes, the tiny model installed on disk) behind the
router on a real mosquitto, round robin so that the doomed agent has requests in flight when it
dies. The broker publishes its last will at once (the kernel closes its socket), the router
ejects it and re-sends its requests in flight to the other agent with the same request id.

Duplicates are counted where they would happen, not only at the caller: a wiretap client
records every reply the agents publish (a late second answer is seen even when the caller has
stopped waiting), and each living agent's own ``requests_total`` counter says how many requests
it ran; the killed agent's first life counts the answers it got out before it died.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edgefed.common.routing import Health, RouterConfig

from . import DrillResult, stalled_link
from .agent_fleet import AgentProcess, Rig, running_rig, wait_answering
from .request_load import run_load

ROW = 1
INJECT = (
    "SIGKILL an agent at request 300 of 1,000 (router: it or a second agent); restart after 5 s"
)
MUST_HOLD = (
    "every request answered exactly once (failover + dedup by request id) "
    "or failed with an explicit error"
)

RESTART_AFTER_S = 5.0
TIMEOUT_S = 30.0
"""The requester's default deadline: long enough that requests queued for the dead agent
are still alive when it comes back."""
CONCURRENCY = 8


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    """The kill; with ``full`` also the stalled-link variant (:mod:`.stalled_link`), its figures
    merged as ``stalled_*``."""
    n = 1000
    killed = asyncio.run(_run(workdir / "killed", n=n, kill_at=300 * n // 1000))
    if not full:
        return killed
    stalled = stalled_link.run(workdir / "stalled")
    return DrillResult(
        row=ROW,
        figures={**killed.figures, **{f"stalled_{k}": v for k, v in stalled.figures.items()}},
        held=killed.held and stalled.held,
        notes=[*killed.notes, *(f"stalled link: {note}" for note in stalled.notes)],
    )


async def _run(workdir: Path, *, n: int, kill_at: int) -> DrillResult:
    config = RouterConfig(policy="round-robin")
    async with running_rig(workdir, ("a1", "a2"), router_config=config) as rig:
        return await _drill(rig, rig.agents["a1"], rig.agents["a2"], n, kill_at)


async def _drill(
    rig: Rig, doomed: AgentProcess, other: AgentProcess, n: int, kill_at: int
) -> DrillResult:
    router, requester, topics, tap = rig.router, rig.requester, rig.topics, rig.tap
    killed_at: float | None = None
    life1_answers = 0

    async def restart_later() -> float:
        nonlocal life1_answers
        assert killed_at is not None
        await asyncio.sleep(max(0.0, killed_at + RESTART_AFTER_S - time.monotonic()))
        life1_answers = tap.by_agent[doomed.agent_id]  # all it got out before dying
        doomed.start()
        await wait_answering(requester, topics, doomed.agent_id)
        return time.monotonic()

    recovery: asyncio.Task[float] | None = None

    def on_sent(i: int) -> None:
        nonlocal killed_at, recovery
        if i == kill_at:
            doomed.kill()
            killed_at = time.monotonic()
            recovery = asyncio.create_task(restart_later())

    load = await run_load(
        router, n, concurrency=CONCURRENCY, timeout_s=TIMEOUT_S, prefix="r1", on_sent=on_sent
    )
    assert recovery is not None
    assert killed_at is not None
    recovered_at = await recovery
    recovery_s = recovered_at - killed_at

    # back in rotation: the router re-admits it from its status and sends it requests again
    for _ in range(100):
        if router.state(doomed.agent_id).health is Health.ADMITTED:
            break
        await asyncio.sleep(0.1)
    after = await run_load(router, 20, concurrency=2, timeout_s=TIMEOUT_S, prefix="r1-after")
    readmitted = after.by_target[doomed.agent_id]

    await asyncio.sleep(1.0)  # late answers (if any) reach the wiretap
    executed = life1_answers + doomed.executed_now() + other.executed_now()
    distinct = len(tap.answers)
    load_ids = set(load.ids)
    answered_twice = tap.twice()
    executed_twice = max(0, executed - distinct)
    duplicated = max(answered_twice, executed_twice)
    accounted = len(load.answered) + len(load.failed) + len(load.lost)
    held = (
        not load.lost
        and duplicated == 0
        and accounted == n
        and all(tap.answers[rid] == 1 for rid in load.answered)
        and readmitted > 0
        and not after.failed
        and not after.lost
    )
    return DrillResult(
        row=ROW,
        figures={
            "requests": n,
            "answered": len(load.answered),
            "failed": len(load.failed),
            "lost": len(load.lost),
            "duplicated": duplicated,
            "failed_over": load.failed_over,
            "recovery_s": round(recovery_s, 2),
            "readmitted": f"{readmitted}/20",
        },
        held=held,
        notes=[
            f"killed {doomed.agent_id} as request {kill_at} was sent, {CONCURRENCY} in flight, "
            f"round robin over 2 agents, {TIMEOUT_S:g} s deadline per request",
            f"answered by: {dict(load.by_target)}; errors: {dict(load.summary_of_errors())}",
            f"executions on the agents {executed} for {distinct} distinct requests (incl. "
            f"probes); answered twice on the wire: {answered_twice}; load ids {len(load_ids)}",
            "recovery_s: from the kill until the restarted agent answered a probe "
            f"(restart {RESTART_AFTER_S:g} s after the kill, then start-up)",
            f"late replies dropped by the requester: {requester.late_replies}",
        ],
    )
