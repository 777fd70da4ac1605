"""Row 2: the broker (mosquitto, persistent store on) is SIGKILLed under load and started again
on the same port.

Two real agents behind the router, as in row 1. The broker has run long enough to have written
its sessions to its store (a crash of a broker that was just started is not the case here).
Control messages: the controller side publishes a desired state to ``a1`` just before the kill
(acknowledged by the broker) and one to ``a2`` while the broker is down (queued by the client,
sent after the reconnect); each agent must record that generation as applied. Requests: those
in flight at the kill are re-sent by the clients after the reconnect (QoS 1, unacknowledged)
or, when the broker lost them, retried by the router after its attempt timeout with the same
request id. Duplicates are counted on the agents and on the wire as in row 1.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from edgefed.common.errors import EdgefedError
from edgefed.common.routing import RouterConfig
from edgefed.common.schemas import DesiredState

from . import DrillResult
from .agent_fleet import Rig, running_rig, wait_answering
from .request_load import run_load

ROW = 2
INJECT = "SIGKILL the broker (persistence on) mid-load; restart it on the same port"
MUST_HOLD = "control messages and in-flight requests re-issued; none lost"

OUTAGE_S = 2.0
TIMEOUT_S = 30.0
ATTEMPT_TIMEOUT_S = 5.0
"""An attempt the broker lost is retried after this long (a gateway's per-attempt bound)."""
CONCURRENCY = 8
CONTROL_WAIT_S = 30.0


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    n = 2000 if full else 400
    return asyncio.run(_run(workdir, n=n, kill_at=n * 3 // 10))


async def _run(workdir: Path, *, n: int, kill_at: int) -> DrillResult:
    config = RouterConfig(policy="round-robin", attempt_timeout_s=ATTEMPT_TIMEOUT_S)
    async with running_rig(workdir, ("a1", "a2"), router_config=config, persistence=True) as rig:
        return await _drill(rig, n, kill_at)


async def _publish_desired(
    rig: Rig, agent_id: str, generation: int, batch: int, *, timeout: float | None = None
) -> None:
    desired = rig.model.desired().model_copy(update={"max_batch_size": batch})
    state = DesiredState(agent_id=agent_id, generation=generation, models=[desired])
    topic = rig.topics.desired(agent_id)
    await rig.control.publish(topic, state.to_json(), retain=True, timeout=timeout)


async def _applied(rig: Rig, agent_id: str, generation: int) -> bool:
    deadline = time.monotonic() + CONTROL_WAIT_S
    while time.monotonic() < deadline:
        if rig.installed_generation(agent_id) >= generation:
            return True
        await asyncio.sleep(0.1)
    return False


async def _drill(rig: Rig, n: int, kill_at: int) -> DrillResult:
    broker = rig.broker
    for agent_id in rig.agents:  # generation 1 everywhere, before the load
        await _publish_desired(rig, agent_id, 1, 8)
    if not all([await _applied(rig, a, 1) for a in rig.agents]):
        raise AssertionError("the agents did not apply the first desired state")
    saved_after = time.time()
    for _ in range(100):  # the broker has written its sessions (it saves every second)
        db = broker.data_dir / "mosquitto.db"
        if db.exists() and db.stat().st_mtime > saved_after:
            break
        await asyncio.sleep(0.1)

    outage: asyncio.Task[float] | None = None
    control_errors: list[str] = []

    restarted_at = 0.0

    async def crash_and_restart() -> float:
        nonlocal restarted_at
        await _publish_desired(rig, "a1", 2, 4)  # acknowledged, then the broker dies
        broker.kill()
        killed = time.monotonic()
        during = asyncio.create_task(_publish_desired(rig, "a2", 2, 4, timeout=60.0))
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(broker.start)
        restarted_at = time.monotonic()
        try:
            await during
        except EdgefedError as exc:
            control_errors.append(f"a2: {exc}")
        return killed

    def on_sent(i: int) -> None:
        nonlocal outage
        if i == kill_at:
            outage = asyncio.create_task(crash_and_restart())

    load = await run_load(
        rig.router,
        n,
        concurrency=CONCURRENCY,
        timeout_s=TIMEOUT_S,
        prefix="r2",
        on_sent=on_sent,
        extend_while=lambda: outage is None or not outage.done(),  # in flight at the kill
    )
    assert outage is not None
    killed_at = await outage
    control = {a: await _applied(rig, a, 2) for a in rig.agents}
    for agent_id in rig.agents:  # both serve after the restart
        await wait_answering(rig.requester, rig.topics, agent_id)

    await asyncio.sleep(1.0)  # late answers (if any) reach the wiretap
    executed = sum(a.executed_now() for a in rig.agents.values())
    distinct = len(rig.tap.answers)
    answered_twice = rig.tap.twice()
    duplicated = max(answered_twice, executed - distinct)
    reissued = sum(  # sent before the kill, answered after the restart
        1
        for rid, sent in load.sent_at.items()
        if sent < killed_at
        and rid in rig.tap.replies_at
        and rig.tap.replies_at[rid][0] > restarted_at
    )
    control_lost = sum(1 for ok in control.values() if not ok)
    held = not load.lost and not load.failed and control_lost == 0
    return DrillResult(
        row=ROW,
        figures={
            "requests": len(load.ids),
            "answered": len(load.answered),
            "failed": len(load.failed),
            "lost": len(load.lost),
            "duplicated": duplicated,
            "reissued": reissued,
            "retried": load.failed_over,
            "control_lost": f"{control_lost}/{len(control)}",
        },
        held=held,
        notes=[
            f"killed the broker once request {kill_at} was sent and a1's desired state "
            f"acknowledged ({CONCURRENCY} in flight; the load goes on until the broker is "
            f"back), restarted it {OUTAGE_S:g} s later on port {broker.port}; the broker saves its "
            f"store every second; attempt timeout {ATTEMPT_TIMEOUT_S:g} s, deadline "
            f"{TIMEOUT_S:g} s",
            f"answered by: {dict(load.by_target)}; errors: {dict(load.summary_of_errors())}",
            f"executions on the agents {executed} for {distinct} distinct requests (incl. "
            f"probes); answered twice on the wire: {answered_twice}",
            "control: a desired state acknowledged just before the kill (a1) and one "
            f"published during the outage (a2); applied: {control}; {control_errors or ''}",
            "reissued: sent before the kill and answered after the restart (QoS 1 re-sent by "
            "the clients); retried: sent again by the router after an attempt timed out",
            f"late replies dropped by the requester: {rig.requester.late_replies}",
        ],
    )
