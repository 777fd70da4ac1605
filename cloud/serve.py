"""``edgefed cloud serve``: the control API and the services behind it, in one process.

What runs, all on one asyncio loop:

* the control API (FastAPI under uvicorn; TLS when a certificate is configured);
* the fleet monitor (agent status, heartbeats and telemetry over MQTT, written to the registry);
* the rollout engine with its desired-state publisher (retained desired states per agent);
* the job supervisor (compression jobs, each in its own worker process);
* with ``[controller.split] enabled``, the split placement service (re-plans where each model
  runs per agent from the links agents measure; desired-state changes through the same
  publisher);
* with ``[controller.federation] enabled``, a Flower SuperLink (a supervised child process)
  and the federation service that runs federated learning runs on it;
* with ``[controller.sessions] enabled`` (the default), the session service: conversation
  sessions' directory and replicas, their placement on agents and handoffs between them;
* with pools in ``[controller.autoscaler]``, the pool monitor (workers' load reports) and the
  autoscaler, resizing worker Deployments when ``[controller.kubernetes] enabled``.

The services are built once the API's lifespan has opened the registry (migrations, signing key,
first admin token), so they share its engine. Without ``broker_url`` a private mosquitto is
started beside the controller (persistent, in ``data_dir/broker``) and keeps its port across
restarts, so that agents that joined keep reaching it; agents on other machines need a broker
they can reach (``EDGEFED_BROKER_URL``) and a ``public_url`` they can reach.

SIGTERM and Ctrl-C stop it cleanly: uvicorn stops taking requests, the services are cancelled
(the job supervisor leaves running workers alone only on SIGKILL; on a clean stop it stops
them and their jobs resume at the next start), the MQTT session is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from prometheus_client import CollectorRegistry

from edgefed.cloud.api.app import create_app
from edgefed.cloud.api.state import ControllerState
from edgefed.cloud.brokerauth.files import BrokerAuth, sync_from_registry
from edgefed.cloud.fleet.desired import DesiredStatePublisher
from edgefed.cloud.fleet.metrics import RegistryCollector
from edgefed.cloud.fleet.monitor import FleetMonitor
from edgefed.cloud.gateway import Gateway
from edgefed.cloud.jobs.supervisor import JobSupervisor
from edgefed.cloud.rollout.engine import RolloutEngine
from edgefed.cloud.services import Kickable, Services
from edgefed.cloud.sessions.service import SessionService
from edgefed.cloud.settings import CloudSettings
from edgefed.cloud.split.placements import PlacementService
from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import ConfigError
from edgefed.common.mqtt import MqttClient
from edgefed.common.topics import Topics

if TYPE_CHECKING:
    from edgefed.cloud.federation.service import FederationService

log = logging.getLogger(__name__)

BROKER_PORT_FILE = "port"


@dataclass
class Running:
    """What a started controller exposes to whoever started it (the CLI, tests)."""

    settings: CloudSettings
    state: ControllerState
    services: Services
    url: str
    api: asyncio.Task[None]
    """The API server's task: done once the server stopped (a signal, or :meth:`stop`)."""
    server: uvicorn.Server

    def stop(self) -> None:
        """Ask the API server to stop; the ``controller`` block then winds everything down."""
        self.server.should_exit = True


def embedded_broker(settings: CloudSettings) -> PrivateBroker:
    """A private persistent mosquitto for a controller without ``broker_url``; its port is
    remembered in ``data_dir/broker/port`` so a restart brings it back where agents expect it."""
    data_dir = settings.controller.data_dir / "broker"
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    port_file = data_dir / BROKER_PORT_FILE
    port: int | None = None
    if port_file.is_file():
        try:
            port = int(port_file.read_text().strip())
        except ValueError as exc:
            raise ConfigError(f"{port_file} does not hold a port number; remove it") from exc
    auth = settings.controller.mqtt_auth
    files: BrokerAuth | None = None
    if auth.enabled:
        # The files of the last run are kept until the controller re-renders them from its
        # registry (a few seconds later): agents that joined before are let in meanwhile.
        files = BrokerAuth(auth, settings.fleet, data_dir)
        if not files.password_file.is_file() or not files.acl_file.is_file():
            files.write([])
    broker = PrivateBroker(
        host=settings.controller.embedded_broker_host,
        port=port,
        data_dir=data_dir,
        persistence=True,
        password_file=files.password_file if files else None,
        acl_file=files.acl_file if files else None,
        mosquitto_path=settings.broker.mosquitto_path,
        start_timeout_s=settings.broker.start_timeout_s,
    )
    broker.start()
    port_file.write_text(f"{broker.port}\n")
    return broker


