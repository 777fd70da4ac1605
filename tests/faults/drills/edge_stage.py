"""The stage of the edge drills (rows 3, 14 and 15): a mosquitto of the drill's own, the real
controller (``edgefed cloud serve``) and agents enrolled through it and run as processes
(``edgefed edge join`` / ``edgefed edge run``), with the tiny embedding model released and
deployed by the controller's API.

Each agent can be given what its drill changes about it: the broker URL it dials (a link proxy
in between), a local endpoint port (local applications), the state directory (a small
filesystem), and extra environment for its processes (a skewed clock with libfaketime).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefed.common.artifact import generate_signing_key
from edgefed.common.broker import PrivateBroker, free_port
from edgefed.common.errors import EdgefedError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import (
    InferenceReply,
    InferenceRequest,
    Telemetry,
    TelemetryRecord,
    decode,
)
from edgefed.common.topics import Topics
from edgefed.edge.config import AgentConfig
from tests.cloud.e2e.world import MODEL, ControllerProcess, World, build_sources, clean_env
from tests.conftest import fast_settings


@dataclass
class AgentRun:
    """One ``edgefed edge run`` process and its configuration."""

    config: AgentConfig
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def agent_id(self) -> str:
        return self.config.agent_id

    log_dir: Path | None = None
    """Where its log goes (default: beside the state directory)."""

    @property
    def log_path(self) -> Path:
        folder = self.log_dir or self.config.state_dir.parent
        return folder / f"{self.config.state_dir.name}.log"

    def start(self) -> None:
        command = [sys.executable, "-m", "edgefed.cli", "edge", "run", "--state-dir"]
        command.append(str(self.config.state_dir))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command, env=clean_env(**self.env), stdout=log, stderr=subprocess.STDOUT
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class EdgeStage:
    world: World
    broker: PrivateBroker
    agents: list[AgentRun] = field(default_factory=list)

    @property
    def fleet(self) -> str:
        return self.world.controller.fleet

    def enrol(
        self,
        name: str,
        *,
        state_dir: Path | None = None,
        broker_url: str | None = None,
        local_port: int | None = None,
        env: dict[str, str] | None = None,
        join_token_ttl_s: int | None = None,
    ) -> AgentRun:
        """Join a new agent with ``edgefed edge join`` (run with ``env`` too), adjust its
        configuration for the drill, and start it."""
        body: dict[str, Any] = {"labels": {"site": "lab"}}
        if join_token_ttl_s is not None:
            body["expires_in_s"] = join_token_ttl_s
        token = self.world.ok("POST", "/join-tokens", json=body)["token"]
        state = state_dir or self.world.root / name
        command = [sys.executable, "-m", "edgefed.cli", "edge", "join"]
        command += ["--controller", self.world.controller.url, "--token", token]
        command += ["--state-dir", str(state)]
        joined = subprocess.run(
            command, env=clean_env(**(env or {})), capture_output=True, timeout=120, check=False
        )
        if joined.returncode != 0:
            raise RuntimeError(
                f"edgefed edge join exited with {joined.returncode}: "
                f"{joined.stderr.decode(errors='replace')[-2000:]}"
            )
        config = AgentConfig.load(state)
        update: dict[str, Any] = {"heartbeat_s": 0.5, "telemetry_s": 0.5, "metrics_port": None}
        if broker_url is not None:
            update["broker_url"] = broker_url
        config = config.model_copy(update=update)
        config.local_endpoint = config.local_endpoint.model_copy(
            update={"enabled": local_port is not None, "port": local_port or 0}
        )
        config.save()
        agent = AgentRun(AgentConfig.load(state), env=dict(env or {}), log_dir=self.world.root)
        agent.start()
        self.agents.append(agent)
        return agent

    def live(self, agent_id: str) -> dict[str, Any]:
        """The controller's live view of an agent (``{}``: never seen)."""
        body = self.world.ok("GET", f"/agents/{agent_id}")
        live = body.get("live")
        return dict(live) if isinstance(live, dict) else {}

    def release_and_deploy(self, timeout_s: float = 120) -> int:
        """Publish the good model as the next version, deploy it all at once to every agent
        and wait until the controller says the deployment completed."""
        version = self.world.release("good")
        dep = self.world.deploy(version, kind="all-at-once", soak_s=0)
        done = self.world.wait_deployment(dep, {"completed", "failed", "aborted"}, timeout_s)
        if done["status"] != "completed":
            raise RuntimeError(f"deployment of v{version} ended {done['status']}: {done}")
        return version

    def deploy_nowait(self) -> tuple[int, int]:
        """Publish and deploy the next version without waiting: (version, deployment id)."""
        version = self.world.release("good")
        return version, self.world.deploy(version, kind="all-at-once", soak_s=0)


