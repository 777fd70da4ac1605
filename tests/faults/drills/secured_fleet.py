"""A fleet behind an authenticating broker, for the MQTT access drill (row 6): ``edgefed cloud
serve`` with ``[controller.mqtt_auth] enabled`` and no broker URL, so the controller starts its
own mosquitto on the password and ACL files it renders; agents that join through the real API
(each given its own broker user and password) and run as ``edgefed edge run`` processes; a spy
connected with the controller's own credentials (it may read the whole fleet's tree).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import SecretStr

from edgefed.cloud.brokerauth.files import CREDENTIALS_DIR
from edgefed.common.broker import free_port
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.settings import BrokerAddress, MqttSettings
from edgefed.edge.config import AgentConfig, LocalEndpoint
from edgefed.edge.join import join

FLEET = "row6"
CONTROLLER_USER = "edgefed-controller"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    env.update(
        EDGEFED_LOG_FORMAT="plain",
        EDGEFED_MQTT__BACKOFF_INITIAL_S="0.05",
        EDGEFED_MQTT__BACKOFF_MAX_S="0.5",
    )
    env.update(extra)
    return env


def mqtt_client(
    url: str,
    client_id: str,
    user: str | None = None,
    password: str | None = None,
    **tls: Path,
) -> MqttClient:
    """A client that must connect at once (entering raises when the broker refuses it)."""
    settings = MqttSettings(
        username=user,
        password=SecretStr(password) if password is not None else None,
        connect_timeout_s=5.0,
        publish_timeout_s=5.0,
        subscribe_timeout_s=5.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
        keepalive_s=5,
        **tls,
    )
    return MqttClient(BrokerAddress.parse(url), settings, client_id=client_id)


@dataclass
class Spy:
    """Every message of the fleet's tree, as the controller's user receives it."""

    seen: list[Message] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, message: Message) -> None:
        self.seen.append(message)
        self._arrived.set()

    def saw(self, topic: str, payload: bytes | None = None, since: int = 0) -> bool:
        return any(
            m.topic == topic and (payload is None or m.payload == payload)
            for m in self.seen[since:]
        )

    async def wait_for(
        self, topic: str, payload: bytes | None = None, *, since: int = 0, timeout: float = 20
    ) -> None:
        """Wait until a message on ``topic`` (with ``payload``) arrived after ``since``."""
        async with asyncio.timeout(timeout):
            while not self.saw(topic, payload, since):
                self._arrived.clear()
                await self._arrived.wait()


@dataclass
class JoinedAgent:
    config: AgentConfig
    proc: subprocess.Popen[bytes] | None = None

    @property
    def agent_id(self) -> str:
        return self.config.agent_id

    @property
    def password(self) -> str:
        secret = self.config.mqtt_password
        assert secret is not None, f"{self.agent_id} got no MQTT password at join"
        return secret.get_secret_value()

    def start(self) -> None:
        log = (self.config.state_dir.parent / f"{self.agent_id}.log").open("ab")
        command = [sys.executable, "-m", "edgefed.cli", "edge", "run", "--state-dir"]
        self.proc = subprocess.Popen(
            [*command, str(self.config.state_dir)],
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def stop(self) -> None:
        if self.proc is not None:
            _stop(self.proc)


@dataclass
class SecuredFleet:
    """The started controller (with its broker) and the agents that joined it."""

    root: Path
    url: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    agents: list[JoinedAgent] = field(default_factory=list)

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def broker_url(self) -> str:
        port = int((self.broker_dir / "port").read_text().strip())
        return f"mqtt://127.0.0.1:{port}"

    @property
    def controller_password(self) -> str:
        return (self.broker_dir / CREDENTIALS_DIR / CONTROLLER_USER).read_text().strip()

    def enrol(self, n: int) -> None:
        """Join ``n`` agents through the API and start them as processes."""
        admin = (self.data_dir / "admin.token").read_text().strip()
        for i in range(n):
            response = httpx.post(
                f"{self.url}/api/v1/join-tokens",
                headers={"Authorization": f"Bearer {admin}"},
                json={"labels": {"site": "row6"}},
                timeout=30,
            )
            response.raise_for_status()
            state = self.root / f"agent{i}"
            config = join(self.url, response.json()["token"], state)
            config = config.model_copy(
                update={
                    "heartbeat_s": 0.5,
                    "telemetry_s": 0.5,
                    "metrics_port": None,
                    "local_endpoint": LocalEndpoint(enabled=False),
                }
            )
            config.save()
            agent = JoinedAgent(config)
            agent.start()
            self.agents.append(agent)


@contextlib.contextmanager
def secured_fleet(root: Path) -> Iterator[SecuredFleet]:
    """The controller with its embedded, authenticating broker; everything stopped on exit (the
    broker too, should the controller die before it could stop it)."""
    root.mkdir(parents=True, exist_ok=True)
    data_dir = root / "controller"
    port = free_port()
    env = _env(
        EDGEFED_FLEET=FLEET,
        EDGEFED_CONTROLLER__DATA_DIR=str(data_dir),
        EDGEFED_CONTROLLER__PORT=str(port),
        EDGEFED_CONTROLLER__MQTT_AUTH__ENABLED="true",
        EDGEFED_CONTROLLER__RATE_LIMIT_PER_MINUTE="100000",
    )
    log = root / "controller.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgefed.cli", "cloud", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    fleet = SecuredFleet(root, f"http://127.0.0.1:{port}", data_dir, proc)
    try:
        _wait_ready(proc, fleet.url, log)
        yield fleet
    finally:
        for agent in fleet.agents:
            agent.stop()
        _stop(proc)
        _reap_broker(data_dir / "broker" / "mosquitto.pid")


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the controller exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"the controller was not ready in 60 s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _reap_broker(pid_file: Path) -> None:
    """SIGKILL the embedded mosquitto if its controller left it running."""
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return
    if b"mosquitto" in cmdline and str(pid_file.parent).encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
