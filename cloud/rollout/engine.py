"""The rollout engine: drives every deployment through its state machine, persisted in the
registry so that a controller restart resumes where it stopped.

States (``Deployment.status``) and what the engine does in each, once per tick
(``controller.rollout_tick_s``) or at once when kicked::

    pending ──► canary ──► soaking ──► rolling ──► completed
       │          │           │           │
       │          └───────────┴───────────┴──► aborted ──► rolled_back
       └──► aborted (refused: nothing was published)

* **pending** -- checks, before anything reaches an agent: strategy and selector valid; no
  other deployment of the model in progress (this one waits its turn; an identical one is
  refused as a duplicate); the artifact for the target is in the store, verifies with the
  controller's key and meets ``min_quality`` / ``max_quality``; the selector matches enrolled
  agents of the fleet; no selected agent already runs a higher version (versions only go up).
  Then it records each agent's previous version (from its desired state), the previous
  version of the deployment (the highest of them), the agents' latency before, and the canary
  set (online agents first, by id); every agent gets a ``DeploymentAgent`` row.
* **canary** -- the canary set gets the new version in its desired state; the engine waits
  until each canary agent reports it loaded (``model.lifecycle`` telemetry, or the models of
  its status / heartbeat). A ``failed`` or ``rejected`` report fails the gate at once, as do a
  canary agent offline for longer than ``offline_grace_s`` and ``load_timeout_s`` passing --
  but not a failure the agent reports as temporary (a download that failed while the
  controller, which serves the artifacts, was down): the agent retries that by itself.
* **soaking** -- for ``soak_s`` the gates watch the canary agents' heartbeats: error rate
  (non-``ok`` outcomes over all outcomes, from the growth of the cumulative counters since the
  soak began, over all canary agents, judged from ``min_requests`` requests on), median p50
  latency ratio against the same agents before the deployment (judged only once an agent's
  latency window holds nothing but new-version requests), and presence. Canary strategies then
  go on to rolling, all-at-once completes, blue-green waits for confirmation (see
  :mod:`.strategy`).
* **rolling** -- the other agents get the new version; a load failure aborts (and rolls back
  every agent that got it); agents offline for longer than ``offline_grace_s`` do not hold
  the deployment up (their retained desired state reaches them when they return).
* **aborted** -- set by a failed gate or by the API (``POST /deployments/{id}/abort``). The
  engine rolls back every agent that was sent the new version (those whose load failed too,
  so that the whole set is consistent again). Agents refuse versions lower than one they
  activated, so a rollback is a roll-*forward*: the previous version's artifact is copied to a
  new version ``M`` (one above the highest of the model), verified as copied, re-signed with
  the controller's key (``parent_version`` = the previous version, note "rollback of vN to
  the content of vP"), registered, and ``M`` is published to those agents. Agents that did not
  run the model before get it removed from their desired state instead. Then
  ``rolled_back``. An aborted deployment that never reached an agent stays ``aborted``.

Idempotency: every step re-reads the registry, compares each agent's stored desired state
before publishing (a step repeated after a restart publishes nothing twice), and changes a
deployment only while its status is still the one the step read (a conditional UPDATE, so an
abort from the API between two steps is never overwritten). Desired states are committed
before they are published; what the broker missed is republished by
:meth:`DesiredStatePublisher.resync` at start. The engine never creates deployments. Every
transition and decision is a ``RolloutEvent`` row with the figures behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import re
import shutil
import statistics
import threading
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.fleet.desired import (
    DesiredStateError,
    DesiredStatePublisher,
    artifact_path,
    stored_models,
)
from edgefed.cloud.fleet.monitor import FleetMonitor, LifecycleEvent
from edgefed.cloud.registry.models import (
    Agent,
    AgentPhase,
    Artifact,
    Deployment,
    DeploymentAgent,
    DeploymentStatus,
    Model,
    ModelVersion,
    RolloutEvent,
)
from edgefed.cloud.rollout.strategy import RolloutStrategy, Selector, quality_problem
from edgefed.common.artifact import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Manifest,
    SigningKey,
    VerifyKey,
    verify,
    write_artifact,
)
from edgefed.common.errors import ArtifactError, ErrorCode, PermanentError
from edgefed.common.schemas import AgentStatus, DesiredModel, DesiredState, Heartbeat

log = logging.getLogger(__name__)

S = DeploymentStatus
IN_PROGRESS = (S.PENDING, S.CANARY, S.SOAKING, S.ROLLING)
SENT = (AgentPhase.DESIRED, AgentPhase.LOADED, AgentPhase.FAILED)
"""Phases of an agent that was sent the deployment's version."""
_LOADED_STEPS = ("loaded", "restored")
_FAILED_STEPS = ("failed", "rejected")
VERSION_FAULTS = frozenset(
    {
        str(ErrorCode.INTERNAL),
        str(ErrorCode.UNAVAILABLE),
        str(ErrorCode.TIMEOUT),
        str(ErrorCode.OVERLOADED),
    }
)
"""Outcomes the error-rate gate holds against a version: the agent failed the request. Caller
errors (malformed input, a text over the model's length, an expired deadline, an unknown
model) say nothing about the version and never roll it back."""
_VERSION_DIR = re.compile(r"^v([0-9]+)$")


