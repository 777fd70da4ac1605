"""Row 15: an agent whose clock is an hour ahead and one whose clock is an hour behind.

The skew is real: each agent process (``edgefed edge join`` and ``edgefed edge run``) runs
under libfaketime (``LD_PRELOAD`` of the Debian package ``faketime``, ``FAKETIME=+1h`` /
``-1h``), which shifts the wall clock the process reads (``time.time``, SQLite, everything in
the process) and leaves the monotonic clock alone, as NTP trouble on a device would. The
controller and the broker keep the host's clock.

What must hold, each counted as an error when it does not:

* token checks: joining with a join token that expires in two minutes, and downloading the
  artifact with the agent token, both judged on the controller's clock;
* heartbeats: the controller keeps both agents ``online`` over several heartbeats, shows a
  ``last_seen`` on its own clock, and marks a stopped agent ``offline``;
* request expiry: requests whose payload carries an absolute deadline (the controller's clock,
  5 s ahead) are served; requests whose deadline has already passed are refused as expired and
  never run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tests.faults.drills import DrillResult
from tests.faults.drills.edge_stage import AgentRun, EdgeStage, MqttSide, edge_stage, wait_until

ROW = 15
INJECT = "clock skew of +1 h and -1 h on two agents (libfaketime on the agent processes)"
MUST_HOLD = "join and agent tokens, heartbeats (online/offline), request deadlines still correct"

_Error = Callable[[str, str], None]
"""Counts an error of a kind, with a note saying what went wrong."""

SKEWS = {"ahead": "+1h", "behind": "-1h"}
LIBFAKETIME = (
    Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
    Path("/usr/lib/faketime/libfaketime.so.1"),
)


class FaketimeMissing(RuntimeError):
    """libfaketime is not installed (``apt-get install faketime``)."""


def libfaketime() -> Path:
    for path in LIBFAKETIME:
        if path.is_file():
            return path
    raise FaketimeMissing(
        "row 15 skews the agents' clocks with libfaketime, which is not installed: "
        "apt-get install faketime"
    )


def skewed_env(offset: str) -> dict[str, str]:
    """Environment that runs a process with its wall clock shifted by ``offset``."""
    return {
        "LD_PRELOAD": str(libfaketime()),
        "FAKETIME": offset,
        "DONT_FAKE_MONOTONIC": "1",
    }


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    requests = 20 if full else 6
    errors: dict[str, int] = {}
    notes: list[str] = []

    def error(kind: str, detail: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1
        notes.append(f"{kind}: {detail}")

    with edge_stage(workdir) as stage:
        agents: dict[str, AgentRun] = {}
        for name, offset in SKEWS.items():
            try:  # join tokens live two minutes on the controller's clock
                agents[name] = stage.enrol(name, env=skewed_env(offset), join_token_ttl_s=120)
            except RuntimeError as exc:
                error("join", f"{name}: {exc}")
        if len(agents) != len(SKEWS):
            return DrillResult(ROW, {"errors": sum(errors.values())}, held=False, notes=notes)
        try:  # the agents download with their agent token
            version = stage.release_and_deploy()
        except (RuntimeError, AssertionError) as exc:
            error("download", str(exc)[:500])
            return DrillResult(ROW, {"errors": sum(errors.values())}, held=False, notes=notes)
        with MqttSide(stage.broker.url, stage.fleet, "row15-cloud") as cloud:
            for name, agent in agents.items():
                if cloud.serving(agent.agent_id) != version:
                    error("serving", f"{name} does not serve v{version}")
                skew = _skew_seen(stage, agent)
                notes.append(f"{name}: heartbeat ts - controller clock = {skew:+.0f} s")
                if abs(abs(skew) - 3600) > 120:
                    error("no skew", f"{name}'s clock is off by {skew:+.0f} s, not an hour")
            _check_requests(cloud, agents, requests, error)
            _check_presence(stage, agents, error)
    figures: dict[str, int | float | str | bool] = {"errors": sum(errors.values())}
    figures.update({f"errors_{kind}": count for kind, count in errors.items()})
    notes.append(f"{requests} requests with a deadline and {requests} past it per agent")
    return DrillResult(ROW, figures, held=not errors, notes=notes)


def _skew_seen(stage: EdgeStage, agent: AgentRun) -> float:
    """The agent's clock minus the controller's, from the ``ts`` of its latest heartbeat."""

    def beat() -> float | None:
        heartbeat = stage.live(agent.agent_id).get("heartbeat")
        if isinstance(heartbeat, dict) and isinstance(heartbeat.get("ts"), float | int):
            return float(heartbeat["ts"])
        return None

    ts = wait_until(f"a heartbeat of {agent.agent_id}", beat, 30)
    return float(ts) - time.time()


def _check_requests(
    cloud: MqttSide, agents: dict[str, AgentRun], requests: int, error: _Error
) -> None:
    """Deadlines on the controller's clock: 5 s ahead are served, already past are refused."""
    for name, agent in agents.items():
        for _ in range(requests):
            version, outcome = cloud.infer(agent.agent_id, deadline=time.time() + 5, timeout=5)
            if version is None:
                error("deadline refused", f"{name}: a request due in 5 s got {outcome}")
            version, outcome = cloud.infer(agent.agent_id, deadline=time.time() - 1, timeout=5)
            if version is not None:
                error("expired executed", f"{name}: a request past its deadline was served")
            elif "expired" not in outcome.lower() and "deadline" not in outcome.lower():
                error("expired unclear", f"{name}: a request past its deadline got {outcome}")


def _check_presence(stage: EdgeStage, agents: dict[str, AgentRun], error: _Error) -> None:
    """Online over several heartbeats with a last_seen on the controller's clock; a stopped
    agent is offline."""
    until = time.monotonic() + 3.0  # six heartbeats
    while time.monotonic() < until:
        for name, agent in agents.items():
            state = stage.live(agent.agent_id).get("state")
            if state != "online":
                error("presence", f"{name} is {state} on the controller while running")
        time.sleep(0.5)
    fleet = stage.world.ok("GET", "/stats/fleet")
    for entry in fleet["per_agent"]:
        seen = entry.get("last_seen")
        if seen is None:
            error("last seen", f"{entry['id']} has no last_seen")
            continue
        off = (datetime.fromisoformat(seen) - datetime.now(UTC)).total_seconds()
        if abs(off) > 60:
            error("last seen", f"{entry['id']} last seen {off:+.0f} s from now")
    gone = agents["ahead"]
    gone.stop()
    try:
        wait_until(
            "the stopped agent to be offline",
            lambda: stage.live(gone.agent_id).get("state") == "offline",
            30,
        )
    except AssertionError as exc:
        error("presence", str(exc))