def with_broker_auth(settings: CloudSettings, broker: PrivateBroker | None) -> CloudSettings:
    """With ``mqtt_auth`` on: the embedded broker's pid file as the one to SIGHUP (unless one is
    configured), and the controller's own broker user unless ``[mqtt]`` names one."""
    ctl = settings.controller
    if not ctl.mqtt_auth.enabled:
        return settings
    auth = ctl.mqtt_auth
    if broker is not None and auth.broker_pid_file is None:
        auth = auth.model_copy(update={"broker_pid_file": broker.pid_file})
        ctl = ctl.model_copy(update={"mqtt_auth": auth})
    mqtt = settings.mqtt
    if mqtt.username is None:
        files = BrokerAuth(auth, settings.fleet, ctl.data_dir / "broker")
        user, password = files.controller_credentials()
        mqtt = mqtt.model_copy(update={"username": user, "password": password})
    return settings.model_copy(update={"controller": ctl, "mqtt": mqtt})


async def _wait_started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    while not server.started:
        if task.done():
            task.result()  # uvicorn's own error (port in use, bad certificate...)
            raise ConfigError("the control API stopped while starting (see the log above)")
        await asyncio.sleep(0.05)


def _bound_url(server: uvicorn.Server, settings: CloudSettings) -> str:
    ctl = settings.controller
    scheme = "https" if ctl.tls_cert else "http"
    port = ctl.port
    for srv in getattr(server, "servers", []):
        for sock in srv.sockets:
            port = sock.getsockname()[1]
            break
    return f"{scheme}://{ctl.host}:{port}"


@contextlib.contextmanager
def _no_signal_capture() -> Iterator[None]:
    yield


async def start_federation(
    settings: CloudSettings,
    state: ControllerState,
    tasks: list[asyncio.Task[None]],
    *,
    jobs: Kickable | None = None,
    rollouts: Kickable | None = None,
) -> FederationService:
    """``[controller.federation] enabled``: the Flower SuperLink (started and watched) and the
    federation service running its runs; their tasks are appended to ``tasks``."""
    from edgefed.cloud.federation.closed_loop import LoopSettings
    from edgefed.cloud.federation.runs import FlowerRunner
    from edgefed.cloud.federation.service import FederationService, Promotion
    from edgefed.cloud.federation.superlink import SuperLinkSupervisor

    ctl = settings.controller
    superlink = SuperLinkSupervisor(ctl.federation, ctl.data_dir)
    await asyncio.to_thread(superlink.start)
    tasks.append(asyncio.create_task(superlink.run(), name="flower-superlink"))
    fed = ctl.federation
    service = FederationService(
        state.write_sessions,
        runner=FlowerRunner(superlink.env),
        data_dir=ctl.data_dir,
        superlink=superlink,
        poll_s=fed.poll_s,
        promotion=Promotion(
            LoopSettings(
                max_accuracy_drop=fed.max_accuracy_drop,
                canary_count=fed.canary_count,
                soak_s=fed.canary_soak_s,
            ),
            settings.fleet,
            jobs=jobs,
            rollouts=rollouts,
        )
        if fed.promote
        else None,
    )
    tasks.append(asyncio.create_task(service.run(), name="federation-runs"))
    return service


async def start_sessions(
    settings: CloudSettings,
    state: ControllerState,
    stack: contextlib.AsyncExitStack,
    tasks: list[asyncio.Task[None]],
    *,
    gateway: Gateway | None = None,
    registry: CollectorRegistry | None = None,
) -> SessionService | None:
    """``[controller.sessions] enabled`` (the default): the session service on an MQTT client
    of its own (entered on ``stack``), its sweeper appended to ``tasks``."""
    ctl = settings.controller
    key = state.session_key
    if not ctl.sessions.enabled or key is None:
        return None
    client = MqttClient.from_settings(
        settings, client_id=f"edgefed-sessions-{settings.fleet}-{os.getpid()}"
    )
    await stack.enter_async_context(client)
    service = SessionService(
        client,
        Topics(settings.fleet),
        state.write_sessions,
        key,
        ctl.sessions,
        read_sessions=state.sessions,
        targets=gateway.targets if gateway is not None else None,
        registry=registry,
    )
    await service.start()
    tasks.append(asyncio.create_task(service.run(), name="sessions"))
    log.info("sessions: key %s, default ttl %.0f s", key.fingerprint(), ctl.sessions.default_ttl_s)
    return service


