"""Row 8: rollback and freeze attacks on real agents -- versions only go up.

The fleet (three real agents, a real controller) runs through versions v1 .. vN of the model,
each signed with the controller's key and rolled out everywhere, so every agent serves vN and
keeps an older version on disk. Then, with the controller's rights on the broker (this broker
has no ACLs: the attacker here is anyone who can publish desired states, row 6 covers who can),
the drill tries to take the agents back:

* ``older``: a desired state in a *newer* generation naming an older version, exactly the
  entry the controller once published for it (a properly signed artifact the agent verified
  and ran before);
* ``replay``: an old desired state re-published verbatim, retained (the bytes the broker once
  delivered: an older generation naming an older version);
* ``replay-restart``: the old desired state left retained while the agent is down, so that the
  restarted agent receives it first thing;
* ``api``: the controller itself asked (``POST /deployments``) to deploy an older version.

An attempt is *accepted* when the agent reports the older version loaded or answers a request
with it afterwards (``api``: when the controller publishes the older version to any agent).
Each agent attempt must be answered by a ``rejected`` report from the agent. At the end a new,
higher version is rolled out through the controller: every agent must take it (the attacks did
not freeze the fleet -- a false reject).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from edgefed.common.schemas import DesiredState, decode
from tests.faults.drills import DrillResult, Figure
from tests.faults.drills.rollout_fleet import Fleet, running_fleet, wait_until

ROW = 8
INJECT = "an older signed version in a newer desired state; a replayed old desired state"
MUST_HOLD = "refused by every agent (and the controller); versions only go up"

REACT_S = 30.0
"""Deadline for an agent's reaction to one attempt (a report; seconds, loaded machine)."""


def _top_generation(f: Fleet, agent_id: str) -> int:
    return max(r.generation for r in f.watcher.raw if r.agent_id == agent_id)


def _try(
    f: Fleet,
    agent_id: str,
    old: int,
    top: int,
    publish: bytes,
    notes: list[str],
    content_type: str | None = None,
) -> bool:
    """Publish ``publish`` to ``agent_id``; True when the agent took ``old``."""
    since = time.monotonic()
    f.watcher.publish_desired(agent_id, publish, content_type)
    return _verdict(f, agent_id, old, top, since, notes)


def _verdict(f: Fleet, agent_id: str, old: int, top: int, since: float, notes: list[str]) -> bool:
    def reacted() -> bool:
        return bool({"rejected", "loaded", "failed"} & set(f.watcher.steps(agent_id, old, since)))

    wait_until(reacted, REACT_S, f"{agent_id} reports what it did with v{old}")
    steps = f.watcher.steps(agent_id, old, since)
    answered = f.watcher.serving(agent_id)
    detail = next(
        (e.detail for e in f.watcher.lifecycle if e.agent_id == agent_id and e.at >= since), ""
    )
    notes.append(f"{agent_id} v{old}: {'/'.join(steps)}; answers v{answered} ({detail[:90]})")
    return "loaded" in steps or answered != top


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    notes: list[str] = []
    tried: dict[str, int] = {"older": 0, "replay": 0, "replay-restart": 0, "api": 0}
    accepted: dict[str, int] = dict.fromkeys(tried, 0)
    with running_fleet(workdir) as f:
        w = f.world
        versions = [f.first]
        for _ in range(3 if full else 1):
            versions.append(w.release("good"))
            f.roll_out_everywhere(versions[-1])
        top, older = versions[-1], versions[:-1]
        agents = f.agent_ids

        # older: the controller's own entry for an older version, in a newer generation
        for agent_id in agents:
            for old in older:
                once = next(r for r in f.watcher.raw if r.agent_id == agent_id and r.version == old)
                entry = decode(once.payload, once.content_type, DesiredState).message.models
                state = DesiredState(
                    agent_id=agent_id, generation=_top_generation(f, agent_id) + 1, models=entry
                )
                tried["older"] += 1
                accepted["older"] += _try(f, agent_id, old, top, state.to_json(), notes)

        # replay: old desired states re-published verbatim
        for agent_id in agents:
            for old in older:
                once = next(r for r in f.watcher.raw if r.agent_id == agent_id and r.version == old)
                tried["replay"] += 1
                accepted["replay"] += _try(
                    f, agent_id, old, top, once.payload, notes, once.content_type
                )

        # replay-restart: the old state waits retained for an agent that is down
        for agent in w.agents if full else w.agents[:1]:
            agent_id = agent.config.agent_id
            once = next(
                r for r in f.watcher.raw if r.agent_id == agent_id and r.version == older[0]
            )
            agent.stop()
            since = time.monotonic()
            f.watcher.publish_desired(agent_id, once.payload, once.content_type)
            agent.start()
            tried["replay-restart"] += 1
            accepted["replay-restart"] += _verdict(f, agent_id, older[0], top, since, notes)

        # api: the controller is asked for an older version
        for old in older:
            seen = len(f.watcher.raw)
            dep_id = w.deploy(old, kind="all-at-once", soak_s=0, max_latency_ratio=None)
            dep = w.wait_deployment(dep_id, {"aborted", "completed", "rolled_back"})
            published = [r for r in f.watcher.raw[seen:] if r.version == old]
            tried["api"] += 1
            accepted["api"] += dep["status"] != "aborted" or bool(published)
            notes.append(f"api v{old}: {dep['status']}: {dep['reason']}")

        # false rejects: a new version through the controller still goes everywhere
        newest = w.release("good")
        dep_id = w.deploy(newest, kind="all-at-once", soak_s=0, max_latency_ratio=None)
        dep = w.wait_deployment(dep_id, {"aborted", "completed", "rolled_back"})
        took = {a for a in agents if f.watcher.serving(a, timeout_s=30) == newest}
        false_rejects = len(agents) - len(took)
        if dep["status"] != "completed":
            notes.append(f"v{newest} after the attacks: {dep['status']}: {dep['reason']}")

        went_down = 0
        for agent_id in agents:
            served = [v for a, v, _ in f.watcher.outcomes if a == agent_id and v is not None]
            went_down += sum(1 for a, b in itertools.pairwise(served) if b < a)

    k = sum(tried.values())
    total = sum(accepted.values())
    figures: dict[str, Figure] = {
        "attempts": k,
        "accepted": total,
        "accepted_of_k": f"{total}/{k}",
        "version_went_down": went_down,
        "false_rejects": false_rejects,
    }
    notes.insert(
        0,
        f"agents on v{top} (history {', '.join(f'v{v}' for v in versions)}); attempts per kind "
        + ", ".join(f"{kind} {n} (accepted {accepted[kind]})" for kind, n in tried.items())
        + f"; then v{newest} through the controller: taken by {len(took)}/{len(agents)}",
    )
    held = total == 0 and went_down == 0 and false_rejects == 0
    return DrillResult(ROW, figures, held, notes)
