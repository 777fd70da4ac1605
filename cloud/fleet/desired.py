"""The desired state of each agent: recorded in the registry first, then published retained.

Order of a publication (:meth:`DesiredStatePublisher.publish`):

1. in the caller's transaction, ``Agent.desired_generation`` goes up by one and the new
   :class:`~edgefed.common.schemas.DesiredState` is stored in ``Agent.desired_state``, together
   with whatever rollout state the caller changed in the same session;
2. the transaction commits;
3. the state is published retained with QoS 1 on ``agents/<agent>/desired`` and the broker's
   PUBACK awaited.

The registry is the truth. A controller that dies between 2 and 3 (or a publish that is not
acknowledged) leaves the broker one generation behind; :meth:`DesiredStatePublisher.resync`
republishes exactly the stored state (same generation, same content: an agent accepts that
quietly) to every agent whose retained state on the broker is older than the registry's. The
publisher learns what the broker holds by subscribing to the retained desired states of the
fleet. Publishing in the other order would be worse: a state on the broker that the registry
does not know would make the next generation number collide, and agents refuse a generation
they have seen (replay protection).

An agent's desired state lists **all** its models: a publication names the models to add or
replace (and those to remove); the others are carried over from the stored state. Placements
(where each model's requests run, set by the split planner) are carried over the same way: a
publication sets or drops the ones it names, and a removed model loses its placement.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefed.cloud.compress.config import TARGETS
from edgefed.cloud.registry.models import Agent, Artifact, Model, ModelVersion
from edgefed.common.artifact import MANIFEST_NAME
from edgefed.common.errors import MessagingError, PayloadError, PermanentError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.schemas import DesiredModel, DesiredState, Placement, decode
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)


class DesiredStateError(PermanentError):
    """A desired state cannot be built: unknown agent, missing or inconsistent artifact."""


def artifact_path(store: Path, name: str, version: int, target: str) -> Path:
    """Folder of an artifact in the store: ``NAME/vN/TARGET``."""
    return store / name / f"v{version}" / target


def artifact_url(public_url: str, name: str, version: int, target: str) -> str:
    """Where an agent downloads an artifact from the controller."""
    return f"{public_url.rstrip('/')}/api/v1/artifacts/{name}/v{version}/{target}"


def stored_models(agent: Agent) -> list[DesiredModel]:
    """The models of the agent's stored desired state (empty when it has none)."""
    if not agent.desired_state:
        return []
    try:
        return list(DesiredState.model_validate(agent.desired_state).models)
    except ValidationError:
        log.error("agent %s: the stored desired state is not valid; treated as empty", agent.id)
        return []


def stored_placements(agent: Agent) -> dict[str, Placement]:
    """The placements of the agent's stored desired state (empty when it has none)."""
    if not agent.desired_state:
        return {}
    try:
        return dict(DesiredState.model_validate(agent.desired_state).placements)
    except ValidationError:
        return {}


def merge_models(
    current: Sequence[DesiredModel], changes: Iterable[DesiredModel], remove: Iterable[str] = ()
) -> list[DesiredModel]:
    """``current`` with the models of ``changes`` added or replaced (by name) and the names in
    ``remove`` dropped; order kept, new models appended."""
    by_name = {m.name: m for m in current}
    order = [m.name for m in current]
    for model in changes:
        if model.name not in by_name:
            order.append(model.name)
        by_name[model.name] = model
    for name in remove:
        by_name.pop(name, None)
    return [by_name[n] for n in order if n in by_name]