@asynccontextmanager
async def controller(settings: CloudSettings) -> AsyncIterator[Running]:
    """Start everything; yield once the API answers; stop everything when the block ends.

    ``controller.port = 0`` binds a free port (``Running.url`` says which).
    """
    settings = with_broker_auth(settings, None)  # the controller's own broker user, if any
    ctl = settings.controller
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=ctl.host,
        port=ctl.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        ssl_certfile=str(ctl.tls_cert) if ctl.tls_cert else None,
        ssl_keyfile=str(ctl.tls_key) if ctl.tls_key else None,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    # Signals are the caller's business (see serve()): uvicorn would re-raise them on its way out.
    server.capture_signals = _no_signal_capture  # type: ignore[method-assign]
    serving = asyncio.create_task(server.serve(), name="control-api")
    tasks: list[asyncio.Task[None]] = []
    try:
        await _wait_started(server, serving)
        state = app.state.controller
        if not isinstance(state, ControllerState):  # pragma: no cover - lifespan sets it
            raise ConfigError("the control API started without its registry")
        app.state.metrics.registry.register(RegistryCollector(state.sessions, settings.fleet))
        url = _bound_url(server, settings)
        if ctl.public_url is None and ctl.port == 0:
            # A free port was bound: artifact URLs handed to agents must name it.
            ctl = ctl.model_copy(update={"public_url": url})
            settings = settings.model_copy(update={"controller": ctl})
            state.settings = settings
        if state.broker_auth is not None:  # before connecting: the files name our own user
            await asyncio.to_thread(sync_from_registry, state.broker_auth, state.sessions)
        topics = Topics(settings.fleet)
        client = MqttClient.from_settings(
            settings, client_id=f"edgefed-controller-{settings.fleet}"
        )
        # The gateway's request/reply traffic has its own session, apart from fleet control.
        gateway_client = MqttClient.from_settings(
            settings, client_id=f"edgefed-gateway-{settings.fleet}-{os.getpid()}"
        )
        async with client, gateway_client, contextlib.AsyncExitStack() as stack:
            monitor = FleetMonitor(client, topics, state.write_sessions)
            publisher = DesiredStatePublisher(
                client, topics, store=state.artifact_store, public_url=ctl.resolved_public_url
            )
            engine = RolloutEngine(
                state.write_sessions,
                monitor,
                publisher,
                signing_key=state.signing_key,
                tick_s=ctl.rollout_tick_s,
            )
            supervisor = JobSupervisor(
                state.write_sessions,
                database_url=ctl.resolved_database_url,
                store=state.artifact_store,
                signing_key=ctl.resolved_signing_key,
                workers=ctl.job_workers,
                log_dir=ctl.data_dir / "jobs",
            )
            placements: PlacementService | None = None
            if ctl.split.enabled:  # listening before the retained statuses arrive
                placements = PlacementService(
                    ctl.split, state.write_sessions, publisher, store=state.artifact_store
                )
                monitor.add_listener(placements)
            await monitor.start()
            tasks = [
                asyncio.create_task(monitor.run(), name="fleet-monitor"),
                asyncio.create_task(engine.run(), name="rollout-engine"),
                asyncio.create_task(supervisor.run(), name="job-supervisor"),
            ]
            if placements is not None:
                tasks.append(asyncio.create_task(placements.run(), name="split-placements"))
            federation = None
            if ctl.federation.enabled:
                federation = await start_federation(
                    settings, state, tasks, jobs=supervisor, rollouts=engine
                )
            autoscaler = None
            if ctl.autoscaler:  # recommend-only unless [controller.kubernetes] is enabled
                from edgefed.cloud.orchestration.service import start_autoscaling

                autoscaler = await start_autoscaling(
                    settings, client, tasks, registry=app.state.metrics.registry
                )
            gateway = await Gateway.start(gateway_client, settings)
            sessions = await start_sessions(
                settings, state, stack, tasks, gateway=gateway, registry=app.state.metrics.registry
            )
            services = Services(
                jobs=supervisor,
                rollouts=engine,
                fleet=monitor,
                gateway=gateway,
                placements=placements,
                federation=federation,
                autoscaler=autoscaler,
                sessions=sessions,
            )
            app.state.services = services
            log.info("controller for fleet %s serving at %s", settings.fleet, url)
            yield Running(
                settings=settings,
                state=state,
                services=services,
                url=url,
                api=serving,
                server=server,
            )
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            tasks = []
    finally:
        for task in tasks:
            task.cancel()
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving


async def serve(
    settings: CloudSettings, *, on_ready: Callable[[Running], None] | None = None
) -> None:
    """Run the controller until SIGTERM or SIGINT, then stop everything cleanly (a signal that
    arrives while it is still starting stops it as soon as it has started)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with controller(settings) as running:
            if on_ready is not None:
                on_ready(running)
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait([running.api, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            running.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.info("controller stopped")


def run_forever(
    settings: CloudSettings, *, on_ready: Callable[[Running], None] | None = None
) -> None:
    """``edgefed cloud serve``: start a private broker when none is configured, then serve."""
    broker: PrivateBroker | None = None
    if settings.broker_url is None:
        broker = embedded_broker(settings)
        settings = settings.model_copy(update={"broker_url": broker.url})
        log.info("started a private mosquitto for this controller at %s", broker.url)
    settings = with_broker_auth(settings, broker)
    try:
        asyncio.run(serve(settings, on_ready=on_ready))
    finally:
        if broker is not None:
            broker.stop()


def pid_file(settings: CloudSettings) -> Path:
    return settings.controller.data_dir / "controller.pid"


def write_pid(settings: CloudSettings) -> None:
    pid_file(settings).write_text(f"{os.getpid()}\n")