@contextmanager
def edge_stage(root: Path) -> Iterator[EdgeStage]:
    """Broker, controller and the registered model; agents added with :meth:`EdgeStage.enrol`.
    Everything is stopped on the way out, also on failure."""
    root.mkdir(parents=True, exist_ok=True)
    broker = PrivateBroker(data_dir=root / "broker", persistence=True)
    broker.start()
    try:
        data_dir = root / "controller"
        data_dir.mkdir(exist_ok=True)
        key = generate_signing_key()
        key.save(data_dir / "signing.key")
        fleet = f"drill-{secrets.token_hex(3)}"
        controller = ControllerProcess(data_dir, free_port(), broker.url, fleet)
        world = World(root, controller, key, build_sources(root / "src"))
        stage = EdgeStage(world, broker)
        controller.start()
        try:
            teacher = str(world.sources["good"].parent / "good-hf")
            world.ok(
                "POST",
                "/models",
                json={"name": MODEL, "task": "feature-extraction", "teacher_dir": teacher},
            )
            yield stage
        finally:
            for agent in stage.agents:
                agent.stop()
            controller.stop()
    finally:
        broker.close()


def wait_until(what: str, check: Any, timeout_s: float, every_s: float = 0.2) -> Any:
    """Poll ``check()`` until it returns something truthy (returned) or ``timeout_s`` passes
    (AssertionError naming ``what``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(every_s)


class MqttSide:
    """An MQTT client of the drill on a thread with its own event loop (the drills stay
    synchronous): it sends inference requests to agents and records their telemetry as the
    controller receives it. Connected to the cloud broker, or to an agent's local broker (a
    local application)."""

    def __init__(self, broker_url: str, fleet: str, client_id: str) -> None:
        self.settings = fast_settings(broker_url, fleet)
        self.topics = Topics(fleet)
        self.client_id = client_id
        self.records: list[tuple[str, int, TelemetryRecord]] = []
        """(agent id, batch seq, record) of every telemetry record received, in order."""
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._client: MqttClient | None = None
        self._requester: Requester | None = None

    def __enter__(self) -> MqttSide:
        self._thread.start()
        self.call(self._start())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):  # closing on the way out, whatever happened
                self.call(self._client.aclose(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        client = MqttClient.from_settings(self.settings, client_id=self.client_id)
        await client.__aenter__()
        self._client = client
        self._requester = Requester(client, self.topics)

    def watch_telemetry(self) -> None:
        """Record the telemetry of every agent of the fleet from now on."""

        async def on_telemetry(message: Message) -> None:
            batch = decode(message.payload, message.content_type, Telemetry).message
            for record in batch.records:
                self.records.append((batch.agent_id, batch.seq, record))

        async def go() -> None:
            assert self._client is not None
            await self._client.subscribe(f"{self.topics.prefix}/agents/+/telemetry", on_telemetry)

        self.call(go())

    def infer(
        self, agent_id: str, *, deadline: float | None = None, timeout: float = 10
    ) -> tuple[int | None, str]:
        """One request to ``agent_id``: (version that answered, "ok") or (None, the error)."""
        requester = self._requester
        assert requester is not None

        async def go() -> tuple[int | None, str]:
            try:
                reply = await requester.request(
                    self.topics.agent_infer(agent_id),
                    InferenceRequest(model=MODEL, texts=["hello edge"], deadline=deadline),
                    InferenceReply,
                    timeout=timeout,
                )
            except EdgefedError as exc:
                return None, f"{type(exc).__name__}: {exc.message}"
            return reply.message.version, "ok"

        result: tuple[int | None, str] = self.call(go(), timeout=timeout + 30)
        return result

    def serving(self, agent_id: str, timeout_s: float = 60) -> int:
        """The version ``agent_id`` answers with, once it answers (waits)."""
        deadline = time.monotonic() + timeout_s
        while True:
            version, outcome = self.infer(agent_id, timeout=5)
            if version is not None:
                return version
            if time.monotonic() > deadline:
                raise AssertionError(f"{agent_id} does not answer: {outcome}")
            time.sleep(0.3)
