"""The fleet the rollout drills (rows 4, 8 and 9) run against: a mosquitto of the drill's own,
``edgefed cloud serve`` and three ``edgefed edge run`` agents as processes, tiny ONNX models
signed with the controller's key (see :mod:`tests.cloud.e2e.world`), every agent serving a
first version when the drill begins.

The :class:`Watcher` is the drill's MQTT client: besides sending requests and recording the
desired states the controller publishes (as the e2e observer does), it keeps each desired
state's raw bytes (row 8 replays them) and the ``model.lifecycle`` telemetry of the agents --
what each agent itself says it did with a version (loaded, rejected, failed).
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edgefed.common.artifact import generate_signing_key
from edgefed.common.broker import PrivateBroker, free_port
from edgefed.common.errors import PayloadError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import DesiredState, Telemetry, decode
from tests.cloud.e2e.world import MODEL, ControllerProcess, Observer, World, build_sources

LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 4)
"""Longer than the 16 positions of the ``erroring`` model, well within the good one's 128."""


@dataclass(frozen=True)
class Lifecycle:
    """One ``model.lifecycle`` record an agent sent."""

    agent_id: str
    version: int | None
    step: str
    detail: str
    at: float
    """``time.monotonic()`` when the watcher received it."""


@dataclass(frozen=True)
class RawDesired:
    """A desired state as the broker delivered it (bytes kept for replaying)."""

    agent_id: str
    generation: int
    version: int | None
    """The version of :data:`MODEL` it names (None: not named)."""
    payload: bytes
    content_type: str | None
    retained: bool
    at: float = field(default_factory=time.monotonic)
    """When the watcher received it."""


class Watcher(Observer):
    """The e2e :class:`Observer` plus the agents' lifecycle telemetry and raw desired states."""

    def __init__(self, broker_url: str, fleet: str) -> None:
        super().__init__(broker_url, fleet)
        self.lifecycle: list[Lifecycle] = []
        self.raw: list[RawDesired] = []

    async def _start(self) -> None:
        client = MqttClient.from_settings(self.settings, client_id=f"watcher-{os.getpid()}")
        await client.__aenter__()
        self._client = client
        self._requester = Requester(client, self.topics)

        async def on_desired(message: Message) -> None:
            try:
                state = decode(message.payload, message.content_type, DesiredState).message
            except PayloadError:
                return
            versions = {m.name: m.version for m in state.models}
            self.desired.append((state.agent_id, state.generation, versions))
            self.raw.append(
                RawDesired(
                    state.agent_id,
                    state.generation,
                    versions.get(MODEL),
                    message.payload,
                    message.content_type,
                    message.retain,
                )
            )

        async def on_telemetry(message: Message) -> None:
            try:
                batch = decode(message.payload, message.content_type, Telemetry).message
            except PayloadError:
                return
            for record in batch.records:
                if record.name != "model.lifecycle" or record.fields.get("model") != MODEL:
                    continue
                version = record.fields.get("version")
                self.lifecycle.append(
                    Lifecycle(
                        batch.agent_id,
                        version if isinstance(version, int) else None,
                        str(record.fields.get("step")),
                        str(record.fields.get("detail") or ""),
                        time.monotonic(),
                    )
                )

        await client.subscribe(f"{self.topics.prefix}/agents/+/desired", on_desired)
        await client.subscribe(f"{self.topics.prefix}/agents/+/telemetry", on_telemetry)

    def publish_desired(
        self, agent_id: str, payload: bytes, content_type: str | None = None
    ) -> None:
        """Publish ``payload`` retained on the agent's desired-state topic, as the controller
        does (the broker here has no ACLs: the drill acts with the controller's rights); a
        replay passes the content type the message was delivered with."""
        client = self._client
        assert client is not None
        self._call(
            client.publish(
                self.topics.desired(agent_id), payload, retain=True, content_type=content_type
            )
        )

    def steps(self, agent_id: str, version: int | None = None, since: float = 0.0) -> list[str]:
        """Lifecycle steps ``agent_id`` reported (for ``version``) after ``since``."""
        return [
            e.step
            for e in list(self.lifecycle)
            if e.agent_id == agent_id
            and e.at >= since
            and (version is None or e.version == version)
        ]


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Wait for ``condition`` (polled); return the seconds it took. Raises AssertionError with
    ``what`` past the deadline (a deadline, not a timed assertion: the figure is reported)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


