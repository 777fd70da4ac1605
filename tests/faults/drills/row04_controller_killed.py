"""Row 4: the controller (a real ``edgefed cloud serve``) is SIGKILLed in the middle of a canary
rollout to three real agents and started again over the same registry.

What must hold: the rollout resumes where it stopped and completes (every agent serves the new
version); the agents answer every request sent to them throughout -- they serve from what they
loaded and never need the controller for a request; nothing is done twice: one deployment in
the registry, one ``desired`` event per agent, and each agent was told the new version in one
generation only and loaded it once (its own lifecycle telemetry).

A steady stream of requests goes round robin to the three agents over MQTT for the whole drill.
The quick run kills the controller once, the moment the canary agent is sent the new version
(it is about to download the artifact from the controller: the hardest moment); the full run
does three rollouts and kills it once at each point: the canary told, soaking, the rest told.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from tests.cloud.e2e.world import MODEL
from tests.faults.drills import DrillResult, Figure
from tests.faults.drills.rollout_fleet import Fleet, Load, running_fleet

ROW = 4
INJECT = "SIGKILL the controller mid-rollout (canary 1 of 3 agents); restart it"
MUST_HOLD = "the rollout resumes and completes; agents keep serving; nothing deployed twice"

ORDER = ("pending", "canary", "soaking", "rolling", "completed")
DOWN_S = 2.0
"""How long the controller stays dead before it is started again."""


def _kill_at(f: Fleet, dep_id: int, version: int, point: str) -> str:
    """SIGKILL the controller at ``point``: ``canary-told`` (the moment the canary agent is
    sent the version: it is about to download it from the controller), ``soaking`` (the
    deployment's status) or ``rest-told`` (the moment the other agents are sent it). Returns
    the deployment's status just before."""
    w = f.world
    deadline = time.monotonic() + 60
    told = {"canary-told": 1, "rest-told": 2}.get(point)
    status = "?"
    while True:
        if told is not None:
            if len({r.agent_id for r in f.watcher.raw if r.version == version}) >= told:
                break
        else:
            status = str(w.deployment(dep_id)["status"])
            if status not in ORDER or ORDER.index(status) >= ORDER.index(point):
                break
        if time.monotonic() > deadline:
            raise AssertionError(f"deployment {dep_id} never reached {point}")
        time.sleep(0.005 if told is not None else 0.02)
    w.controller.kill()
    return point


def _duplicates(f: Fleet, dep: dict[str, Any], version: int) -> dict[str, int]:
    """Everything done twice for ``version``: deployments in the registry, ``desired`` events
    per agent, generations naming it per agent, loads per agent."""
    w = f.world
    same = [
        d for d in w.ok("GET", "/deployments") if d["model"] == MODEL and d["version"] == version
    ]
    events = Counter(e["agent_id"] for e in dep["events"] if e["kind"] == "desired")
    generations = {
        agent: {r.generation for r in f.watcher.raw if r.agent_id == agent and r.version == version}
        for agent in f.agent_ids
    }
    loads = Counter(
        e.agent_id for e in f.watcher.lifecycle if e.version == version and e.step == "loaded"
    )
    return {
        "registry": len(same) - 1,
        "desired_events": sum(max(0, events[a] - 1) for a in f.agent_ids)
        + sum(1 for a in f.agent_ids if events[a] == 0),
        "generations": sum(max(0, len(g) - 1) for g in generations.values()),
        "loads": sum(max(0, loads[a] - 1) for a in f.agent_ids),
    }


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    phases = ("canary-told", "soaking", "rest-told") if full else ("canary-told",)
    notes: list[str] = []
    held = True
    duplicates: Counter[str] = Counter()
    resume: list[float] = []
    sent_while_down = 0
    completed = 0
    with running_fleet(workdir) as f:
        w = f.world
        with Load(f.watcher, f.agent_ids, pause_s=0.05) as load:
            start = time.monotonic()
            for phase in phases:
                version = w.release("good")
                dep_id = w.deploy(
                    version, kind="canary", canary_count=1, soak_s=3, max_latency_ratio=None
                )
                killed_in = _kill_at(f, dep_id, version, phase)
                killed_at = time.monotonic()
                time.sleep(DOWN_S)
                w.controller.start()
                up_at = time.monotonic()
                sent_while_down += load.sent(killed_at, up_at)
                dep = w.wait_deployment(dep_id, {"completed", "rolled_back", "aborted"})
                resume.append(time.monotonic() - up_at)
                completed += dep["status"] == "completed"
                if dep["status"] != "completed":
                    held = False
                    notes.append(
                        f"v{version} killed at {killed_in}: {dep['status']}: {dep['reason']}"
                    )
                    break
                for agent_id in f.agent_ids:
                    f.watcher.serving(agent_id, version)
                dups = _duplicates(f, dep, version)
                duplicates.update(dups)
                notes.append(
                    f"v{version}: killed at {killed_in}, {dep['status']} "
                    f"{resume[-1]:.1f} s after the restart; done twice: {dict(dups)}"
                )
            time.sleep(0.5)  # requests still in flight are answered
        end = time.monotonic()
        failed = load.failed(start, end)
        sent = load.sent(start, end)
    total_duplicates = sum(duplicates.values())
    for outcome in failed[:5]:
        notes.append(f"failed: {outcome.agent_id}: {outcome.outcome}")
    held = held and not failed and total_duplicates == 0 and sent_while_down > 0
    figures: dict[str, Figure] = {
        "kills": len(phases),
        "completed": completed,
        "requests": sent,
        "requests_while_down": sent_while_down,
        "failed_requests": len(failed),
        "duplicate_deployments": total_duplicates,
        "resume_s": round(max(resume), 2),
    }
    notes.append(
        f"{len(phases)} rollout(s) of a canary (1 of 3, soak 3 s), controller killed at "
        f"{', '.join(phases)}, dead {DOWN_S:.0f} s each time (until ready again: "
        "requests_while_down); requests round robin to the 3 agents over MQTT the whole time; "
        "duplicates counted in the registry (deployments, desired events) and at the agents "
        "(generations naming the version, loads reported)"
    )
    return DrillResult(ROW, figures, held, notes)
