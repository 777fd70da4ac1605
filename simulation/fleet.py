"""A whole fleet on one machine, with real processes and emulated links: the simulation
harness's orchestrator.

``async with Fleet(spec) as fleet:`` starts, in this order, and stops in reverse:

1. a private mosquitto (persistence on, so :meth:`Fleet.restart_broker` keeps sessions);
2. the controller, ``edgefed cloud serve``, with SQLite in a temporary data directory;
3. the models of the spec, signed with the controller's own key, published into its artifact
   store and registered through its API;
4. cloud workers, ``edgefed cloud worker``, per pool (a pool with ``autoscale`` is then resized
   by the controller's autoscaler, run here on the harness's loop with its own pool monitor,
   through :class:`~edgefed.simulation.process_scaler.ProcessWorkerScaler`);
5. the agents, each enrolled with a join token of its own and reaching the broker *and* the
   controller through two :class:`~edgefed.simulation.linkproxy.LinkProxy` of its own, shaped
   by its site's link profile -- so real bytes cross shaped sockets. Agents are ``edgefed edge
   run`` processes (``mode="processes"``) or :class:`~edgefed.edge.agent.Agent` objects on the
   harness's event loop (``mode="in-process"``, for large fleets);
6. a deployment of every model to every agent, through the controller's API.

**Artifact downloads cross the agent's link too.** The controller hands out absolute artifact
URLs (its public URL), so a process agent gets its controller proxy as ``http_proxy``: httpx then
sends ``GET http://controller/...`` (absolute form, which RFC 9112 requires servers to accept)
over the proxy's shaped socket. In-process agents share the harness's environment, so their
downloads go straight to the controller; their MQTT traffic is shaped all the same.

**Emulated compute** is honest: an agent's ``emulated_speed_factor`` is its device profile's
speed factor; it really runs the model, then waits ``(factor - 1) x`` the measured run time
(profiles faster than this host run at host speed).

**Faults** are methods that record a :class:`FleetEvent`: :meth:`kill_agent` (SIGKILL; in
process: its links are reset, then its task cancelled, so the broker fires its last will),
:meth:`restart_agent`, :meth:`cut_link` / :meth:`restore_link` (a site or one agent),
:meth:`slow_agent` (a process agent is restarted gracefully with the new factor in its
configuration, as a device swap would; an in-process agent changes at once),
:meth:`restart_broker` (same port), :meth:`kill_controller` / :meth:`restart_controller`.

**Cleanup always**: see :mod:`edgefed.simulation.procs` (process groups, ``PR_SET_PDEATHSIG``,
a watchdog process). SIGINT cancels the task running the fleet (``asyncio.run`` does that) and
SIGTERM does the same while a fleet runs on the main thread, so the ``async with`` block exits
and stops everything in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from edgefed.cloud.compress.publish import artifact_dir, graph_specs
from edgefed.common.artifact import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    SigningKey,
    load_signing_key,
    write_artifact,
)
from edgefed.common.broker import PrivateBroker, free_port
from edgefed.common.devices import load_profile
from edgefed.common.errors import EdgefedError, PayloadError, PermanentError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import (
    AgentState,
    AgentStatus,
    Decoded,
    InferenceReply,
    InferenceRequest,
    decode,
)
from edgefed.common.settings import Settings, load_settings
from edgefed.common.topics import Topics
from edgefed.edge.agent import Agent
from edgefed.edge.config import AgentConfig, LocalEndpoint, OffloadConfig
from edgefed.edge.join import join
from edgefed.simulation.fleet_spec import AgentSpec, FleetSpec, ModelSpec
from edgefed.simulation.linkproxy import LinkProfile, LinkProxy
from edgefed.simulation.process_scaler import ProcessWorkerScaler
from edgefed.simulation.procs import Child, Supervisor, child_env

if TYPE_CHECKING:
    from edgefed.cloud.orchestration.service import AutoscaleService

log = logging.getLogger(__name__)

__all__ = ["Fleet", "FleetAgent", "FleetError", "FleetEvent"]

_CLI = [sys.executable, "-m", "edgefed.cli"]
SIM_LABEL = "sim.fleet"
"""Label every agent of a fleet carries (its deployments select on it)."""
_FAILED_DEPLOYMENT = {"aborted", "rolled_back"}


_API_ATTEMPTS = 4
"""Tries of a read from the control API before the fleet gives up."""


class FleetError(PermanentError):
    """The fleet could not start, or a fault names something it does not have."""

    exit_code = 70  # EX_SOFTWARE


@dataclass(frozen=True, slots=True)
class FleetEvent:
    """Something the harness did to the fleet, with when it happened."""

    t: float
    """Seconds since the fleet started (monotonic clock)."""
    wall: float
    """``time.time()`` of the event."""
    kind: str
    """``agent.kill``, ``agent.restart``, ``link.cut``, ``link.restore``, ``agent.slow``,
    ``broker.restart``, ``controller.kill``, ``controller.restart``, ``fleet.ready``, ..."""
    target: str
    detail: str = ""


@dataclass(eq=False)
class FleetAgent:
    """One agent of the fleet and its two links."""

    spec: AgentSpec
    agent_id: str
    config: AgentConfig
    broker_link: LinkProxy
    controller_link: LinkProxy
    child: Child | None = None
    """Process mode: the ``edgefed edge run`` process."""
    agent: Agent | None = None
    """In-process mode: the running agent object."""
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event | None = None
    link_cut: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def links(self) -> tuple[LinkProxy, LinkProxy]:
        return self.broker_link, self.controller_link

    @property
    def running(self) -> bool:
        if self.child is not None:
            return self.child.running
        return self.task is not None and not self.task.done()


@dataclass
class _Controller:
    child: Child
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Fleet:
    """Broker, controller, workers and agents of ``spec`` on this machine (see the module doc).

    ``root``: where state and logs go (a temporary directory, removed at exit unless ``keep``).
    ``handle_sigterm``: while the fleet runs on the main thread, SIGTERM cancels the task that
    entered it, so everything is stopped in order (off: the caller handles SIGTERM).
    """

    def __init__(
        self,
        spec: FleetSpec,
        *,
        root: Path | None = None,
        keep: bool = False,
        grace_s: float = 10.0,
        ready_timeout_s: float = 120.0,
        handle_sigterm: bool = True,
        on_event: Callable[[FleetEvent], None] | None = None,
    ) -> None:
        self.spec = spec
        self._own_root = root is None
        self.root = root if root is not None else Path(tempfile.mkdtemp(prefix="edgefed-sim-"))
        self.keep = keep
        self.grace_s = grace_s
        self.ready_timeout_s = ready_timeout_s
        self.handle_sigterm = handle_sigterm
        self.on_event = on_event
        self.topics = Topics(spec.fleet)
        self.events: list[FleetEvent] = []
        self.agents: dict[str, FleetAgent] = {}
        """Agent name -> agent, in the order of the spec."""
        self._supervisor = Supervisor(self.root / "logs", grace_s=min(grace_s, 5.0))
        self.worker_processes = ProcessWorkerScaler(
            self._supervisor,
            self._worker_command,
            grace_s=min(grace_s, 5.0),
            on_change=lambda pool, what: self.record("pool.scale", pool, what),
        )
        """The pools' worker processes (and the scaler the autoscaler resizes them with)."""
        self.autoscaler: AutoscaleService | None = None
        """Running when a pool has ``autoscale``."""
        self._autoscaling: asyncio.Task[None] | None = None
        self.model_versions: dict[str, int] = {}
        """Model name -> the newest version published by the fleet."""
        self.deployments: dict[str, int] = {}
        """Model name -> id of its latest deployment."""
        self.statuses: dict[str, AgentState] = {}
        """Agent id -> the state of its latest retained status."""
        self.broker: PrivateBroker | None = None
        self.device_broker: PrivateBroker | None = None
        """With ``spec.local_endpoints``: the loopback broker standing in for the devices'."""
        self._local_mqtt: MqttClient | None = None
        self._local_requester: Requester | None = None
        self._controller: _Controller | None = None
        self._mqtt: MqttClient | None = None
        self._requester: Requester | None = None
        self._http: httpx.AsyncClient | None = None
        self._signing_key: SigningKey | None = None
        self._started = 0.0
        self._sigterm_installed = False

    # ------------------------------------------------------------------ what users read

    @property
    def broker_url(self) -> str:
        if self.broker is None:
            raise FleetError("the fleet has no broker yet")
        return self.broker.url

    @property
    def controller_url(self) -> str:
        if self._controller is None:
            raise FleetError("the fleet has no controller yet")
        return self._controller.url

    @property
    def data_dir(self) -> Path:
        return self.root / "controller"

    @property
    def store(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    @property
    def settings(self) -> Settings:
        """Settings of a client talking straight to the fleet's broker (the cloud side)."""
        return load_settings(
            broker_url=self.broker_url,
            fleet=self.spec.fleet,
            mqtt={"backoff_initial_s": 0.05, "backoff_max_s": 0.5, "connect_timeout_s": 5.0},
        )

    @property
    def controller_pid(self) -> int | None:
        return self._controller.child.pid if self._controller is not None else None

    def agent(self, name_or_id: str) -> FleetAgent:
        """An agent by its name in the spec or by the id the controller gave it."""
        found = self.agents.get(name_or_id)
        if found is None:
            found = next((a for a in self.agents.values() if a.agent_id == name_or_id), None)
        if found is None:
            known = ", ".join(self.agents) or "none"
            raise FleetError(f"the fleet has no agent {name_or_id!r} (agents: {known})")
        return found

    def pids(self) -> list[int]:
        """Every process the fleet runs now (broker, controller, workers, agents, watchdog)."""
        pids = [c.pid for c in self._supervisor.children if c.running and c.pid is not None]
        if self.broker is not None and self.broker.pid is not None and self.broker.running:
            pids.append(self.broker.pid)
        if self._supervisor.watchdog_pid is not None:
            pids.append(self._supervisor.watchdog_pid)
        return pids

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Fleet:
        self._started = time.monotonic()
        self._install_sigterm()
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _install_sigterm(self) -> None:
        if not self.handle_sigterm or threading.current_thread() is not threading.main_thread():
            return
        task = asyncio.current_task()
        if task is None:
            return
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            self._sigterm_installed = True

    async def _start(self) -> None:
        spec = self.spec
        self.root.mkdir(parents=True, exist_ok=True)
        self._supervisor.start()
        self.broker = PrivateBroker(data_dir=self.root / "broker", persistence=True)
        await asyncio.to_thread(self.broker.start)
        assert self.broker.pid is not None
        self._supervisor.watch(self.broker.pid)
        await self._start_controller()
        self._http = httpx.AsyncClient(
            base_url=f"{self.controller_url}/api/v1",
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=30.0,
            # Drop idle connections well before uvicorn closes them (5 s): a request sent on a
            # connection the server is closing fails with "Server disconnected".
            limits=httpx.Limits(keepalive_expiry=2.0),
        )
        await self._start_observer()
        self._signing_key = load_signing_key(self.data_dir / "signing.key")
        for model in spec.models:
            await self.publish_model(model)
            if model.split_points:
                await self._publish_split(model)
        if spec.local_endpoints:
            await self._start_device_broker()
        for pool in spec.pools:
            for _ in range(pool.workers):
                await self._start_worker(pool.name, spec.pool_models(pool))
        await self._start_autoscaling()
        for index, agent_spec in enumerate(spec.agents):
            await self._add_agent(agent_spec, index)
        await self.wait_online(list(self.agents))
        for model in spec.models:
            if model.deploy and self.agents:
                await self.deploy(model.name, self.model_versions[model.name])
        self.record("fleet.ready", spec.fleet, f"{len(self.agents)} agents, mode {spec.mode}")

    async def aclose(self) -> None:
        """Stop everything (also after a failed or cancelled start); safe to call twice."""
        try:
            await self._stop_everything()
        finally:
            self._supervisor.close()  # whatever is still running is killed here, synchronously
            for broker in (self.broker, self.device_broker):
                if broker is not None:
                    if broker.pid is not None:
                        self._supervisor.unwatch(broker.pid)
                    broker.close()
            if self._sigterm_installed:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)
                self._sigterm_installed = False
            if self._own_root and not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)

    async def _stop_everything(self) -> None:
        if self._autoscaling is not None:
            self._autoscaling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._autoscaling
            self._autoscaling = None
        await self.worker_processes.wait_stopped()  # workers a scale-down is still stopping
        stops = [a.stop for a in self.agents.values() if a.stop is not None]
        for stop in stops:
            stop.set()
        tasks = [a.task for a in self.agents.values() if a.task is not None and not a.task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.grace_s)
            for task in pending:
                task.cancel()
            if pending:  # bounded: a task that ignores its cancellation must not hang the exit
                _, stuck = await asyncio.wait(pending, timeout=self.grace_s)
                for task in stuck:
                    log.warning("%s did not stop; leaving it", task.get_name())
        agent_children = [a.child for a in self.agents.values() if a.child is not None]
        await asyncio.gather(*(c.stop(self.grace_s) for c in agent_children))
        await self._supervisor.stop_all(self.grace_s)
        for client in (self._mqtt, self._local_mqtt):
            if client is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.aclose(), 5.0)
        self._mqtt = self._local_mqtt = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None
        for agent in self.agents.values():
            for link in agent.links:
                await link.close()

    # ------------------------------------------------------------------ events

    def record(self, kind: str, target: str, detail: str = "") -> FleetEvent:
        event = FleetEvent(time.monotonic() - self._started, time.time(), kind, target, detail)
        self.events.append(event)
        log.info("fleet event %s %s %s", kind, target, detail)
        if self.on_event is not None:
            self.on_event(event)
        return event

    # ------------------------------------------------------------------ the controller

    def _controller_child(self) -> _Controller:
        port = free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = child_env(
            EDGEFED_BROKER_URL=self.broker_url,
            EDGEFED_FLEET=self.spec.fleet,
            EDGEFED_LOG_FORMAT="plain",
            EDGEFED_MQTT__BACKOFF_MAX_S="0.5",
            EDGEFED_CONTROLLER__DATA_DIR=str(self.data_dir),
            EDGEFED_CONTROLLER__PORT=str(port),
            EDGEFED_CONTROLLER__ROLLOUT_TICK_S="0.2",
            EDGEFED_CONTROLLER__RATE_LIMIT_PER_MINUTE="1000000",
        )
        env.update(_controller_env(self.spec.controller))
        child = self._supervisor.child("controller", [*_CLI, "cloud", "serve"], env)
        return _Controller(child, port, self.data_dir)

    async def _start_controller(self) -> None:
        if self._controller is None:
            self._controller = self._controller_child()
        ctl = self._controller
        ctl.child.start()
        deadline = time.monotonic() + self.ready_timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not ctl.child.running:
                    raise FleetError(f"the controller exited at start:\n{ctl.child.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{ctl.url}/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise FleetError(f"the controller was not ready in {self.ready_timeout_s:.0f} s")

    async def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the control API as admin (``path`` under ``/api/v1``); the decoded answer."""
        if self._http is None:
            raise FleetError("the fleet is not running")
        for attempt in range(_API_ATTEMPTS):
            try:
                response = await self._http.request(method, path, **kwargs)
                break
            except (httpx.RemoteProtocolError, httpx.ConnectError) as exc:
                # Reads are safe to repeat; a controller busy serving a hundred downloads may
                # drop a kept-alive connection. Writes are not retried (not idempotent).
                if method.upper() != "GET" or attempt == _API_ATTEMPTS - 1:
                    raise FleetError(f"{method} {path}: {exc!r}") from exc
                await asyncio.sleep(0.2 * (attempt + 1))
        if response.status_code >= 300:
            raise FleetError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json() if response.content else None

    # ------------------------------------------------------------------ models

    async def publish_model(self, model: ModelSpec, version: int | None = None) -> int:
        """Sign ``model.source`` with the controller's key into its store as ``version`` (the
        spec's for the first, else the next one) and register it; the version."""
        if self._signing_key is None:
            raise FleetError("the fleet is not running")
        known = self.model_versions.get(model.name)
        version = version or (model.version if known is None else known + 1)
        dest = artifact_dir(self.store, model.name, version, model.target)
        await asyncio.to_thread(_sign_into, model, dest, version, self._signing_key)
        if known is None:
            await self.api(
                "POST",
                "/models",
                json={"name": model.name, "task": model.task, "teacher_dir": str(model.source)},
            )
        await self.api("POST", f"/models/{model.name}/versions", json={"version": version})
        self.model_versions[model.name] = version
        return version

    async def deploy(
        self,
        model: str,
        version: int,
        *,
        agents: list[str] | None = None,
        strategy: dict[str, Any] | None = None,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Deploy ``model`` v``version`` (to ``agents``, names or ids; default every agent);
        with ``wait``, until the deployment completes (FleetError if it aborts)."""
        target = next((m.target for m in self.spec.models if m.name == model), "x86-avx2")
        selector: dict[str, Any] = {"labels": {SIM_LABEL: self.spec.fleet}}
        if agents is not None:
            selector = {"agents": [self.agent(a).agent_id for a in agents]}
        body = {
            "model": model,
            "version": version,
            "target": target,
            "selector": selector,
            "strategy": strategy or {"kind": "all-at-once", "soak_s": 0},
        }
        dep = await self.api("POST", "/deployments", json=body)
        self.deployments[model] = int(dep["id"])
        self.record("deploy", model, f"v{version} deployment {dep['id']}")
        if not wait:
            return dict(dep)
        return await self.wait_deployment(int(dep["id"]))

    async def wait_deployment(
        self, dep_id: int, statuses: frozenset[str] = frozenset({"completed"})
    ) -> dict[str, Any]:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            dep = await self.api("GET", f"/deployments/{dep_id}")
            if dep["status"] in statuses:
                return dict(dep)
            if dep["status"] in _FAILED_DEPLOYMENT - statuses:
                raise FleetError(f"deployment {dep_id} ended {dep['status']}: {dep}")
            if time.monotonic() > deadline:
                raise FleetError(f"deployment {dep_id} stuck in {dep['status']}")
            await asyncio.sleep(0.2)

    async def _publish_split(self, model: ModelSpec) -> None:
        """``edgefed split publish`` into the controller's store and registry (the command an
        operator runs on the controller host), for the model's first version."""
        assert model.split_source is not None
        argv = [
            *_CLI,
            "split",
            "publish",
            str(model.split_source),
            "--name",
            model.name,
            "--version",
            str(self.model_versions[model.name]),
            "--split-points",
            ",".join(map(str, model.split_points)),
            "--target",
            model.target,
        ]
        env = child_env(
            EDGEFED_FLEET=self.spec.fleet,
            EDGEFED_LOG_FORMAT="plain",
            EDGEFED_CONTROLLER__DATA_DIR=str(self.data_dir),
            HF_HUB_OFFLINE="1",
        )
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            tail = output.decode(errors="replace")[-2000:]
            raise FleetError(f"split publish of {model.name} failed ({proc.returncode}):\n{tail}")
        self.record("split.publish", model.name, f"k={model.split_points}")

    # ------------------------------------------------------------------ workers

    @property
    def workers(self) -> dict[str, list[Child]]:
        """Pool name -> its running worker processes."""
        return {
            pool: [p.child for p in self.worker_processes.running(pool)]
            for pool in (p.name for p in self.spec.pools)
        }

    def _worker_command(self, pool: str, index: int, port: int) -> tuple[list[str], dict[str, str]]:
        spec = next(p for p in self.spec.pools if p.name == pool)
        models = self.spec.pool_models(spec)
        argv = [*_CLI, "cloud", "worker", "--pool", pool, "--store", str(self.store)]
        for name in models:
            argv += ["--model", name]
        env = child_env(
            EDGEFED_BROKER_URL=self.broker_url,
            EDGEFED_FLEET=self.spec.fleet,
            EDGEFED_LOG_FORMAT="plain",
            EDGEFED_MQTT__BACKOFF_MAX_S="0.5",
            EDGEFED_CONTROLLER__DATA_DIR=str(self.data_dir),
            EDGEFED_WORKER__INTRA_OP_THREADS="1",
            EDGEFED_WORKER__TARGET=next(
                (m.target for m in self.spec.models if m.name == models[0]), "x86-avx2"
            ),
            EDGEFED_WORKER__METRICS_HOST="127.0.0.1",
            EDGEFED_WORKER__METRICS_PORT=str(port),
        )
        if spec.autoscale is not None:  # a few reports per decision interval
            report_s = min(5.0, spec.autoscale.interval_s / 2)
            env["EDGEFED_WORKER__LOAD_REPORT_S"] = f"{report_s:g}"
        return argv, env

    async def _start_worker(self, pool: str, models: list[str]) -> Child:
        child = self.worker_processes.start_one(pool).child
        await self._wait_answers(child, self.topics.worker_infer(pool), models[0])
        return child

    async def _start_autoscaling(self) -> None:
        """Pools with ``autoscale``: the controller's autoscaler, on this loop, with a pool
        monitor of its own on the fleet's broker, resizing the pools' worker processes."""
        pools = {p.name: p.autoscale for p in self.spec.pools if p.autoscale is not None}
        if not pools or self._mqtt is None:
            return
        # Imported here: the autoscaler's forecasting pulls statsmodels, which fleets without
        # an autoscaled pool (the demo) do not need.
        from edgefed.cloud.orchestration.pool_monitor import PoolMonitor
        from edgefed.cloud.orchestration.service import AutoscaleService

        monitor = PoolMonitor(self._mqtt, self.topics)
        await monitor.start()
        self.autoscaler = AutoscaleService(pools, monitor, self.worker_processes)
        self._autoscaling = asyncio.create_task(self.autoscaler.run(), name="autoscaler")
        self.record("autoscaler.start", ",".join(pools), "harness-run, worker processes")

    async def _wait_answers(self, child: Child, topic: str, model: str) -> None:
        """Until a request on ``topic`` is answered (the worker has loaded its models)."""
        assert self._requester is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if not child.running:
                raise FleetError(f"{child.name} exited at start:\n{child.log_tail()}")
            with contextlib.suppress(EdgefedError):
                await self._requester.request(
                    topic, InferenceRequest(model=model, texts=["ping"]), InferenceReply, timeout=1
                )
                return
            await asyncio.sleep(0.2)
        raise FleetError(f"{child.name} answered no request in {self.ready_timeout_s:.0f} s")

    # ------------------------------------------------------------------ agents

    async def _start_observer(self) -> None:
        client = MqttClient.from_settings(self.settings, client_id=f"sim-{self.spec.fleet}")
        await client.__aenter__()
        self._mqtt = client
        self._requester = Requester(client, self.topics)

        async def on_status(message: Message) -> None:
            with contextlib.suppress(PayloadError):
                status = decode(message.payload, message.content_type, AgentStatus).message
                self.statuses[status.agent_id] = status.state

        await client.subscribe(f"{self.topics.prefix}/agents/+/status", on_status)

    async def _add_agent(self, spec: AgentSpec, index: int) -> FleetAgent:
        assert self.broker is not None
        assert self._controller is not None
        profile = self.spec.link(spec.site)
        seed = None if self.spec.seed is None else self.spec.seed * 100_003 + index * 2
        broker_link = LinkProxy(self.broker.host, self.broker.port, profile, seed=seed)
        controller_link = LinkProxy(
            "127.0.0.1", self._controller.port, profile, seed=None if seed is None else seed + 1
        )
        await broker_link.start()
        await controller_link.start()
        labels = {**spec.labels, "site": spec.site, "sim.name": spec.name}
        labels[SIM_LABEL] = self.spec.fleet
        token = (await self.api("POST", "/join-tokens", json={"labels": labels}))["token"]
        link_url = f"http://127.0.0.1:{controller_link.port}"
        state_dir = self.root / "agents" / spec.name
        # join() is synchronous; its bytes cross the proxy, which runs on this loop.
        config = await asyncio.to_thread(
            join, link_url, token, state_dir, labels=labels, device_profile=spec.device
        )
        config = config.model_copy(
            update={
                "broker_url": f"mqtt://127.0.0.1:{broker_link.port}",
                "heartbeat_s": self.spec.heartbeat_s,
                "telemetry_s": self.spec.telemetry_s,
                "metrics_port": None,
                "providers": ["CPUExecutionProvider"],
                "emulated_speed_factor": load_profile(spec.device).speed_factor,
            }
        )
        config.local_endpoint = LocalEndpoint(
            enabled=self.device_broker is not None,
            broker_url=self.device_broker.url if self.device_broker is not None else None,
        )
        if self.spec.offload:
            config.offload = OffloadConfig.model_validate(
                {**config.offload.model_dump(), **self.spec.offload}
            )
        config.save()
        agent = FleetAgent(spec, config.agent_id, config, broker_link, controller_link)
        self.agents[spec.name] = agent
        self._launch(agent)
        return agent

    def _launch(self, agent: FleetAgent) -> None:
        if self.spec.mode == "processes":
            if agent.child is None:
                link_url = f"http://127.0.0.1:{agent.controller_link.port}"
                env = child_env(
                    EDGEFED_LOG_FORMAT="plain",
                    EDGEFED_MQTT__BACKOFF_MAX_S="0.5",
                    EDGEFED_MQTT__BACKOFF_INITIAL_S="0.05",
                    http_proxy=link_url,
                    HTTP_PROXY=link_url,
                )
                argv = [*_CLI, "edge", "run", "--state-dir", str(agent.config.state_dir)]
                agent.child = self._supervisor.child(f"agent-{agent.name}", argv, env)
            agent.child.start()
            return
        settings = load_settings(
            fleet=self.spec.fleet,
            mqtt={"backoff_initial_s": 0.05, "backoff_max_s": 0.5},
        )
        agent.agent = Agent(agent.config, settings)
        agent.stop = asyncio.Event()
        agent.task = asyncio.create_task(agent.agent.run(agent.stop), name=f"agent-{agent.name}")

    async def wait_online(self, names: list[str], timeout_s: float | None = None) -> None:
        """Until every agent in ``names`` has announced itself online (retained status)."""
        deadline = time.monotonic() + (timeout_s or self.ready_timeout_s)
        while True:
            waiting = [
                n for n in names if self.statuses.get(self.agent(n).agent_id) != AgentState.ONLINE
            ]
            if not waiting:
                return
            for name in waiting:
                agent = self.agent(name)
                if agent.child is not None and not agent.child.running:
                    raise FleetError(f"agent {name} exited:\n{agent.child.log_tail()}")
                if agent.task is not None and agent.task.done():
                    raise FleetError(f"agent {name} stopped: {agent.task.exception()!r}")
            if time.monotonic() > deadline:
                raise FleetError(f"agents not online in time: {', '.join(waiting)}")
            await asyncio.sleep(0.05)

    async def infer(
        self, name: str, texts: list[str], *, model: str, timeout_s: float = 10.0
    ) -> InferenceReply:
        """One request to agent ``name`` over MQTT (from the cloud side of its link)."""
        if self._requester is None:
            raise FleetError("the fleet is not running")
        topic = self.topics.agent_infer(self.agent(name).agent_id)
        reply = await self._requester.request(
            topic, InferenceRequest(model=model, texts=texts), InferenceReply, timeout=timeout_s
        )
        return reply.message

    async def _start_device_broker(self) -> None:
        broker = PrivateBroker(data_dir=self.root / "device-broker")
        await asyncio.to_thread(broker.start)
        self.device_broker = broker
        assert broker.pid is not None
        self._supervisor.watch(broker.pid)
        client = MqttClient.from_settings(
            self.settings.model_copy(update={"broker_url": broker.url}),
            client_id=f"sim-apps-{self.spec.fleet}",
        )
        await client.__aenter__()
        self._local_mqtt = client
        self._local_requester = Requester(client, self.topics)

    async def local_request(
        self, name: str, request: InferenceRequest, *, timeout_s: float
    ) -> Decoded[InferenceReply]:
        """``request`` as an application on agent ``name``'s device sends it: to the agent's
        local endpoint, whose router runs it there, on a pool or split (needs
        ``spec.local_endpoints``). Error replies raise :class:`RemoteError`; no answer in
        ``timeout_s`` raises :class:`RequestTimeout`."""
        if self._local_requester is None:
            raise FleetError("the fleet's agents have no local endpoints (spec.local_endpoints)")
        topic = self.topics.agent_infer(self.agent(name).agent_id)
        return await self._local_requester.request(
            topic, request, InferenceReply, timeout=timeout_s
        )

    # ------------------------------------------------------------------ faults

    async def kill_agent(self, name: str) -> None:
        """Crash an agent: SIGKILL (process) or reset links and cancel (in process)."""
        agent = self.agent(name)
        if agent.child is not None:
            await agent.child.kill()
        elif agent.task is not None:
            for link in agent.links:
                link.cut()  # resets its sockets: the broker sees a dead client, fires the will
            agent.task.cancel()
            await asyncio.wait([agent.task], timeout=self.grace_s)
            if not agent.link_cut:
                for link in agent.links:
                    link.restore()
        self.record("agent.kill", agent.name, agent.agent_id)

    async def restart_agent(self, name: str, *, wait: bool = True) -> None:
        """Start an agent again (stopping it gracefully first when it runs)."""
        agent = self.agent(name)
        await self._stop_agent(agent)
        self._launch(agent)
        self.record("agent.restart", agent.name, agent.agent_id)
        if wait and not agent.link_cut:
            self.statuses.pop(agent.agent_id, None)
            await self.wait_online([agent.name])

    async def stop_agent(self, name: str) -> None:
        """Stop an agent gracefully (SIGTERM: it drains and says goodbye)."""
        agent = self.agent(name)
        await self._stop_agent(agent)
        self.record("agent.stop", agent.name, agent.agent_id)

    async def _stop_agent(self, agent: FleetAgent) -> None:
        if agent.child is not None:
            await agent.child.stop(self.grace_s)
        elif agent.task is not None and agent.stop is not None:
            agent.stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(agent.task, return_exceptions=True), 10)

    def _links_of(self, target: str) -> list[FleetAgent]:
        at_site = [a for a in self.agents.values() if a.spec.site == target]
        return at_site or [self.agent(target)]

    def cut_link(self, target: str) -> None:
        """Cut the links of a site (every agent there) or of one agent (name or id)."""
        agents = self._links_of(target)
        for agent in agents:
            agent.link_cut = True
            for link in agent.links:
                link.cut()
        self.record("link.cut", target, ", ".join(a.name for a in agents))

    def restore_link(self, target: str) -> None:
        agents = self._links_of(target)
        for agent in agents:
            agent.link_cut = False
            for link in agent.links:
                link.restore()
        self.record("link.restore", target, ", ".join(a.name for a in agents))

    def shape_link(self, target: str, profile: LinkProfile) -> None:
        """Change the link profile of a site or an agent (applies to bytes read from now on)."""
        agents = self._links_of(target)
        for agent in agents:
            for link in agent.links:
                link.profile = profile
        self.record("link.shape", target, profile.model_dump_json())

    async def slow_agent(self, name: str, factor: float) -> None:
        """Make an agent's device ``factor`` times slower than this host (see the module doc:
        a process agent restarts with the new factor; an in-process one changes at once)."""
        agent = self.agent(name)
        # Validated like the file the agent reads: a bad factor is refused naming the field.
        config = AgentConfig.model_validate(
            {**agent.config.model_dump(), "emulated_speed_factor": factor}
        )
        agent.config = config
        config.save()
        if agent.agent is not None and agent.running:
            agent.agent.batcher.slowdown = factor
        elif agent.child is not None and agent.child.running:
            await agent.child.stop(self.grace_s)
            agent.child.start()
            if not agent.link_cut:
                self.statuses.pop(agent.agent_id, None)
                await self.wait_online([agent.name])
        self.record("agent.slow", agent.name, f"factor {factor:g}")

    async def restart_broker(self, down_s: float = 0.0) -> None:
        """Stop the broker, wait ``down_s``, start it on the same port (sessions persist)."""
        if self.broker is None:
            raise FleetError("the fleet has no broker")
        old = self.broker.pid
        await asyncio.to_thread(self.broker.stop)
        if old is not None:
            self._supervisor.unwatch(old)
        self.record("broker.stop", "broker")
        if down_s:
            await asyncio.sleep(down_s)
        await asyncio.to_thread(self.broker.start)
        assert self.broker.pid is not None
        self._supervisor.watch(self.broker.pid)
        self.record("broker.restart", "broker", f"port {self.broker.port}")

    async def kill_controller(self) -> None:
        if self._controller is None:
            raise FleetError("the fleet has no controller")
        await self._controller.child.kill()
        self.record("controller.kill", "controller")

    async def restart_controller(self) -> None:
        """Start the controller again on the same port and data (after a kill, or stopping it
        gracefully first)."""
        if self._controller is None:
            raise FleetError("the fleet has no controller")
        await self._controller.child.stop(self.grace_s)
        await self._start_controller()
        self.record("controller.restart", "controller")


def _controller_env(settings: dict[str, Any]) -> dict[str, str]:
    """``[controller]`` settings as ``EDGEFED_CONTROLLER__KEY`` variables (JSON for tables and
    lists, which the settings loader parses)."""
    return {
        f"EDGEFED_CONTROLLER__{key.upper()}": value if isinstance(value, str) else json.dumps(value)
        for key, value in settings.items()
    }


def _sign_into(model: ModelSpec, dest: Path, version: int, key: SigningKey) -> None:
    """Copy an exported model folder to ``dest`` and sign it as ``model`` v``version``."""
    if (dest / MANIFEST_NAME).exists():
        raise FleetError(f"{model.name} v{version} is already published at {dest}")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(
        model.source, dest, ignore=shutil.ignore_patterns(MANIFEST_NAME, SIGNATURE_NAME)
    )
    inputs, outputs, opset = graph_specs(dest / "model.onnx")
    write_artifact(
        dest,
        name=model.name,
        version=version,
        task=model.task,
        target=model.target,
        signing_key=key,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
    )