class RolloutError(PermanentError):
    """A rollout step cannot be done (e.g. no verifiable artifact to roll back to)."""


class _Moved(Exception):
    """The deployment's status changed under this step (an abort from the API)."""


@dataclass(frozen=True, slots=True)
class _Failure:
    gate: str
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


def _aware(when: datetime | None) -> datetime | None:
    """SQLite gives back naive datetimes: they are UTC."""
    if when is None or when.tzinfo is not None:
        return when
    return when.replace(tzinfo=UTC)


class RolloutEngine:
    """Implements :class:`edgefed.cloud.services.RolloutService`.

    ``sessions`` makes registry sessions; ``fleet`` is the started :class:`FleetMonitor` of the
    fleet (the engine registers as its listener); ``publisher`` records and publishes desired
    states; ``signing_key`` is the controller's artifact-signing key (it signs rollback
    versions and, with ``trusted_keys``, verifies artifacts before they are deployed).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        fleet: FleetMonitor,
        publisher: DesiredStatePublisher,
        *,
        signing_key: SigningKey,
        trusted_keys: Sequence[VerifyKey] = (),
        tick_s: float = 1.0,
    ) -> None:
        self._sessions = sessions
        self._fleet = fleet
        self._publisher = publisher
        self._signing_key = signing_key
        self._trusted = [signing_key.verify_key, *trusted_keys]
        self._tick_s = tick_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._lifecycle: OrderedDict[tuple[str, str, int], LifecycleEvent] = OrderedDict()
        self._baselines: dict[int, dict[str, dict[str, int]]] = {}
        self._stopping = False
        self._step_status: dict[int, DeploymentStatus] = {}
        """The status each deployment had when its current step read it (for the guard)."""
        fleet.add_listener(self)

    @property
    def store(self) -> Path:
        return self._publisher.store

    # ------------------------------------------------------------------ service

    def kick(self) -> None:
        """Look at the deployments now (callable from any thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._wake.set()
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake.set()
        else:
            loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Until cancelled: republish what the broker missed, then tick.

        The steps run in a worker thread with an event loop of its own, so that the database
        (blocking calls; SQLite's write lock, PostgreSQL's row locks held by an API request
        between its steps on this loop) never stalls the controller's event loop; publishing
        goes back to this loop (the MQTT client lives here). Cancelled, it lets the step under
        way finish (its transaction and publication) and starts no other."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        worker = asyncio.new_event_loop()
        thread = threading.Thread(target=worker.run_forever, name="rollout-engine", daemon=True)
        thread.start()
        try:
            await self._publisher.start()
            await self._resync()
            log.info("rollout engine running (tick %.2f s)", self._tick_s)
            while True:
                try:
                    if self._publisher.needs_resync:
                        await self._resync()
                    await self._in_worker(worker, self.tick())
                except Exception:  # a broken tick must not end rollouts: the next one tries
                    log.exception("rollout tick failed")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._tick_s)
                self._wake.clear()
        finally:
            self._stopping = True
            worker.call_soon_threadsafe(worker.stop)
            await asyncio.to_thread(thread.join, 30)
            if not thread.is_alive():
                worker.close()

    async def _in_worker(
        self, worker: asyncio.AbstractEventLoop, step: Coroutine[Any, Any, None]
    ) -> None:
        done = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(step, worker))
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            self._stopping = True  # finish the step under way, then stop
            with contextlib.suppress(Exception):
                await asyncio.wait({done})
            raise

    async def _publish(self, state: DesiredState) -> None:
        """Publish a recorded desired state through the controller's loop (from any loop)."""
        loop = self._loop
        if loop is None or loop is asyncio.get_running_loop():
            await self._publisher.send(state)
            return
        await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self._publisher.send(state), loop)
        )

    async def _resync(self) -> None:
        with self._sessions() as session:
            done = await self._publisher.resync(session)
        if done:
            log.warning("republished the recorded desired state of %s", ", ".join(done))

    async def tick(self) -> None:
        """Advance every deployment in progress (oldest first) as far as it can go now."""
        with self._sessions() as session:
            work = exists().where(
                DeploymentAgent.deployment_id == Deployment.id, DeploymentAgent.phase.in_(SENT)
            )
            ids = list(
                session.scalars(
                    select(Deployment.id)
                    .where(
                        or_(
                            Deployment.status.in_(IN_PROGRESS),
                            and_(Deployment.status == S.ABORTED, work),
                        )
                    )
                    .order_by(Deployment.id)
                )
            )
        for dep_id in ids:
            if self._stopping:
                return
            await self._advance(dep_id)

    # ------------------------------------------------------------------ FleetListener

    def on_lifecycle(self, event: LifecycleEvent) -> None:
        if event.version is None or event.step not in (*_LOADED_STEPS, *_FAILED_STEPS):
            return
        if event.temporary and event.step in _FAILED_STEPS:
            # The agent retries by itself (e.g. its download failed while this controller, which
            # serves the artifacts, was down): no verdict on the version; load_timeout_s bounds
            # the wait.
            log.info(
                "%s v%d on %s failed for now, the agent retries: %s",
                event.model,
                event.version,
                event.agent_id,
                event.detail,
            )
            return
        key = (event.agent_id, event.model, event.version)
        self._lifecycle[key] = event
        self._lifecycle.move_to_end(key)
        while len(self._lifecycle) > 10_000:
            self._lifecycle.popitem(last=False)
        self.kick()

    def on_heartbeat(self, agent_id: str, heartbeat: Heartbeat) -> None:
        """Heartbeats are read at each tick (gates)."""

    def on_status(self, agent_id: str, status: AgentStatus) -> None:
        self.kick()

    # ------------------------------------------------------------------ the state machine

    async def _advance(self, dep_id: int) -> None:
        for _ in range(8):  # a few transitions per tick at most (pending -> canary -> ...)
            if self._stopping:
                return
            with self._sessions() as session:
                dep = session.get(Deployment, dep_id)
                if dep is None:
                    return
                status = self._step_status[dep_id] = dep.status
                try:
                    moved = await self._step(session, dep)
                except _Moved:
                    session.rollback()
                    log.info("deployment %d changed under step %s; looking again", dep_id, status)
                    moved = True
                except (DesiredStateError, RolloutError) as exc:
                    session.rollback()
                    self._note_once(dep_id, "error", error=exc.message)
                    return
            if not moved:
                return

    async def _step(self, session: Session, dep: Deployment) -> bool:
        model = session.get(Model, dep.model_id)
        if model is None:  # deleted with its deployments; nothing left to do
            return False
        if dep.status == S.PENDING:
            return await self._pending(session, dep, model)
        if dep.status == S.ABORTED:
            return await self._rollback(session, dep, model)
        try:
            strategy = RolloutStrategy.model_validate(dep.strategy or {})
        except ValidationError as exc:
            return self._fail(session, dep, _Failure("strategy", f"invalid strategy: {exc}"))
        if dep.status == S.CANARY:
            return await self._canary(session, dep, model, strategy)
        if dep.status == S.SOAKING:
            return self._soaking(session, dep, model, strategy)
        if dep.status == S.ROLLING:
            return await self._rolling(session, dep, model, strategy)
        return False

    # pending ---------------------------------------------------------------------------

    async def _pending(self, session: Session, dep: Deployment, model: Model) -> bool:
        try:
            strategy = RolloutStrategy.model_validate(dep.strategy or {})
            selector = Selector.model_validate(dep.selector or {})
        except ValidationError as exc:
            return self._refuse(session, dep, f"invalid strategy or selector: {exc}")
        blocker = session.scalars(
            select(Deployment)
            .where(
                Deployment.model_id == dep.model_id,
                Deployment.id != dep.id,
                or_(
                    Deployment.status.in_((S.CANARY, S.SOAKING, S.ROLLING)),
                    and_(Deployment.status == S.PENDING, Deployment.id < dep.id),
                    and_(
                        Deployment.status == S.ABORTED,
                        exists().where(
                            DeploymentAgent.deployment_id == Deployment.id,
                            DeploymentAgent.phase.in_(SENT),
                        ),
                    ),
                ),
            )
            .order_by(Deployment.id)
            .limit(1)
        ).first()
        if blocker is not None:
            if (blocker.version, blocker.target, blocker.selector) == (
                dep.version,
                dep.target,
                dep.selector,
            ) and blocker.status != S.ABORTED:
                return self._refuse(
                    session, dep, f"duplicate of deployment {blocker.id}", duplicate_of=blocker.id
                )
            session.rollback()
            self._note_once(dep.id, "waiting", behind=blocker.id, status=str(blocker.status))
            return False

        problem, figures = await self._check_artifact(session, dep, model, strategy)
        if problem is not None:
            return self._refuse(session, dep, problem, **figures)

        chosen = self._agents(session, dep)
        if chosen:  # the API resolved the selector when the deployment was created
            ids = [da.agent_id for da in chosen]
            agents = list(
                session.scalars(select(Agent).where(Agent.id.in_(ids)).order_by(Agent.id))
            )
        else:
            agents = [
                a
                for a in session.scalars(
                    select(Agent).where(Agent.fleet == self._fleet.topics.fleet).order_by(Agent.id)
                )
                if selector.matches(a.id, a.labels or {})
            ]
        if not agents:
            return self._refuse(
                session,
                dep,
                f"the selector matches no enrolled agent of fleet {self._fleet.topics.fleet}",
                selector=dep.selector,
            )
        previous: dict[str, int | None] = {}
        for agent in agents:
            entry = next((m for m in stored_models(agent) if m.name == model.name), None)
            previous[agent.id] = entry.version if entry is not None else None
        higher = {a: v for a, v in previous.items() if v is not None and v > dep.version}
        if higher:
            listed = ", ".join(f"{a} (v{v})" for a, v in sorted(higher.items()))
            return self._refuse(
                session,
                dep,
                f"versions only go up: {listed} already run a version of {model.name} above "
                f"v{dep.version}; publish a new version instead",
                higher=higher,
            )
        before = [v for v in previous.values() if v is not None and v < dep.version]
        previous_version = max(before) if before else None
        latency_before: dict[str, float] = {}
        for agent in agents:
            beat = self._fleet.heartbeat(agent.id)
            figures_now = beat.latency.get(model.name) if beat is not None else None
            if figures_now is not None and figures_now.count > 0 and figures_now.p50_ms > 0:
                latency_before[agent.id] = figures_now.p50_ms
        # The engine alone chooses the canary set (the API only resolved the selector).
        if strategy.kind != "canary":  # everyone goes first, and the gates watch everyone
            canary = [a.id for a in agents]
        else:  # online agents first, then by id
            ordered = sorted(agents, key=lambda a: (not self._fleet.is_online(a.id), a.id))
            canary = [a.id for a in ordered[: strategy.canary_size(len(ordered))]]
        rest = sorted(a.id for a in agents if a.id not in canary)

        self._guard(session, dep)
        rows = {da.agent_id: da for da in chosen}
        for agent_id in [*canary, *rest]:
            da = rows.get(agent_id)
            if da is None:
                da = DeploymentAgent(deployment_id=dep.id, agent_id=agent_id)
                session.add(da)
            da.canary = agent_id in canary
            da.phase = AgentPhase.WAITING
        dep.previous_version = previous_version
        self._set_status(dep, S.CANARY)
        self._event(
            session,
            dep,
            "selected",
            strategy=strategy.model_dump(),
            agents=previous,
            canary=canary,
            rest=rest,
            previous_version=previous_version,
            latency_before=latency_before,
            **figures,
        )
        session.commit()
        return True

    async def _check_artifact(
        self, session: Session, dep: Deployment, model: Model, strategy: RolloutStrategy
    ) -> tuple[str | None, dict[str, Any]]:
        row = self._artifact_row(session, model.id, dep.version, dep.target)
        folder = artifact_path(self.store, model.name, dep.version, dep.target)
        session.commit()  # never hold a transaction (SQLite: the write lock) across an await
        try:
            manifest = await asyncio.to_thread(
                verify, folder, self._trusted, min_version=dep.version
            )
        except ArtifactError as exc:
            return (
                f"{model.name} v{dep.version} for {dep.target} cannot be deployed: {exc.message}",
                {},
            )
        if manifest.name != model.name or manifest.version != dep.version:
            return (
                f"the artifact at {folder} is {manifest.name} v{manifest.version}, "
                f"not {model.name} v{dep.version}",
                {},
            )
        metrics: dict[str, float] = dict(manifest.metrics)
        if row is not None and row.metrics:
            metrics.update({k: float(v) for k, v in row.metrics.items() if _is_number(v)})
        return quality_problem(metrics, strategy, f"{model.name} v{dep.version} for {dep.target}")

    # canary ----------------------------------------------------------------------------

    async def _canary(
        self, session: Session, dep: Deployment, model: Model, strategy: RolloutStrategy
    ) -> bool:
        wave = self._agents(session, dep, canary=True)
        self._observe(session, dep, model, wave)
        failure = self._load_failures(wave) or self._offline(wave, strategy)
        if failure is not None:
            return self._fail(session, dep, failure)
        await self._send(session, dep, model, wave)
        if all(da.phase == AgentPhase.LOADED for da in wave):
            baseline = {da.agent_id: self._requests(da.agent_id, model.name) for da in wave}
            self._baselines[dep.id] = {a: c for a, c in baseline.items() if c is not None}
            self._guard(session, dep)
            self._set_status(dep, S.SOAKING)
            self._event(
                session,
                dep,
                "soaking",
                loaded=[da.agent_id for da in wave],
                soak_s=strategy.soak_s,
                baseline=baseline,
            )
            session.commit()
            return True
        elapsed = self._elapsed(dep)
        if elapsed > strategy.load_timeout_s:
            waiting = sorted(da.agent_id for da in wave if da.phase != AgentPhase.LOADED)
            return self._fail(
                session,
                dep,
                _Failure(
                    "load",
                    f"{', '.join(waiting)} did not report v{dep.version} loaded within "
                    f"{strategy.load_timeout_s:g} s",
                    {"agents": waiting, "elapsed_s": round(elapsed, 3)},
                ),
            )
        session.commit()
        return False

    # soaking ---------------------------------------------------------------------------

    def _soaking(
        self, session: Session, dep: Deployment, model: Model, strategy: RolloutStrategy
    ) -> bool:
        wave = self._agents(session, dep, canary=True)
        self._observe(session, dep, model, wave)
        errors, figures = self._error_gate(session, dep, model, strategy, wave)
        latency, latency_figures = self._latency_gate(session, dep, model, strategy, wave)
        figures["latency"] = latency_figures
        failure = self._load_failures(wave) or self._offline(wave, strategy) or errors or latency
        if failure is not None:
            return self._fail(session, dep, failure)
        elapsed = self._elapsed(dep)
        if elapsed < strategy.soak_s:
            session.commit()
            return False
        if strategy.kind == "blue-green" and (
            strategy.confirm_after_s is None or elapsed < strategy.soak_s + strategy.confirm_after_s
        ):
            session.commit()
            self._note_once(dep.id, "awaiting-confirmation", **figures)
            return False
        rest = self._agents(session, dep, canary=False)
        self._guard(session, dep)
        self._event(session, dep, "soak-passed", elapsed_s=round(elapsed, 3), **figures)
        self._set_status(dep, S.ROLLING if rest else S.COMPLETED)
        if not rest:
            self._event(session, dep, "completed", agents=[da.agent_id for da in wave])
        session.commit()
        return True

    def _requests(self, agent_id: str, model: str) -> dict[str, int] | None:
        beat = self._fleet.heartbeat(agent_id)
        return dict(beat.requests.get(model, {})) if beat is not None else None

    def _baseline(self, session: Session, dep: Deployment) -> dict[str, dict[str, int]]:
        """Request counters of each canary agent when the soak began (persisted in events)."""
        cached = self._baselines.get(dep.id)
        if cached is not None:
            return cached
        baseline: dict[str, dict[str, int]] = {}
        for event in session.scalars(
            select(RolloutEvent)
            .where(
                RolloutEvent.deployment_id == dep.id,
                RolloutEvent.kind.in_(("soaking", "baseline")),
            )
            .order_by(RolloutEvent.id)
        ):
            if event.kind == "soaking":
                for agent, counts in (event.detail.get("baseline") or {}).items():
                    if isinstance(counts, dict):
                        baseline[agent] = {str(k): int(v) for k, v in counts.items()}
            elif event.agent_id is not None:
                counts = event.detail.get("requests") or {}
                baseline[event.agent_id] = {str(k): int(v) for k, v in counts.items()}
        self._baselines[dep.id] = baseline
        return baseline

    def _deltas(
        self, session: Session, dep: Deployment, model: Model, wave: Sequence[DeploymentAgent]
    ) -> dict[str, dict[str, int]]:
        """Requests each canary agent answered since the soak began, per outcome."""
        baseline = self._baseline(session, dep)
        out: dict[str, dict[str, int]] = {}
        for da in wave:
            counts = self._requests(da.agent_id, model.name)
            if counts is None:
                continue
            base = baseline.get(da.agent_id)
            if base is None:  # first heartbeat since the soak began: it is the baseline
                baseline[da.agent_id] = counts
                self._event(session, dep, "baseline", agent_id=da.agent_id, requests=counts)
                out[da.agent_id] = {}
                continue
            if any(counts.get(k, 0) < v for k, v in base.items()):
                out[da.agent_id] = counts  # the agent restarted: its counters began again
            else:
                out[da.agent_id] = {
                    k: v - base.get(k, 0) for k, v in counts.items() if v - base.get(k, 0) > 0
                }
        return out

    def _error_gate(
        self,
        session: Session,
        dep: Deployment,
        model: Model,
        strategy: RolloutStrategy,
        wave: Sequence[DeploymentAgent],
    ) -> tuple[_Failure | None, dict[str, Any]]:
        deltas = self._deltas(session, dep, model, wave)
        total = sum(sum(d.values()) for d in deltas.values())
        errors = sum(v for d in deltas.values() for k, v in d.items() if k in VERSION_FAULTS)
        rate = errors / total if total else 0.0
        figures: dict[str, Any] = {
            "requests": total,
            "errors": errors,
            "error_rate": round(rate, 6),
            "max_error_rate": strategy.max_error_rate,
            "min_requests": strategy.min_requests,
            "per_agent": deltas,
        }
        if total >= strategy.min_requests and rate > strategy.max_error_rate:
            return (
                _Failure(
                    "error_rate",
                    f"error rate {rate:.1%} ({errors} of {total} requests) on v{dep.version} "
                    f"is above {strategy.max_error_rate:.1%}",
                    figures,
                ),
                figures,
            )
        return None, figures

    def _latency_gate(
        self,
        session: Session,
        dep: Deployment,
        model: Model,
        strategy: RolloutStrategy,
        wave: Sequence[DeploymentAgent],
    ) -> tuple[_Failure | None, dict[str, Any]]:
        if strategy.max_latency_ratio is None:
            return None, {"judged": False, "why": "not asked for"}
        selected = self._selected(session, dep)
        before: dict[str, float] = {
            k: float(v) for k, v in (selected.get("latency_before") or {}).items()
        }
        others = [
            beat.latency[model.name].p50_ms
            for da in self._agents(session, dep, canary=False)
            if da.phase == AgentPhase.WAITING
            and (beat := self._fleet.heartbeat(da.agent_id)) is not None
            and model.name in beat.latency
            and beat.latency[model.name].count > 0
        ]
        reference_others = statistics.median(others) if others else None
        deltas = self._deltas(session, dep, model, wave)
        ratios: dict[str, float] = {}
        for da in wave:
            beat = self._fleet.heartbeat(da.agent_id)
            now = beat.latency.get(model.name) if beat is not None else None
            ok = deltas.get(da.agent_id, {}).get("ok", 0)
            # The agent's window mixes versions until it holds only new-version requests.
            if now is None or now.count == 0 or ok < max(now.count, strategy.min_requests):
                continue
            reference = before.get(da.agent_id, reference_others)
            if not reference:
                continue
            ratios[da.agent_id] = round(now.p50_ms / reference, 4)
        if not ratios:
            return None, {"judged": False, "why": "too few new-version requests"}
        median = statistics.median(ratios.values())
        figures = {
            "judged": True,
            "ratio": median,
            "per_agent": ratios,
            "max_latency_ratio": strategy.max_latency_ratio,
        }
        if median > strategy.max_latency_ratio:
            return (
                _Failure(
                    "latency",
                    f"p50 latency on v{dep.version} is {median:.2f}x what it was before "
                    f"(limit {strategy.max_latency_ratio:.2f}x)",
                    figures,
                ),
                figures,
            )
        return None, figures

    # rolling ---------------------------------------------------------------------------

    async def _rolling(
        self, session: Session, dep: Deployment, model: Model, strategy: RolloutStrategy
    ) -> bool:
        wave = self._agents(session, dep, canary=False)
        self._observe(session, dep, model, wave)
        failure = self._load_failures(wave)
        if failure is not None:
            return self._fail(session, dep, failure)
        await self._send(session, dep, model, wave)
        waiting = [da for da in wave if da.phase != AgentPhase.LOADED]
        offline = {
            da.agent_id
            for da in waiting
            if (gone := self._fleet.offline_for(da.agent_id)) is not None
            and gone > strategy.offline_grace_s
        }
        if all(da.agent_id in offline for da in waiting):
            self._guard(session, dep)
            self._set_status(dep, S.COMPLETED)
            self._event(
                session,
                dep,
                "completed",
                loaded=sorted(da.agent_id for da in wave if da.phase == AgentPhase.LOADED),
                deferred=sorted(offline),
            )
            session.commit()
            return True
        elapsed = self._elapsed(dep)
        if elapsed > strategy.load_timeout_s:
            late = sorted(da.agent_id for da in waiting if da.agent_id not in offline)
            return self._fail(
                session,
                dep,
                _Failure(
                    "load",
                    f"{', '.join(late)} did not report v{dep.version} loaded within "
                    f"{strategy.load_timeout_s:g} s",
                    {"agents": late, "elapsed_s": round(elapsed, 3)},
                ),
            )
        session.commit()
        return False

    # aborted: rollback -----------------------------------------------------------------

    async def _rollback(self, session: Session, dep: Deployment, model: Model) -> bool:
        sent = [da for da in self._agents(session, dep) if da.phase in SENT]
        if not sent:
            return False
        previous = {
            k: (int(v) if v is not None else None)
            for k, v in (self._selected(session, dep).get("agents") or {}).items()
        }
        needs_content = any(previous.get(da.agent_id) not in (None, dep.version) for da in sent)
        if needs_content and dep.rollback_version is None:
            try:
                await self._make_rollback_version(session, dep, model)
            except RolloutError as exc:
                session.rollback()
                self._note_once(dep.id, "rollback-failed", error=exc.message)
                return False
            return True
        rolled: dict[str, Any] = {}
        for da in sent:
            before = previous.get(da.agent_id)
            self._guard(session, dep)
            if before == dep.version:  # it ran this version before the deployment: leave it
                da.phase = AgentPhase.ROLLED_BACK
                da.detail = f"ran v{dep.version} before this deployment: left as it is"
                session.commit()
                continue
            if before is None:
                state = self._publisher.record(session, da.agent_id, [], remove=[model.name])
                what = f"{model.name} removed (it did not run it before)"
            else:
                assert dep.rollback_version is not None
                like = self._entry(session, da.agent_id, model.name)
                desired = self._publisher.desired_model(
                    session, model.name, dep.rollback_version, dep.target, like=like
                )
                state = self._publisher.record(session, da.agent_id, [desired])
                what = f"v{dep.rollback_version} (the content of v{before})"
            generation = state.generation if state is not None else da.generation
            da.phase = AgentPhase.ROLLED_BACK
            da.generation = generation
            da.detail = what
            rolled[da.agent_id] = what
            self._event(
                session,
                dep,
                "rollback-desired",
                agent_id=da.agent_id,
                generation=generation,
                what=what,
            )
            session.commit()
            if state is not None:
                await self._publish(state)
        self._guard(session, dep)
        self._set_status(dep, S.ROLLED_BACK, keep_reason=True)
        self._event(
            session,
            dep,
            "rolled-back",
            rollback_version=dep.rollback_version,
            previous_version=dep.previous_version,
            agents=rolled,
            reason=dep.reason,
        )
        session.commit()
        self._baselines.pop(dep.id, None)
        return True

    async def _make_rollback_version(self, session: Session, dep: Deployment, model: Model) -> int:
        """Copy the previous version's artifact to a new, higher version, re-signed."""
        prev = dep.previous_version
        if prev is None:
            raise RolloutError("no previous version to roll back to")
        name, target = model.name, dep.target
        src = artifact_path(self.store, name, prev, target)
        highest_db = session.scalar(
            select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id)
        )
        version = max(highest_db or 0, self._highest_in_store(name), dep.version) + 1
        session.commit()  # nothing written yet; no transaction held across the copy
        while True:  # claim the version folder: a concurrent publication may take one
            version_dir = self.store / name / f"v{version}"
            try:
                version_dir.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                version += 1
        dest = version_dir / target
        try:
            manifest = await asyncio.to_thread(self._copy_verified, src, dest, prev)
            note = f"rollback of v{dep.version} to the content of v{prev}"
            new = await asyncio.to_thread(
                write_artifact,
                dest,
                name=name,
                version=version,
                task=manifest.task,
                target=target,
                signing_key=self._signing_key,
                inputs=manifest.inputs,
                outputs=manifest.outputs,
                quantization=manifest.quantization,
                split=manifest.split,
                parent_version=prev,
                metrics=manifest.metrics,
                opset=manifest.opset,
            )
            sha = hashlib.sha256((dest / MANIFEST_NAME).read_bytes()).hexdigest()
        except (ArtifactError, OSError) as exc:
            shutil.rmtree(version_dir, ignore_errors=True)
            detail = exc.message if isinstance(exc, ArtifactError) else str(exc)
            raise RolloutError(
                f"cannot build the rollback version from v{prev} of {name} for {target}: {detail}"
            ) from exc
        prev_row = self._artifact_row(session, model.id, prev, target)
        try:
            self._guard(session, dep)
            row = ModelVersion(model_id=model.id, version=version, parent_version=prev, note=note)
            session.add(row)
            session.flush()
            session.add(
                Artifact(
                    version_id=row.id,
                    target=target,
                    path=f"{name}/v{version}/{target}",
                    manifest_sha256=sha,
                    size_bytes=new.total_size,
                    metrics=dict(prev_row.metrics) if prev_row is not None else dict(new.metrics),
                )
            )
            dep.rollback_version = version
            self._event(
                session,
                dep,
                "rollback-version",
                rollback_version=version,
                content_of=prev,
                bad_version=dep.version,
                manifest_sha256=sha,
                key_id=new.key_id,
                note=note,
            )
            session.commit()
        except (IntegrityError, _Moved) as exc:
            session.rollback()
            shutil.rmtree(version_dir, ignore_errors=True)
            if isinstance(exc, _Moved):
                raise
            raise RolloutError(f"v{version} of {name} was taken meanwhile; trying again") from exc
        log.warning("deployment %d: %s is v%d of %s", dep.id, note, version, name)
        return version

    def _copy_verified(self, src: Path, dest: Path, version: int) -> Manifest:
        """Copy a signed artifact and verify the copy (not the source, which could change
        between a check and the copy); then drop its manifest and signature."""
        shutil.copytree(src, dest, symlinks=True)
        manifest = verify(dest, self._trusted, min_version=version)
        if manifest.version != version:
            raise ArtifactError(f"{src} holds v{manifest.version}, not v{version}")
        (dest / MANIFEST_NAME).unlink()
        (dest / SIGNATURE_NAME).unlink()
        return manifest

    def _highest_in_store(self, name: str) -> int:
        root = self.store / name
        if not root.is_dir():
            return 0
        return max(
            (int(m.group(1)) for c in root.iterdir() if (m := _VERSION_DIR.match(c.name))),
            default=0,
        )

    # ------------------------------------------------------------------ agents of a deployment

    def _agents(
        self, session: Session, dep: Deployment, *, canary: bool | None = None
    ) -> list[DeploymentAgent]:
        query = select(DeploymentAgent).where(DeploymentAgent.deployment_id == dep.id)
        if canary is not None:
            query = query.where(DeploymentAgent.canary == canary)
        return list(session.scalars(query.order_by(DeploymentAgent.agent_id)))

    def _entry(self, session: Session, agent_id: str, name: str) -> DesiredModel | None:
        agent = session.get(Agent, agent_id)
        if agent is None:
            return None
        return next((m for m in stored_models(agent) if m.name == name), None)

    async def _send(
        self, session: Session, dep: Deployment, model: Model, wave: Sequence[DeploymentAgent]
    ) -> None:
        """Give every waiting agent of the wave the new version (one transaction each:
        guard, desired state, phase, event; committed before it is published)."""
        for da in wave:
            if da.phase != AgentPhase.WAITING:
                continue
            like = self._entry(session, da.agent_id, model.name)
            desired = self._publisher.desired_model(
                session, model.name, dep.version, dep.target, like=like
            )
            self._guard(session, dep)
            state = self._publisher.record(session, da.agent_id, [desired])
            da.phase = AgentPhase.DESIRED
            if state is not None:
                da.generation = state.generation
            else:  # already in its desired state (a step repeated after a restart)
                agent = session.get(Agent, da.agent_id)
                da.generation = agent.desired_generation if agent is not None else None
            self._event(
                session,
                dep,
                "desired",
                agent_id=da.agent_id,
                generation=da.generation,
                published=state is not None,
            )
            session.commit()
            if state is not None:
                await self._publish(state)

    def _observe(
        self, session: Session, dep: Deployment, model: Model, wave: Sequence[DeploymentAgent]
    ) -> None:
        """Move agents that were sent the version to loaded / failed from their reports."""
        for da in wave:
            if da.phase != AgentPhase.DESIRED:
                continue
            event = self._lifecycle.get((da.agent_id, model.name, dep.version))
            if event is not None and event.step in _FAILED_STEPS:
                da.phase = AgentPhase.FAILED
                da.detail = f"{event.step}: {event.detail}"[:2000]
                self._event(
                    session,
                    dep,
                    "load-failed",
                    agent_id=da.agent_id,
                    step=event.step,
                    detail=event.detail,
                    reason=event.reason,
                )
            elif (event is not None and event.step in _LOADED_STEPS) or self._fleet.loaded_models(
                da.agent_id
            ).get(model.name) == dep.version:
                da.phase = AgentPhase.LOADED
                da.detail = None
                self._event(
                    session,
                    dep,
                    "loaded",
                    agent_id=da.agent_id,
                    via="lifecycle" if event is not None else "status",
                )

    @staticmethod
    def _load_failures(wave: Sequence[DeploymentAgent]) -> _Failure | None:
        failed = {da.agent_id: da.detail for da in wave if da.phase == AgentPhase.FAILED}
        if not failed:
            return None
        first = sorted(failed)[0]
        return _Failure(
            "load",
            f"{len(failed)} agent(s) could not load the new version ({first}: {failed[first]})",
            {"failed": failed},
        )

    def _offline(
        self, wave: Sequence[DeploymentAgent], strategy: RolloutStrategy
    ) -> _Failure | None:
        gone = {
            da.agent_id: round(seconds, 3)
            for da in wave
            if (seconds := self._fleet.offline_for(da.agent_id)) is not None
            and seconds > strategy.offline_grace_s
        }
        if not gone:
            return None
        return _Failure(
            "offline",
            f"canary agent(s) {', '.join(sorted(gone))} offline for longer than "
            f"{strategy.offline_grace_s:g} s",
            {"offline_s": gone, "offline_grace_s": strategy.offline_grace_s},
        )

    # ------------------------------------------------------------------ transitions, events

    def _guard(self, session: Session, dep: Deployment) -> None:
        """Lock the deployment's row while it still has the status this step read; raise
        :class:`_Moved` when the API changed it meanwhile."""
        expected = self._step_status.get(dep.id, dep.status)
        result = session.execute(
            update(Deployment)
            .where(Deployment.id == dep.id, Deployment.status == expected)
            .values(updated_at=datetime.now(UTC))
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 1) != 1:
            raise _Moved

    def _set_status(
        self,
        dep: Deployment,
        status: DeploymentStatus,
        *,
        reason: str | None = None,
        keep_reason: bool = False,
    ) -> None:
        log.info("deployment %d: %s -> %s", dep.id, dep.status, status)
        dep.status = status
        self._step_status[dep.id] = status
        dep.phase_started_at = datetime.now(UTC)
        if not keep_reason:
            dep.reason = reason

    def _refuse(self, session: Session, dep: Deployment, reason: str, **figures: Any) -> bool:
        self._guard(session, dep)
        log.warning("deployment %d refused: %s", dep.id, reason)
        self._set_status(dep, S.ABORTED, reason=f"refused: {reason}")
        self._event(session, dep, "refused", reason=reason, **figures)
        session.commit()
        return True

    def _fail(self, session: Session, dep: Deployment, failure: _Failure) -> bool:
        self._guard(session, dep)
        log.warning("deployment %d: %s gate failed: %s", dep.id, failure.gate, failure.reason)
        self._set_status(dep, S.ABORTED, reason=f"{failure.gate} gate: {failure.reason}")
        self._event(
            session,
            dep,
            "gate-failed",
            gate=failure.gate,
            reason=failure.reason,
            **failure.figures,
        )
        session.commit()
        return True

    def _event(
        self,
        session: Session,
        dep: Deployment,
        kind: str,
        *,
        agent_id: str | None = None,
        **detail: Any,
    ) -> None:
        session.add(
            RolloutEvent(
                deployment_id=dep.id,
                kind=kind,
                agent_id=agent_id,
                detail=_jsonable(detail),
                ts=datetime.now(UTC),
            )
        )
        log.debug("deployment %d: %s %s %s", dep.id, kind, agent_id or "", detail)

    def _note_once(self, dep_id: int, kind: str, **detail: Any) -> None:
        """An event that would repeat every tick (waiting, an error) is written once."""
        detail = _jsonable(detail)
        with self._sessions() as session:
            last = session.scalars(
                select(RolloutEvent)
                .where(RolloutEvent.deployment_id == dep_id)
                .order_by(RolloutEvent.id.desc())
                .limit(1)
            ).first()
            if last is not None and last.kind == kind and last.detail == detail:
                return
            session.add(RolloutEvent(deployment_id=dep_id, kind=kind, detail=detail))
            session.commit()
        log.info("deployment %d: %s %s", dep_id, kind, detail)

    def _selected(self, session: Session, dep: Deployment) -> dict[str, Any]:
        event = session.scalars(
            select(RolloutEvent)
            .where(RolloutEvent.deployment_id == dep.id, RolloutEvent.kind == "selected")
            .order_by(RolloutEvent.id.desc())
            .limit(1)
        ).first()
        return dict(event.detail) if event is not None else {}

    @staticmethod
    def _artifact_row(
        session: Session, model_id: int, version: int, target: str
    ) -> Artifact | None:
        return session.scalars(
            select(Artifact)
            .join(ModelVersion, Artifact.version_id == ModelVersion.id)
            .where(
                ModelVersion.model_id == model_id,
                ModelVersion.version == version,
                Artifact.target == target,
            )
        ).first()

    @staticmethod
    def _elapsed(dep: Deployment) -> float:
        started = _aware(dep.phase_started_at)
        if started is None:
            return 0.0
        return (datetime.now(UTC) - started).total_seconds()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _jsonable(value: Any) -> Any:
    """Event details as plain JSON (enums as their values, tuples and sets as lists)."""
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
