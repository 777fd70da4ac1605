"""Split placements per agent: re-plan where each model runs from the link an agent measures,
and push a changed plan as a desired-state change.

:class:`PlacementService` is a fleet listener (:class:`~edgefed.cloud.fleet.monitor.FleetMonitor`).
It remembers each agent's device profile (from its status) and its measured uplink (the
``link`` of its heartbeats), and for every model named in ``[controller.split.models]`` that the
agent's desired state runs, feeds a :class:`~edgefed.cloud.split.replan.Replanner` (one per
model version) with them. The planner only considers the split points whose head and tail are
registered for that version (:func:`~edgefed.cloud.split.publish.registered_split_points`) and
plans from the version's published profile (:func:`~edgefed.cloud.split.publish.read_profile`).

When the plan in force differs from the placement the agent's stored desired state carries, one
desired-state change goes out through :class:`~edgefed.cloud.fleet.desired.DesiredStatePublisher`
(registry first, then retained on MQTT): ``placements[model]`` set, and for a split the head
artifact ``<model>.k<k>.head`` (the version the agent runs, for the agent's target) added to the
agent's models, any other head of the model removed. Link figures moving inside the hysteresis
band change nothing, so nothing is published.

Bad input never plans and never loses anything: a heartbeat without link figures (or without a
bandwidth yet), an unknown device profile, a model version without a published profile: the
agent's desired state is left as it is, and the reason is logged once (until it changes).

Database work runs in a worker thread (as the rollout engine's), publishing on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.fleet.desired import (
    DesiredStateError,
    DesiredStatePublisher,
    stored_models,
    stored_placements,
)
from edgefed.cloud.fleet.monitor import LifecycleEvent
from edgefed.cloud.registry.models import Agent, Artifact, Model, ModelVersion
from edgefed.cloud.settings import SplitModelSettings, SplitSettings
from edgefed.cloud.split.errors import SplitError
from edgefed.cloud.split.partition_sign import split_artifact_name
from edgefed.cloud.split.plan import Link, Plan
from edgefed.cloud.split.profile import ModelProfile
from edgefed.cloud.split.publish import read_profile, registered_split_points
from edgefed.cloud.split.replan import Replanner
from edgefed.common.devices import DeviceProfile, UnknownDeviceProfile, load_profile
from edgefed.common.schemas import (
    AgentState,
    AgentStatus,
    DesiredModel,
    DesiredState,
    Heartbeat,
    LinkFigures,
    Placement,
)

log = logging.getLogger(__name__)

__all__ = ["PlacementService", "PlannedPlacement", "same_decision"]


@dataclass(frozen=True, slots=True)
class PlannedPlacement:
    """The plan in force for one model on one agent, with the figures it was made for."""

    model: str
    version: int
    placement: Placement
    device_profile: str
    rtt_ms: float
    bandwidth_mbps: float
    expected_ms: float
    planned_at: datetime


def same_decision(a: Placement | None, b: Placement | None) -> bool:
    """Whether two placements send requests the same way (figures and reasons aside)."""
    if a is None or b is None:
        return a is b
    return (a.mode, a.split_point, a.pool, a.keep_raw_input_on_device) == (
        b.mode,
        b.split_point,
        b.pool,
        b.keep_raw_input_on_device,
    )


def _placement(plan: Plan, settings: SplitModelSettings) -> Placement:
    link = plan.link
    return Placement(
        mode=plan.choice.placement,
        split_point=plan.split_point,
        pool=settings.pool,
        expected_ms=round(plan.choice.total_ms, 3),
        keep_raw_input_on_device=settings.keep_raw_input_on_device,
        reason=(
            f"{plan.choice.label} estimated {plan.choice.total_ms:.1f} ms on {plan.edge.name} "
            f"at RTT {link.rtt_ms:.1f} ms, {link.bandwidth_mbps:.1f} Mbit/s"
        ),
    )


def _describe(placement: Placement | None) -> str:
    if placement is None:
        return "none"
    if placement.mode == "split":
        return f"split k={placement.split_point}"
    return {"edge": "all-edge", "cloud": "all-cloud"}[placement.mode]


@dataclass
class _Agent:
    device_profile: str | None = None
    link: LinkFigures | None = None
    seq: int | None = None
    """Sequence number of the heartbeat ``link`` came with."""
    online: bool = True


@dataclass
class _Changes:
    models: list[DesiredModel] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    placements: dict[str, Placement | None] = field(default_factory=dict)
    planned: dict[str, PlannedPlacement] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.models or self.remove or self.placements)


class PlacementService:
    """Keeps every agent's split placements in line with its measured link (see module doc).

    ``sessions`` writes the registry; ``publisher`` is the controller's desired-state publisher
    (shared with the rollout engine); ``store`` the artifact store. Register it with
    ``monitor.add_listener`` and run :meth:`run` as a task."""

    def __init__(
        self,
        settings: SplitSettings,
        sessions: sessionmaker[Session],
        publisher: DesiredStatePublisher,
        *,
        store: Path,
    ) -> None:
        self.settings = settings
        self._sessions = sessions
        self._publisher = publisher
        self._store = store
        self._cloud: DeviceProfile = load_profile(settings.cloud_profile)
        self._agents: dict[str, _Agent] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._replanners: dict[tuple[str, int], Replanner] = {}
        self._profiles: dict[tuple[str, int], ModelProfile] = {}
        self._noted: dict[Hashable, str] = {}
        self._planned: dict[str, dict[str, PlannedPlacement]] = {}
        self._evaluated: dict[str, int | None] = {}
        self.evaluations = 0
        """Agents evaluated so far (for tests and metrics)."""

    # ------------------------------------------------------------------ FleetListener

    def on_lifecycle(self, event: LifecycleEvent) -> None:
        """A model was loaded or unloaded: the agent's models may have changed."""
        self._mark(event.agent_id)

    def on_heartbeat(self, agent_id: str, heartbeat: Heartbeat) -> None:
        entry = self._agents.setdefault(agent_id, _Agent())
        entry.link = heartbeat.link
        entry.seq = heartbeat.seq
        self._mark(agent_id)

    def on_status(self, agent_id: str, status: AgentStatus) -> None:
        entry = self._agents.setdefault(agent_id, _Agent())
        entry.device_profile = status.device_profile
        entry.online = status.state != AgentState.OFFLINE
        self._mark(agent_id)

    def _mark(self, agent_id: str) -> None:
        self._dirty.add(agent_id)
        self._wake.set()

    # ------------------------------------------------------------------ reading

    def planned(self, agent_id: str | None = None) -> dict[str, dict[str, PlannedPlacement]]:
        """The plans in force, by agent and model (those this controller made or confirmed
        since it started), for one agent or all."""
        planned = self._planned
        if agent_id is not None:
            return {agent_id: dict(planned.get(agent_id, {}))}
        return {a: dict(p) for a, p in planned.items()}

    def evaluated_seq(self, agent_id: str) -> int | None:
        """Sequence number of the agent's heartbeat that its latest finished evaluation used
        (``None``: not evaluated yet, or evaluated before any heartbeat)."""
        return self._evaluated.get(agent_id)

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Until cancelled: evaluate the agents that reported something new, one at a time."""
        await self._publisher.start()
        log.info(
            "split placement running for %s (cloud profile %s)",
            ", ".join(sorted(self.settings.models)),
            self._cloud.name,
        )
        while True:
            await self._wake.wait()
            self._wake.clear()
            due, self._dirty = self._dirty, set()
            for agent_id in sorted(due):
                try:
                    await self.evaluate(agent_id)
                except Exception:  # one agent's trouble must not stop the others' placements
                    log.exception("agent %s: split placement failed", agent_id)

    async def evaluate(self, agent_id: str) -> DesiredState | None:
        """Plan the agent's models from what it reported last; publish and return the new
        desired state when the plan in force changed, else ``None``."""
        entry = self._agents.get(agent_id)
        seq = entry.seq if entry is not None else None
        state = await asyncio.to_thread(self._record, agent_id)
        if state is not None:
            await self._publisher.send(state)
        self.evaluations += 1
        self._evaluated[agent_id] = seq
        return state

    # ------------------------------------------------------------------ planning (worker thread)

    def _note(self, key: Hashable, message: str) -> None:
        """Log a reason for not planning once, until it changes."""
        if self._noted.get(key) != message:
            self._noted[key] = message
            log.warning("%s", message)

    def _clear(self, key: Hashable) -> None:
        self._noted.pop(key, None)

    def _edge(self, agent_id: str) -> tuple[DeviceProfile, Link] | None:
        entry = self._agents.get(agent_id)
        if entry is None or not entry.online or entry.seq is None:
            return None  # offline, or no heartbeat yet: nothing to plan from, nothing to say
        if entry.device_profile is None:
            self._note(
                (agent_id, "device"), f"agent {agent_id}: reports no device profile; no plan"
            )
            return None
        try:
            edge = load_profile(entry.device_profile)
        except UnknownDeviceProfile as exc:
            self._note((agent_id, "device"), f"agent {agent_id}: {exc.message}; no plan")
            return None
        self._clear((agent_id, "device"))
        figures = entry.link
        if figures is None:
            self._note(
                (agent_id, "link"), f"agent {agent_id}: heartbeat carries no link figures; no plan"
            )
            return None
        if figures.bandwidth_mbps is None:
            self._note(
                (agent_id, "link"),
                f"agent {agent_id}: link bandwidth not measured yet (RTT {figures.rtt_ms:.1f} ms);"
                " no plan",
            )
            return None
        self._clear((agent_id, "link"))
        return edge, Link(rtt_ms=figures.rtt_ms, bandwidth_mbps=figures.bandwidth_mbps)

    def _record(self, agent_id: str) -> DesiredState | None:
        edge_link = self._edge(agent_id)
        if edge_link is None:
            return None
        edge, link = edge_link
        with self._sessions() as session:
            agent = session.get(Agent, agent_id)
            if agent is None or agent.desired_state is None:
                return None
            changes = _Changes()
            for name, settings in self.settings.models.items():
                self._plan_model(session, agent, name, settings, edge, link, changes)
            if not changes:
                session.commit()
                self._remember(agent_id, changes)
                return None
            try:
                state = self._publisher.record(
                    session,
                    agent_id,
                    changes.models,
                    remove=changes.remove,
                    placements=changes.placements,
                )
            except DesiredStateError as exc:
                session.rollback()
                self._note((agent_id, "record"), f"agent {agent_id}: {exc.message}")
                self._forget(agent_id)
                return None
            session.commit()
        self._remember(agent_id, changes)
        return state

    def _remember(self, agent_id: str, changes: _Changes) -> None:
        """Record what is in force now. Copy on write: the API reads :meth:`planned` from
        other threads, and a dict it holds is never changed under it."""
        planned = {**self._planned.get(agent_id, {}), **changes.planned}
        for name, placement in changes.placements.items():
            if placement is None:
                planned.pop(name, None)
        self._planned = {**self._planned, agent_id: planned}

    def _forget(self, agent_id: str) -> None:
        """Plan the agent afresh next time (what was planned could not be recorded)."""
        for replanner in self._replanners.values():
            replanner.forget(agent_id)

    def _plan_model(
        self,
        session: Session,
        agent: Agent,
        name: str,
        settings: SplitModelSettings,
        edge: DeviceProfile,
        link: Link,
        changes: _Changes,
    ) -> None:
        models = stored_models(agent)
        old = stored_placements(agent).get(name)
        entry = next((m for m in models if m.name == name and m.role == "full"), None)
        heads = [m for m in models if m.role == "head" and _is_head_of(m.name, name)]
        if entry is None:  # not deployed (any more): nothing to place
            if old is not None or heads:
                log.info("agent %s: %s is not deployed; its placement is dropped", agent.id, name)
                changes.placements[name] = None
                changes.remove.extend(h.name for h in heads)
            return
        key = (agent.id, name)
        target = _target_of(session, entry)
        if target is None:
            self._note(
                key,
                f"agent {agent.id}: {name} v{entry.version} is not a registered artifact; no plan",
            )
            return
        profile = self._profile(name, entry.version)
        if isinstance(profile, str):
            self._note(key, f"agent {agent.id}: {profile}; no plan for {name}")
            return
        points = registered_split_points(session, name, entry.version, target)
        replanner = self._replanner(name, entry.version, profile, settings)
        try:
            replanner.observe(
                agent.id,
                edge,
                link,
                keep_raw_input_on_device=settings.keep_raw_input_on_device,
                edge_memory_bytes=settings.edge_memory_bytes,
                split_points=points,
            )
        except SplitError as exc:
            self._note(key, f"agent {agent.id}: cannot plan {name} v{entry.version}: {exc}")
            return
        self._clear(key)
        plan = replanner.current(agent.id)
        if plan is None:  # pragma: no cover - observe always leaves a plan
            return
        placement = _placement(plan, settings)
        k = plan.split_point
        wanted = split_artifact_name(name, k, "head") if k is not None else None
        have = next((h for h in heads if h.name == wanted and h.version == entry.version), None)
        if wanted is not None and k is not None and have is None:
            try:
                head = self._publisher.desired_model(session, wanted, entry.version, target)
            except DesiredStateError as exc:
                self._note(key, f"agent {agent.id}: cannot place {name} at k={k}: {exc.message}")
                replanner.forget(agent.id)
                return
            changes.models.append(head.model_copy(update={"role": "head", "split_point": k}))
        changes.remove.extend(h.name for h in heads if h.name != wanted)
        if not same_decision(old, placement):
            changes.placements[name] = placement
            log.info(
                "agent %s: %s re-planned %s -> %s (%.1f ms estimated) on %s, link RTT %.1f ms, "
                "%.1f Mbit/s",
                agent.id,
                name,
                _describe(old),
                _describe(placement),
                plan.choice.total_ms,
                edge.name,
                link.rtt_ms,
                link.bandwidth_mbps,
            )
        changes.planned[name] = PlannedPlacement(
            model=name,
            version=entry.version,
            placement=old if old is not None and same_decision(old, placement) else placement,
            device_profile=edge.name,
            rtt_ms=plan.link.rtt_ms,
            bandwidth_mbps=plan.link.bandwidth_mbps,
            expected_ms=plan.choice.total_ms,
            planned_at=datetime.now(UTC),
        )

    def _profile(self, name: str, version: int) -> ModelProfile | str:
        """The version's published profile (cached), or why there is none."""
        cached = self._profiles.get((name, version))
        if cached is not None:
            return cached
        try:
            profile = read_profile(self._store, name, version)
        except SplitError as exc:
            return str(exc)
        self._profiles[(name, version)] = profile
        return profile

    def _replanner(
        self, name: str, version: int, profile: ModelProfile, settings: SplitModelSettings
    ) -> Replanner:
        replanner = self._replanners.get((name, version))
        if replanner is None:
            replanner = self._replanners[(name, version)] = Replanner(
                profile,
                self._cloud,
                band=settings.band,
                min_gain=settings.min_gain,
                min_gain_ms=settings.min_gain_ms,
                dtype=settings.dtype,
                new_tokens=settings.new_tokens,
            )
        return replanner


def _is_head_of(artifact: str, model: str) -> bool:
    return re.fullmatch(re.escape(model) + r"\.k[0-9]+\.head", artifact) is not None


def _target_of(session: Session, entry: DesiredModel) -> str | None:
    """The target of the registered artifact an agent's desired-state entry names."""
    return session.scalar(
        select(Artifact.target)
        .join(ModelVersion, Artifact.version_id == ModelVersion.id)
        .join(Model, ModelVersion.model_id == Model.id)
        .where(
            Model.name == entry.name,
            ModelVersion.version == entry.version,
            Artifact.manifest_sha256 == entry.manifest_sha256,
        )
    )