class DesiredStatePublisher:
    """Records and publishes desired states of the agents of one fleet.

    ``client`` is an entered :class:`MqttClient`; ``store`` the artifact store; ``public_url``
    the controller's URL as agents reach it (``ControllerSettings.resolved_public_url``).
    """

    def __init__(
        self,
        client: MqttClient,
        topics: Topics,
        *,
        store: Path,
        public_url: str,
        publish_timeout_s: float | None = None,
    ) -> None:
        self._client = client
        self._topics = topics
        self.store = store
        self.public_url = public_url.rstrip("/")
        self._publish_timeout_s = publish_timeout_s
        self._lock = asyncio.Lock()
        self._broker: dict[str, int] = {}
        """Generation of the retained desired state the broker holds, per agent."""
        self._unconfirmed: set[str] = set()
        self._started = False
        self._snapshot_stale = True
        self._sync_topic = f"{topics.prefix}/controller/sync/{uuid.uuid4().hex[:16]}"
        self._sync_waiters: dict[bytes, asyncio.Future[None]] = {}
        self.published = 0
        """Desired states published (for tests and metrics)."""

    # ------------------------------------------------------------------ set-up

    async def start(self) -> None:
        """Subscribe to the fleet's retained desired states (once) and learn what the broker
        holds; afterwards the broker's view is refreshed after every reconnect."""
        if self._started:
            return
        self._started = True
        self._client.add_connect_hook(self._on_connect)
        await self._client.subscribe(self._sync_topic, self._on_sync)
        await self._snapshot()

    async def _on_connect(self, session_present: bool) -> None:
        # After any reconnect, not only one that lost the session: a broker that crashed and
        # came back from its persistence file keeps our session but may have lost retained
        # states written after its last autosave.
        del session_present
        self._snapshot_stale = True

    async def _snapshot(self) -> None:
        """(Re)subscribe to every agent's retained desired state and wait until the broker has
        sent them all: it sends the retained messages of a subscription before a message we
        publish after subscribing, so our own marker coming back ends the snapshot."""
        self._snapshot_stale = False
        # Learn the broker's view afresh: a state it lost must not stay known from before.
        self._broker.clear()
        pattern = f"{self._topics.prefix}/agents/+/desired"
        await self._client.unsubscribe(pattern)
        await self._client.subscribe(pattern, self._on_desired)
        marker = uuid.uuid4().hex.encode()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sync_waiters[marker] = waiter
        try:
            await self._client.publish(self._sync_topic, marker, qos=1)
            await asyncio.wait_for(waiter, self._client.settings.subscribe_timeout_s)
        except (TimeoutError, MessagingError) as exc:
            self._snapshot_stale = True
            log.warning("could not learn the retained desired states from the broker: %s", exc)
        finally:
            self._sync_waiters.pop(marker, None)

    async def _on_sync(self, message: Message) -> None:
        waiter = self._sync_waiters.get(message.payload)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _on_desired(self, message: Message) -> None:
        agent_id = self._topics.agent_of(message.topic)
        if agent_id is None or not message.payload:
            return
        try:
            state = decode(message.payload, message.content_type, DesiredState).message
        except PayloadError as exc:
            log.warning("retained desired state on %s is not valid: %s", message.topic, exc)
            return
        self._broker[agent_id] = max(self._broker.get(agent_id, 0), state.generation)

    # ------------------------------------------------------------------ building

    def desired_model(
        self,
        session: Session,
        name: str,
        version: int,
        target: str,
        *,
        like: DesiredModel | None = None,
    ) -> DesiredModel:
        """The desired-state entry of ``name`` v``version`` for ``target``, from the store.

        Providers come from the target profile; role, split point and batching settings are
        carried over from ``like`` (the agent's current entry for the model) when given.
        """
        folder = artifact_path(self.store, name, version, target)
        try:
            manifest_bytes = (folder / MANIFEST_NAME).read_bytes()
        except OSError as exc:
            raise DesiredStateError(
                f"{name} v{version} has no artifact for target {target} in the store "
                f"({folder}): {exc.strerror}"
            ) from exc
        sha = hashlib.sha256(manifest_bytes).hexdigest()
        recorded = session.scalar(
            select(Artifact.manifest_sha256)
            .join(ModelVersion, Artifact.version_id == ModelVersion.id)
            .join(Model, ModelVersion.model_id == Model.id)
            .where(Model.name == name, ModelVersion.version == version, Artifact.target == target)
        )
        if recorded is not None and recorded != sha:
            raise DesiredStateError(
                f"the manifest of {name} v{version} for {target} in the store has sha256 {sha}, "
                f"the registry recorded {recorded}: the store was changed"
            )
        profile = TARGETS.get(target)
        providers = (
            list(profile.providers)
            if profile is not None
            else (list(like.providers) if like is not None else ["CPUExecutionProvider"])
        )
        extra = (
            {
                "role": like.role,
                "split_point": like.split_point,
                "max_batch_size": like.max_batch_size,
                "max_batch_wait_ms": like.max_batch_wait_ms,
            }
            if like is not None and like.role == "full"
            else {}
        )
        return DesiredModel(
            name=name,
            version=version,
            artifact_url=artifact_url(self.public_url, name, version, target),
            manifest_sha256=sha,
            providers=providers,
            **extra,
        )

    # ------------------------------------------------------------------ publishing

    async def publish(
        self,
        session: Session,
        agent_id: str,
        models: Sequence[DesiredModel],
        *,
        remove: Iterable[str] = (),
        placements: Mapping[str, Placement | None] | None = None,
    ) -> DesiredState:
        """Add or replace ``models`` (and drop ``remove``) in the agent's desired state, set
        or drop (``None``) the ``placements`` named, record it with the next generation, commit
        ``session`` (with the caller's changes), then publish it retained (QoS 1, PUBACK
        awaited).

        When nothing changes, the caller's changes are committed, nothing is published and the
        stored state is returned: a step repeated after a restart never publishes twice. A
        publish that the broker does not acknowledge is logged and retried by :meth:`resync`.
        """
        try:
            state = self.record(session, agent_id, models, remove=remove, placements=placements)
        except BaseException:
            session.rollback()
            raise
        if state is None:
            session.commit()
            return self.current(session, agent_id)
        session.commit()
        await self.send(state)
        return state

    def record(
        self,
        session: Session,
        agent_id: str,
        models: Sequence[DesiredModel],
        *,
        remove: Iterable[str] = (),
        placements: Mapping[str, Placement | None] | None = None,
    ) -> DesiredState | None:
        """The first half of :meth:`publish`, for callers that write more in the same
        transaction: record the agent's next desired state in ``session`` (not committed) and
        return it, or ``None`` when it would not change. The caller commits, then
        :meth:`send` s it."""
        agent = session.get(Agent, agent_id, with_for_update=True, populate_existing=True)
        if agent is None:
            raise DesiredStateError(f"agent {agent_id!r} is not enrolled")
        removed = set(remove)
        current = stored_models(agent)
        merged = merge_models(current, models, removed)
        current_placements = stored_placements(agent)
        new_placements = {
            name: placement
            for name, placement in {**current_placements, **(placements or {})}.items()
            if placement is not None and name not in removed
        }
        if (
            agent.desired_state is not None
            and merged == current
            and new_placements == current_placements
        ):
            return None
        # Never behind what the broker holds (a registry restored from a backup): agents
        # refuse a generation they have seen.
        agent.desired_generation = (
            max(agent.desired_generation or 0, self._broker.get(agent_id, 0)) + 1
        )
        state = DesiredState(
            agent_id=agent_id,
            generation=agent.desired_generation,
            models=merged,
            placements=new_placements,
        )
        agent.desired_state = state.model_dump(mode="json")
        return state

    def current(self, session: Session, agent_id: str) -> DesiredState:
        """The agent's stored desired state (generation 0 is not valid on the wire: an agent
        that never had one gets an empty state of generation 1 on its first publication)."""
        agent = session.get(Agent, agent_id)
        if agent is None:
            raise DesiredStateError(f"agent {agent_id!r} is not enrolled")
        if agent.desired_state is None:
            raise DesiredStateError(f"agent {agent_id!r} has no desired state yet")
        return DesiredState.model_validate(agent.desired_state)

    async def send(self, state: DesiredState) -> None:
        """Publish a recorded (committed) desired state retained, QoS 1, awaiting the PUBACK.
        Sends keep the order of the calls. Not acknowledged: logged, and :meth:`resync`
        publishes it again."""
        async with self._lock:
            await self._send(state)

    async def _send(self, state: DesiredState) -> None:
        if state.generation < self._broker.get(state.agent_id, 0):
            # Recorded before a newer state that was sent first (two services record in their
            # own threads): the newer one already carries everything this one says.
            log.debug(
                "desired state generation %d of %s is older than the published %d: not sent",
                state.generation,
                state.agent_id,
                self._broker[state.agent_id],
            )
            return
        try:
            await self._client.publish(
                self._topics.desired(state.agent_id),
                state.to_json(),
                qos=1,
                retain=True,
                timeout=self._publish_timeout_s,
            )
        except MessagingError as exc:
            self._unconfirmed.add(state.agent_id)
            log.warning(
                "desired state generation %d of %s not acknowledged by the broker (%s); "
                "it is recorded and will be published again",
                state.generation,
                state.agent_id,
                exc.message,
            )
            return
        self._unconfirmed.discard(state.agent_id)
        self._broker[state.agent_id] = max(self._broker.get(state.agent_id, 0), state.generation)
        self.published += 1
        log.info(
            "desired state generation %d published to %s: %s",
            state.generation,
            state.agent_id,
            ", ".join(f"{m.name} v{m.version}" for m in state.models) or "no models",
        )

    @property
    def needs_resync(self) -> bool:
        """A publish was not acknowledged, or the broker may have lost retained states."""
        return bool(self._unconfirmed) or self._snapshot_stale

    def broker_generation(self, agent_id: str) -> int:
        """Generation of the retained desired state the broker holds for the agent (0: none)."""
        return self._broker.get(agent_id, 0)

    def _behind(self, session: Session, agent_ids: Iterable[str] | None) -> list[DesiredState]:
        """Stored desired states the broker does not hold yet (a worker thread reads them, so
        the event loop never waits for the database); ends the session's transaction."""
        query = select(Agent).where(
            Agent.fleet == self._topics.fleet, Agent.desired_state.is_not(None)
        )
        if agent_ids is not None:
            query = query.where(Agent.id.in_(list(agent_ids)))
        behind: list[DesiredState] = []
        for agent in session.scalars(query):
            if agent.desired_generation <= self._broker.get(agent.id, 0) and (
                agent.id not in self._unconfirmed
            ):
                continue
            try:
                behind.append(DesiredState.model_validate(agent.desired_state))
            except ValidationError:
                log.error("agent %s: stored desired state is not valid; not published", agent.id)
        session.commit()  # only read: no transaction is held while waiting for the broker
        return behind

    async def resync(self, session: Session, agent_ids: Iterable[str] | None = None) -> list[str]:
        """Republish the stored desired state of every agent (of this fleet, or of
        ``agent_ids``) whose retained state on the broker is older. Returns their ids. Ends
        ``session``'s transaction (a commit) before it publishes: no transaction is held while
        waiting for the broker."""
        if not self._started:
            await self.start()
        elif self._snapshot_stale:
            await self._snapshot()
        behind = await asyncio.to_thread(self._behind, session, agent_ids)
        done = []
        async with self._lock:
            for state in behind:
                log.warning(
                    "agent %s: the broker holds desired generation %d, the registry %d: "
                    "publishing the recorded state again",
                    state.agent_id,
                    self._broker.get(state.agent_id, 0),
                    state.generation,
                )
                await self._send(state)
                done.append(state.agent_id)
        return done
