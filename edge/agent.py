"""The edge agent: restore installed models, then serve, reconcile and report, on two links.

Start-up order matters for autonomy: the installed models are verified and loaded from disk
before any network, then the local endpoint (a broker on the device) starts serving, and only
then does the agent reach for the cloud broker, which may be down for as long as it likes.

* cloud link: retained ``online`` status (re-published on every reconnect) backed by a last will
  that says ``offline``; the retained desired state; inference requests from the cloud;
  heartbeats (when connected); telemetry from the on-disk outbox;
* local link: the same inference topic, for applications on the device. Their requests go
  through the offload router (:mod:`edgefed.edge.offload`): the agent's model, cloud worker
  pools or split execution, as the desired state's placements and ``offload`` settings allow.
  Requests on the cloud link are served here and never offloaded again (no loops).

Heartbeats carry the uplink the agent measured (:mod:`edgefed.edge.linkmeter`): the RTT of
their own QoS 1 probe and the bandwidth of artifact downloads and split activations.

On ``metrics_port`` the agent serves ``/metrics``, ``/livez`` and ``/readyz``
(:mod:`edgefed.common.probes`), from before the installed models are restored: readiness
(:mod:`edgefed.edge.readiness`) waits for the broker and for every desired model, warmed up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from edgefed import __version__
from edgefed.common.artifact import Manifest, VerifyKey
from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import PayloadError
from edgefed.common.mqtt import Message, MqttClient, Will
from edgefed.common.probes import ProbeServer
from edgefed.common.rpc import ReplyCache, serve
from edgefed.common.schemas import (
    AgentState,
    AgentStatus,
    DesiredModel,
    DesiredState,
    Heartbeat,
    InferenceRequest,
    Telemetry,
    TelemetryRecord,
    decode,
)
from edgefed.common.serving.runtime import OnnxModel
from edgefed.common.serving.service import Batcher, InferenceService, ModelTable
from edgefed.common.sessions.chat import ChatFormat
from edgefed.common.sessions.context import SessionLimits
from edgefed.common.sessions.crypto import FleetKey
from edgefed.common.sessions.holder import HolderSettings, SessionHolder
from edgefed.common.sessions.store import SessionStore
from edgefed.common.sessions.wire import SessionRequest
from edgefed.common.settings import BrokerAddress, Settings
from edgefed.common.topics import Topics
from edgefed.edge.backlog import refuse_failed_over
from edgefed.edge.config import AgentConfig
from edgefed.edge.fetch import ArtifactFetcher
from edgefed.edge.linkmeter import LinkMeter
from edgefed.edge.metrics import AgentMetrics
from edgefed.edge.offload import Offloader
from edgefed.edge.placements import PlacementBook
from edgefed.edge.readiness import Readiness, assess
from edgefed.edge.reconcile import ModelEvent, Reconciler
from edgefed.edge.routeplan import RoutePlan
from edgefed.edge.store import ModelStore
from edgefed.edge.telemetry import LatencyWindow, Outbox, drain_outbox, sample_resources

log = logging.getLogger(__name__)


class Agent:
    """One agent process. ``await Agent(config, settings).run(stop)`` until ``stop`` is set."""

    def __init__(self, config: AgentConfig, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.topics = Topics(config.fleet)
        self.metrics = AgentMetrics()
        self.latency = LatencyWindow()
        self.store = ModelStore(config.state_dir)
        self.table = ModelTable()
        self.outbox = Outbox(
            config.state_dir / "outbox.sqlite", max_messages=config.outbox_max_messages
        )
        self.batcher = Batcher(
            max_queue=config.max_queue,
            metrics=self.metrics,
            slowdown=config.emulated_speed_factor,
        )
        self.service = InferenceService(
            self.table,
            self.batcher,
            agent_id=config.agent_id,
            metrics=self.metrics,
            on_done=self._done,
        )
        self.link = LinkMeter(
            min_transfer_bytes=config.link.min_transfer_bytes, alpha=config.link.alpha
        )
        self.placements = PlacementBook(config.state_dir)
        self.offloader = Offloader(
            config=config.offload,
            agent_id=config.agent_id,
            topics=self.topics,
            table=self.table,
            service=self.service,
            link=self.link,
            on_plan=self._plan_changed,
            on_routed=self.metrics.routed,
        )
        self._served_since: dict[str, int] = {}
        self._outcomes: dict[str, dict[str, int]] = {}
        self.keys = [VerifyKey.from_base64(k) for k in config.trusted_keys]
        self._telemetry_seq = 0
        self._heartbeat_seq = 0
        self._desired: asyncio.Queue[DesiredState] = asyncio.Queue()
        self._fetcher: ArtifactFetcher | None = None
        self.local_broker: PrivateBroker | None = None
        self.local_url: str | None = None
        self.cloud: MqttClient | None = None
        self.local: MqttClient | None = None
        self.metrics_port: int | None = None
        self.ready = asyncio.Event()
        """Set once installed models are loaded and the local endpoint serves."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribed = False
        self._stopping = False
        self._desired_models: dict[str, int] | None = None
        """Models of the newest desired state seen (name -> version), for readiness."""
        self._desired_generation = 0
        self.sessions = self._session_holder()

    # ------------------------------------------------------------------ pieces

    def _session_holder(self) -> SessionHolder | None:
        """The holder of this agent's conversation sessions (None: sessions are off or the
        agent has no session key)."""
        cfg = self.config
        if not cfg.sessions.enabled:
            return None
        if cfg.session_key is None:
            log.info("no session key in the agent's config: this agent holds no session")
            return None
        key = FleetKey.from_base64(cfg.session_key.get_secret_value())
        s = cfg.sessions
        formats: dict[tuple[str, int], ChatFormat] = {}

        def chat_format(model: OnnxModel) -> ChatFormat:
            ident = (model.name, model.version)
            if ident not in formats:
                formats[ident] = ChatFormat.for_artifact(self.store.path(*ident))
            return formats[ident]

        return SessionHolder(
            holder_id=cfg.agent_id,
            topics=self.topics,
            key=key,
            store=SessionStore(cfg.state_dir / "sessions", key, cfg.fleet),
            models=self.table.get,
            chat_format=chat_format,
            settings=HolderSettings(
                default_ttl_s=s.default_ttl_s,
                max_ttl_s=s.max_ttl_s,
                limits=SessionLimits(
                    max_context_bytes=s.max_context_bytes, max_messages=s.max_messages
                ),
                replica_lag_s=s.replica_lag_s,
                max_sessions=s.max_sessions,
            ),
        )

    def _done(self, model: str, outcome: str, seconds: float) -> None:
        counts = self._outcomes.setdefault(model, {})
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome == "ok":
            self.latency.record(model, seconds)
            self._served_since[model] = self._served_since.get(model, 0) + 1

    def _plan_changed(self, model: str, plan: RoutePlan | None) -> None:
        """A model's offload plan changed: metric, and a telemetry record for the controller
        (no plan: served on the agent as without offloading)."""
        in_force = "edge" if plan is None else plan.first
        self.metrics.placement_in_force(model, in_force or "none")
        self._queue_telemetry(
            "placement.in_force",
            {
                "model": model,
                "wanted": plan.wanted if plan is not None and plan.placement else None,
                "in_force": in_force,
                "head": plan.head if plan is not None else None,
                "note": plan.note if plan is not None else None,
            },
        )

    async def _summaries(self) -> None:
        """Every ``telemetry_s``: what was served since the last summary, into the outbox
        (delivered whenever the cloud is reachable)."""
        while True:
            await asyncio.sleep(self.config.telemetry_s)
            served, self._served_since = self._served_since, {}
            figures = self.latency.figures()
            for model, count in served.items():
                latency = figures.get(model)
                self._queue_telemetry(
                    "requests.summary",
                    {
                        "model": model,
                        "served": count,
                        "p50_ms": latency.p50_ms if latency else None,
                        "p99_ms": latency.p99_ms if latency else None,
                        "cloud_connected": bool(self.cloud and self.cloud.connected),
                    },
                )

    def _loader(self, directory: Path, manifest: Manifest, desired: DesiredModel) -> OnnxModel:
        self._configure(desired)
        return OnnxModel.load(
            directory,
            manifest,
            providers=list(desired.providers or self.config.providers),
            cache_dir=self.config.state_dir / "cache",
        )

    def _configure(self, desired: DesiredModel) -> None:
        self.batcher.configure(
            desired.name,
            max_batch_size=desired.max_batch_size,
            max_batch_wait_ms=desired.max_batch_wait_ms,
        )

    async def _fetch(
        self,
        url: str,
        dest: Path,
        *,
        min_version: int,
        expected_manifest_sha256: str | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> Manifest:
        """The reconciler's download: :class:`ArtifactFetcher` plus a byte counter."""
        assert self._fetcher is not None
        seen = 0
        first: tuple[float, int] | None = None  # (time, bytes) when the file transfers began
        last = 0.0

        def progress(done: int, total: int) -> None:
            nonlocal seen, first, last
            now = time.perf_counter()
            if first is None:
                first = (now, done)  # reported before the files are requested
            last = now
            self.metrics.downloaded(done - seen)
            seen = done
            if on_progress is not None:
                on_progress(done, total)

        manifest = await self._fetcher(
            url,
            dest,
            min_version=min_version,
            expected_manifest_sha256=expected_manifest_sha256,
            on_progress=progress,
        )
        if first is not None:
            self.link.observe_transfer(seen - first[1], last - first[0])
        return manifest

    def _report(self, event: ModelEvent) -> None:
        log.info("model %s v%s: %s %s", event.model, event.version, event.step, event.detail or "")
        if event.step == "loaded" and event.version is not None:
            self.metrics.model_loaded(event.model, event.version)
            self.metrics.swap("ok")
        elif event.step in ("failed", "rejected"):
            self.metrics.swap(event.step)
        fields: dict[str, str | int | float | bool | None] = {
            "model": event.model,
            "version": event.version,
            "step": event.step,
            "detail": event.detail,
            "reason": str(event.reason) if event.reason is not None else None,
            "temporary": event.temporary,
        }
        self._queue_telemetry("model.lifecycle", fields)

    def _queue_telemetry(
        self, name: str, fields: dict[str, str | int | float | bool | None]
    ) -> None:
        self._telemetry_seq += 1
        batch = Telemetry(
            agent_id=self.config.agent_id,
            seq=self._telemetry_seq,
            records=[TelemetryRecord(name=name, ts=time.time(), fields=fields)],
        )
        self.outbox.put(self.topics.telemetry(self.config.agent_id), batch.to_json())

    def _status(self, state: AgentState, reason: str | None = None) -> AgentStatus:
        return AgentStatus(
            agent_id=self.config.agent_id,
            state=state,
            reason=reason,
            agent_version=__version__,
            labels=self.config.labels,
            device_profile=self.config.device_profile,
            models=self.table.loaded(),
        )

    async def _on_desired(self, message: Message) -> None:
        try:
            desired = decode(message.payload, message.content_type, DesiredState).message
        except PayloadError as exc:
            log.warning("ignoring a malformed desired state: %s", exc.message)
            return
        if desired.agent_id != self.config.agent_id:
            log.warning("ignoring a desired state for agent %s", desired.agent_id)
            return
        await self._desired.put(desired)

    # ------------------------------------------------------------------ readiness

    def readiness(self) -> Readiness:
        """Whether the agent serves what its controller asked for (call on the event loop)."""
        return assess(
            started=self.ready.is_set(),
            connected=self.cloud is not None and self.cloud.connected,
            subscribed=self._subscribed,
            desired=self._desired_models,
            serving={m.name: m.version for m in self.table.loaded()},
            stopping=self._stopping,
        )

    def _readiness_from_thread(self) -> Readiness:
        """:meth:`readiness` for the probe server's thread: evaluated on the event loop, so it
        never reads the serving table mid-swap; a loop that does not answer within 2 s is
        reported as such."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return Readiness.not_ready("stopping")

        async def on_loop() -> Readiness:
            return self.readiness()

        try:
            future = asyncio.run_coroutine_threadsafe(on_loop(), loop)
        except RuntimeError:  # the loop is closing
            return Readiness.not_ready("stopping")
        try:
            return future.result(timeout=2.0)
        except TimeoutError:
            future.cancel()
            return Readiness.not_ready("the agent's event loop did not answer within 2 s")

    def _note_desired(self, desired: DesiredState) -> None:
        """Remember the newest desired state's models (the reconciler ignores older ones, and
        uses the first entry of a name listed twice)."""
        if desired.generation < self._desired_generation:
            return
        self._desired_generation = desired.generation
        models: dict[str, int] = {}
        for entry in desired.models:
            models.setdefault(entry.name, entry.version)
        self._desired_models = models

    async def _reconcile_loop(self, reconciler: Reconciler[OnnxModel]) -> None:
        retry_delay = 2.0
        while True:
            try:
                # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for swallows a
                # cancellation that arrives with a desired state, and this loop never ends.
                async with asyncio.timeout(retry_delay if reconciler.needs_retry else None):
                    desired = await self._desired.get()
            except TimeoutError:  # a download failed for a temporary reason: resume it
                await reconciler.retry()
                self.offloader.refresh()
                retry_delay = min(60.0, retry_delay * 2)
                await self._publish_status()
                continue
            while not self._desired.empty():  # coalesce: only the newest matters
                desired = self._desired.get_nowait()
            self._note_desired(desired)
            retry_delay = 2.0
            await reconciler.apply(desired)
            self.offloader.refresh()  # a head may have come or gone with the models
            await self._publish_status()

    async def _publish_status(self) -> None:
        if self.cloud is not None and self.cloud.connected:
            with contextlib.suppress(Exception):
                await self.cloud.publish(
                    self.topics.agent_status(self.config.agent_id),
                    self._status(AgentState.ONLINE).to_json(),
                    retain=True,
                    wait=False,
                )

    async def _heartbeats(self) -> None:
        assert self.cloud is not None
        psutil_warm = sample_resources()  # the first cpu_percent sample is meaningless
        del psutil_warm
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            if not self.cloud.connected:
                continue
            started = time.perf_counter()
            rtt_ms: float | None = None
            try:
                await self.cloud.publish(
                    self.topics.heartbeat(self.config.agent_id),
                    b"{}",
                    qos=1,
                    timeout=5.0,
                    user_properties=[("probe", "rtt")],
                )
                rtt_ms = (time.perf_counter() - started) * 1000
                self.link.observe_rtt(rtt_ms)
            except Exception:  # noqa: BLE001 - a failed probe only leaves the figure out
                rtt_ms = None
            self._heartbeat_seq += 1
            beat = Heartbeat(
                agent_id=self.config.agent_id,
                seq=self._heartbeat_seq,
                resources=sample_resources(),
                queue_depth=self.batcher.queue_depth(),
                models=self.table.loaded(),
                latency=self.latency.figures(),
                requests={model: dict(counts) for model, counts in self._outcomes.items()},
                controller_rtt_ms=rtt_ms,
                link=self.link.figures(),
            )
            with contextlib.suppress(Exception):
                await self.cloud.publish(
                    self.topics.heartbeat(self.config.agent_id), beat.to_json(), qos=0
                )

    # ------------------------------------------------------------------ run

    async def run(self, stop: asyncio.Event | None = None) -> None:
        stop = stop or asyncio.Event()
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        async with contextlib.AsyncExitStack() as stack:
            # First, so that the liveness probe answers while installed models are restored
            # (a TensorRT engine build takes minutes) and readiness says what it waits for.
            if cfg.metrics_port is not None:
                probes = ProbeServer(
                    self.metrics.registry,
                    host="0.0.0.0",  # noqa: S104 - the kubelet and Prometheus are outside the pod
                    port=cfg.metrics_port,
                    readiness=self._readiness_from_thread,
                    name="agent-http",
                )
                self.metrics_port = probes.start()
                stack.callback(probes.close)
            http = await stack.enter_async_context(
                httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0))
            )
            token = cfg.agent_token
            limits = cfg.artifact_limits(self.settings.artifact)
            self._fetcher = ArtifactFetcher(
                client=http,
                token=token.get_secret_value() if token is not None else None,
                trusted_keys=self.keys,
                limits=limits,
            )
            reconciler: Reconciler[OnnxModel] = Reconciler(
                store=self.store,
                table=self.table,
                loader=self._loader,
                fetch=self._fetch,
                report=self._report,
                trusted_keys=self.keys,
                limits=limits,
                configure=self._configure,
                placements=self.placements,
            )
            await reconciler.restore()
            if self.sessions is not None:
                kept = self.sessions.restore()
                log.info("holding %d session(s) kept on disk", len(kept))
            self.placements.load()  # the placements in force before a restart, until the cloud
            self.placements.on_change(self.offloader.set_placements)
            await stack.enter_async_context(self.batcher)
            stack.callback(self.outbox.close)

            cache = ReplyCache()
            if cfg.local_endpoint.enabled:
                local = await stack.enter_async_context(self._local_client())
                self.local = local
                await serve(
                    local,
                    self.topics.agent_infer(cfg.agent_id),
                    self.offloader.handle_local,
                    expected=InferenceRequest,
                    dedup=cache,
                )
                if self.sessions is not None:
                    await serve(
                        local,
                        self.topics.agent_sessions(cfg.agent_id),
                        self.sessions.handle_local,
                        expected=SessionRequest,
                        dedup=cache,
                    )
            self.ready.set()
            log.info("agent %s serving %s", cfg.agent_id, self.table.names() or "no model yet")

            offline = self._status(AgentState.OFFLINE, "connection lost")
            cloud = MqttClient(
                BrokerAddress.parse(cfg.broker_url),
                self.settings.mqtt.model_copy(
                    update={
                        "username": cfg.mqtt_username or self.settings.mqtt.username,
                        "password": cfg.mqtt_password or self.settings.mqtt.password,
                    }
                ),
                client_id=cfg.agent_id,
                will=Will(self.topics.agent_status(cfg.agent_id), offline.to_json()),
                # A new process starts a clean session: requests queued for its predecessor
                # were failed over by routers on its last will and answered elsewhere, so
                # running them now would run them twice. Reconnects keep the session.
                clean_start="first",
                require_connection=False,
            )
            cloud.add_connect_hook(lambda _present: self._publish_status())
            self.cloud = await stack.enter_async_context(cloud)
            self.offloader.attach_cloud(self.cloud)

            try:
                async with asyncio.TaskGroup() as tasks:
                    if cfg.training.enabled:
                        tasks.create_task(self._supernode(), name="flower-supernode")
                    tasks.create_task(self._cloud_setup(cache), name="cloud-setup")
                    tasks.create_task(self._reconcile_loop(reconciler), name="reconcile")
                    tasks.create_task(self._heartbeats(), name="heartbeats")
                    if self.sessions is not None:
                        tasks.create_task(
                            self.sessions.replicate(self.cloud), name="session-replicas"
                        )
                        tasks.create_task(self.sessions.sweep(), name="session-expiry")
                    tasks.create_task(self._summaries(), name="summaries")
                    tasks.create_task(
                        drain_outbox(self.outbox, self.cloud, on_sent=self.metrics.telemetry_sent),
                        name="outbox",
                    )
                    await stop.wait()
                    self._stopping = True
                    await self._say_goodbye()
                    raise _Stop
            except* _Stop:
                log.info("agent %s stopped", cfg.agent_id)

    async def _supernode(self) -> None:
        """Federated fine-tuning: a supervised Flower SuperNode (imported only when enabled,
        from the optional training module; Flower itself runs in that process)."""
        from edgefed.edge.training.supernode import SuperNodeSupervisor

        await SuperNodeSupervisor(self.config.training, self.config.state_dir).run()

    async def _say_goodbye(self) -> None:
        """Retained ``offline`` on a graceful stop, waiting at most 2 s for the broker. Without
        a connection there is nobody to tell: a lost connection's will already said it."""
        assert self.cloud is not None
        if not self.cloud.connected:
            return
        with contextlib.suppress(Exception):
            await self.cloud.publish(
                self.topics.agent_status(self.config.agent_id),
                self._status(AgentState.OFFLINE, "agent stopped").to_json(),
                retain=True,
                timeout=2.0,
            )

    async def _cloud_setup(self, cache: ReplyCache) -> None:
        """Subscribe on the cloud link; waits for it as long as it takes (the agent serves
        locally meanwhile)."""
        assert self.cloud is not None
        cfg = self.config
        while True:
            try:
                await self.cloud.subscribe(
                    self.topics.desired(cfg.agent_id), self._on_desired, timeout=3600
                )
                await serve(
                    self.cloud,
                    self.topics.agent_infer(cfg.agent_id),
                    self.offloader.handle_cloud,
                    expected=InferenceRequest,
                    dedup=cache,
                    gate=refuse_failed_over,
                )
                if self.sessions is not None:
                    await serve(
                        self.cloud,
                        self.topics.agent_sessions(cfg.agent_id),
                        self.sessions.handle_cloud,
                        expected=SessionRequest,
                        dedup=cache,
                    )
                self._subscribed = True
                return
            except Exception as exc:  # noqa: BLE001 - retried: the cloud may come later
                log.warning("cloud link not ready (%s); retrying", exc)
                await asyncio.sleep(1.0)

    @contextlib.asynccontextmanager
    async def _local_client(self) -> Any:
        cfg = self.config.local_endpoint
        url = cfg.broker_url
        if url is None:
            broker = PrivateBroker(
                port=cfg.port or None,
                data_dir=self.config.state_dir / "local-broker",
                mosquitto_path=self.settings.broker.mosquitto_path,
            )
            broker.start()
            self.local_broker = broker
            url = broker.url
        self.local_url = url
        try:
            async with MqttClient(
                BrokerAddress.parse(url),
                self.settings.mqtt,
                client_id=f"{self.config.agent_id}-local",
            ) as client:
                yield client
        finally:
            if self.local_broker is not None:
                self.local_broker.close()


class _Stop(Exception):
    """Ends the agent's task group on request."""


async def run_agent(config: AgentConfig, settings: Settings) -> None:
    """Run until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Agent(config, settings).run(stop)
