"""Faults on a scenario's timeline, and the check that the timeline makes sense.

Each fault is one YAML mapping with ``kind`` and ``at_s`` (seconds from the start of the run)
and the target its kind needs. The harness applies them in time order (ties in file order).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgefed.simulation.scenario_yaml import Problem

FAULT_KINDS = (
    "kill_agent",
    "restart_agent",
    "cut_link",
    "restore_link",
    "slow_agent",
    "restart_broker",
    "kill_controller",
    "restart_controller",
)


class _Fault(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at_s: float = Field(ge=0, allow_inf_nan=False)
    """When the fault happens, in seconds from the start of the run."""


class KillAgent(_Fault):
    """The agent's process dies (SIGKILL: no goodbye, its last will marks it offline)."""

    kind: Literal["kill_agent"]
    agent: str
    signal: Literal["SIGKILL", "SIGTERM"] = "SIGKILL"
    """SIGTERM lets the agent drain and say goodbye; SIGKILL is a crash or power cut."""


class RestartAgent(_Fault):
    """A killed agent starts again (same id, same data directory)."""

    kind: Literal["restart_agent"]
    agent: str


class _LinkFault(_Fault):
    site: str | None = None
    """Every link of this site (its uplink to the cloud)."""
    agent: str | None = None
    """Only this agent's link."""

    @model_validator(mode="after")
    def _one_target(self) -> _LinkFault:
        if (self.site is None) == (self.agent is None):
            raise ValueError("give exactly one of site or agent")
        return self

    @property
    def target(self) -> str:
        return f"site:{self.site}" if self.site is not None else f"agent:{self.agent}"


class CutLink(_LinkFault):
    """The link goes dead: open connections reset, new ones refused until restored."""

    kind: Literal["cut_link"]


class RestoreLink(_LinkFault):
    """A cut link works again."""

    kind: Literal["restore_link"]


class SlowAgent(_Fault):
    """The agent computes ``factor`` times slower than its device profile says (thermal
    throttling, a noisy neighbour); factor 1 ends it."""

    kind: Literal["slow_agent"]
    agent: str
    factor: float = Field(gt=0, le=1000, allow_inf_nan=False)
    duration_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """How long the slowdown lasts (``None``: until the end or a later ``slow_agent``)."""


class RestartBroker(_Fault):
    """The broker stops and starts again on the same port after ``down_s``."""

    kind: Literal["restart_broker"]
    down_s: float = Field(default=0.0, ge=0, le=3600, allow_inf_nan=False)


class KillController(_Fault):
    """The controller dies; agents keep serving what they have."""

    kind: Literal["kill_controller"]


class RestartController(_Fault):
    """A killed controller starts again on the same database."""

    kind: Literal["restart_controller"]


Fault = Annotated[
    KillAgent
    | RestartAgent
    | CutLink
    | RestoreLink
    | SlowAgent
    | RestartBroker
    | KillController
    | RestartController,
    Field(discriminator="kind"),
]


def fault_target(fault: Fault) -> str:
    """A readable name of what a fault hits (``agent:pi-1``, ``site:home``, ``broker``)."""
    if isinstance(fault, CutLink | RestoreLink):
        return fault.target
    if isinstance(fault, KillAgent | RestartAgent | SlowAgent):
        return f"agent:{fault.agent}"
    if isinstance(fault, RestartBroker):
        return "broker"
    return "controller"


def check_faults(
    faults: Sequence[Fault], agents: Iterable[str], sites: Iterable[str], duration_s: float
) -> list[Problem]:
    """Problems of a fault timeline: unknown targets, faults after the end, and steps that
    cannot happen in that order (restarting an agent that runs, restoring a link that works,
    killing what is already dead)."""
    known_agents, known_sites = set(agents), set(sites)
    problems: list[Problem] = []
    for i, fault in enumerate(faults):
        loc: tuple[str | int, ...] = ("faults", i)
        if fault.at_s >= duration_s:
            problems.append(
                Problem((*loc, "at_s"), f"{fault.at_s} s is not before the end ({duration_s} s)")
            )
        agent = getattr(fault, "agent", None)
        if agent is not None and agent not in known_agents:
            problems.append(
                Problem(
                    (*loc, "agent"),
                    f"no agent {agent!r} in the fleet (agents: {_some(known_agents)})",
                )
            )
        site = getattr(fault, "site", None)
        if site is not None and site not in known_sites:
            problems.append(
                Problem(
                    (*loc, "site"),
                    f"no site {site!r} (sites: {', '.join(sorted(known_sites)) or 'none'})",
                )
            )
    if not problems:
        problems.extend(_check_order(faults))
    return problems


def _some(names: set[str], limit: int = 8) -> str:
    shown = sorted(names)[:limit]
    more = f", … ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(shown) + more if shown else "none"


def _check_order(faults: Sequence[Fault]) -> list[Problem]:
    """Walk the timeline in time order and refuse impossible transitions."""
    dead: set[str] = set()
    cut: set[str] = set()
    problems: list[Problem] = []
    order = sorted(range(len(faults)), key=lambda i: (faults[i].at_s, i))
    for i in order:
        fault = faults[i]
        loc: tuple[str | int, ...] = ("faults", i, "kind")
        name = fault_target(fault)
        need_dead, need_alive = _needs(fault)
        if need_alive and name in dead:
            problems.append(Problem(loc, f"{name} is already down at {fault.at_s} s"))
        elif need_dead and name not in dead:
            problems.append(Problem(loc, f"{name} is not down at {fault.at_s} s: kill it first"))
        elif isinstance(fault, CutLink):
            if name in cut:
                problems.append(Problem(loc, f"link {name} is already cut at {fault.at_s} s"))
            cut.add(name)
        elif isinstance(fault, RestoreLink):
            if name not in cut:
                problems.append(
                    Problem(loc, f"link {name} is not cut at {fault.at_s} s: cut it first")
                )
            cut.discard(name)
        if isinstance(fault, KillAgent | KillController):
            dead.add(name)
        elif need_dead:
            dead.discard(name)
    return problems


def _needs(fault: Fault) -> tuple[bool, bool]:
    """(the target must be down before, the target must be up before)."""
    if isinstance(fault, RestartAgent | RestartController):
        return True, False
    if isinstance(fault, KillAgent | KillController):
        return False, True
    return False, False