@dataclass(frozen=True)
class Outcome:
    agent_id: str
    version: int | None
    outcome: str
    """``"ok"`` or the error the caller got."""
    long: bool
    at: float


@dataclass
class Load:
    """Requests sent one after another to the agents, round robin, on a thread of their own
    while a drill runs; every ``long_every``-th text is :data:`LONG_TEXT` (0: none)."""

    watcher: Watcher
    agents: list[str]
    long_every: int = 0
    pause_s: float = 0.02
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, name="drill-load", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        for i in itertools.count(1):
            if self._stop.is_set():
                return
            agent = self.agents[i % len(self.agents)]
            long = self.long_every > 0 and i % self.long_every == 0
            try:
                version, outcome = self.watcher.infer(agent, LONG_TEXT if long else "hello edge")
            except TimeoutError as exc:  # the watcher's loop did not answer: a failure too
                version, outcome = None, f"{type(exc).__name__}: {exc}"
            self.outcomes.append(Outcome(agent, version, outcome, long, time.monotonic()))
            time.sleep(self.pause_s)

    def failed(self, since: float = 0.0, until: float = float("inf")) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.outcome != "ok" and since <= o.at <= until]

    def sent(self, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for o in list(self.outcomes) if since <= o.at <= until)


@dataclass
class Fleet:
    world: World
    watcher: Watcher
    broker: PrivateBroker
    first: int
    """The version every agent serves when the drill begins."""

    @property
    def agent_ids(self) -> list[str]:
        return sorted(a.config.agent_id for a in self.world.agents)

    def roll_out_everywhere(self, version: int) -> None:
        """Deploy ``version`` to every agent (all at once, no soak) and wait until each serves
        it."""
        dep = self.world.deploy(version, kind="all-at-once", soak_s=0, max_latency_ratio=None)
        status = self.world.wait_deployment(dep, {"completed", "rolled_back", "aborted"})
        assert status["status"] == "completed", status
        for agent_id in self.agent_ids:
            self.watcher.serving(agent_id, version)


@contextmanager
def running_fleet(workdir: Path, *, agents: int = 3) -> Iterator[Fleet]:
    """A fleet of ``agents`` agents, each serving the first (good) version; everything stopped
    on the way out, also on failure."""
    workdir.mkdir(parents=True, exist_ok=True)
    fleet = f"drill-{secrets.token_hex(3)}"
    data_dir = workdir / "controller"
    data_dir.mkdir(exist_ok=True)
    key = generate_signing_key()
    key.save(data_dir / "signing.key")  # the controller signs rollbacks with this same key
    with PrivateBroker(data_dir=workdir / "broker") as broker:
        controller = ControllerProcess(data_dir, free_port(), broker.url, fleet)
        world = World(workdir, controller, key, build_sources(workdir / "src"))
        try:
            controller.start()
            watcher = Watcher(broker.url, fleet)
            with watcher:
                world.ok(
                    "POST",
                    "/models",
                    json={
                        "name": MODEL,
                        "task": "feature-extraction",
                        "teacher_dir": str(world.sources["good"].parent / "good-hf"),
                    },
                )
                world.enrol(agents, {"site": "lab"})
                first = world.release("good")
                f = Fleet(world, watcher, broker, first)
                f.roll_out_everywhere(first)
                yield f
        finally:
            for agent in world.agents:
                agent.stop()
            controller.stop()
