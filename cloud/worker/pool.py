"""A cloud worker: serves full models (and, as split planning lands, tails) from the artifact
store to every request sent to its pool.

Workers of one pool consume ``edgefed/v1/<fleet>/workers/<pool>/infer`` through the MQTT shared
subscription ``$share/<pool>/...``: the broker hands each request to one of them, so N workers
split the load with no coordinator, and adding a worker is starting one more process. They run
the same serving engine as the agents (:mod:`edgefed.common.serving`: priorities,
micro-batching, deadlines carried by message expiry, de-duplication by request id).

Artifacts are read from the controller's store (on one machine, or a shared volume under
Kubernetes) and verified with the controller's public key before anything is loaded.

For the autoscaler, every worker publishes its load (:mod:`edgefed.cloud.worker.load`) and
serves ``/livez``, ``/readyz`` and ``/metrics`` (:mod:`edgefed.common.probes`) on
``worker.metrics_port``; the probe server starts before the models load, so a pod reports
"not ready" rather than nothing while it loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from edgefed.cloud.settings import CloudSettings, WorkerSettings, parse_model_spec
from edgefed.cloud.worker.load import LoadMeter, gone_will, publish_loads, say_goodbye
from edgefed.cloud.worker.metrics import WorkerMetrics
from edgefed.common.artifact import VerifyKey, load_verify_key, verify
from edgefed.common.errors import ArtifactError, ArtifactRejected, ConfigError, PermanentError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.probes import ProbeServer, Readiness
from edgefed.common.rpc import ReplyCache, serve
from edgefed.common.schemas import (
    Decoded,
    Encoded,
    InferenceReply,
    InferenceRequest,
    WorkerLoad,
)
from edgefed.common.serving.runtime import OnnxModel
from edgefed.common.serving.service import Batcher, InferenceService, ModelTable
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")
LIVENESS_STALL_S = 30.0
"""``/livez`` fails when the event loop has not ticked for this long."""


class WorkerError(PermanentError):
    """The worker cannot serve what it was configured to (the message says why)."""

    exit_code = 78  # EX_CONFIG


@dataclass
class LoadedModel:
    name: str
    version: int
    directory: Path


@dataclass
class WorkerState:
    """What a running worker exposes (tests, the CLI)."""

    worker_id: str
    pool: str
    models: list[LoadedModel] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    served: int = 0
    metrics_port: int | None = None
    """Port of ``/livez``, ``/readyz`` and ``/metrics`` once bound (None: not served)."""
    loop_tick: float = field(default_factory=time.monotonic)
    """When the event loop last ticked (``/livez``)."""


def store_of(settings: CloudSettings) -> Path:
    return settings.worker.artifact_store or settings.controller.resolved_artifact_store


def trusted_keys(settings: CloudSettings) -> list[VerifyKey]:
    paths = settings.worker.trusted_keys or [
        settings.controller.resolved_signing_key.with_suffix(".pub")
    ]
    keys: list[VerifyKey] = []
    for path in paths:
        try:
            keys.append(load_verify_key(path))
        except (OSError, ValueError, ArtifactError) as exc:
            raise WorkerError(f"cannot read the trusted key {path}: {exc}") from exc
    return keys


def newest_version(store: Path, name: str, target: str) -> int:
    """The highest version of ``name`` published for ``target`` in ``store``."""
    folder = store / name
    versions = [
        int(m.group(1))
        for child in (folder.iterdir() if folder.is_dir() else ())
        if (m := _VERSION_DIR.match(child.name)) and (child / target).is_dir()
    ]
    if not versions:
        raise WorkerError(f"the store {store} holds no version of {name!r} for {target!r}")
    return max(versions)


def load_models(
    worker: WorkerSettings, store: Path, keys: list[VerifyKey], settings: CloudSettings
) -> list[tuple[OnnxModel, LoadedModel]]:
    """Verify and open every configured model (blocking: run it off the event loop)."""
    if not worker.models:
        raise WorkerError("no models to serve: set worker.models (e.g. --model NAME[@VERSION])")
    loaded: list[tuple[OnnxModel, LoadedModel]] = []
    for spec in worker.models:
        name, version = parse_model_spec(spec)
        version = version or newest_version(store, name, worker.target)
        directory = store / name / f"v{version}" / worker.target
        try:
            manifest = verify(directory, keys, limits=settings.artifact)
        except ArtifactRejected as exc:
            raise WorkerError(f"{name} v{version} for {worker.target}: {exc.message}") from exc
        if (manifest.name, manifest.version) != (name, version):
            raise WorkerError(
                f"{directory} holds {manifest.name} v{manifest.version}, not {name} v{version}"
            )
        model = OnnxModel.load(
            directory,
            manifest,
            providers=worker.providers,
            intra_op_threads=worker.intra_op_threads,
        )
        model.warm_up()
        loaded.append((model, LoadedModel(name, version, directory)))
        log.info("loaded %s v%d (%s) from %s", name, version, worker.target, directory)
    return loaded


def worker_id_for(pool: str) -> str:
    """A fresh worker id that is a valid topic segment whatever the pool's name length."""
    return f"worker-{pool[:32]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def run_worker(
    settings: CloudSettings,
    *,
    stop: asyncio.Event,
    state: WorkerState | None = None,
) -> WorkerState:
    """Serve the pool's requests until ``stop`` is set."""
    worker = settings.worker
    worker_id = worker_id_for(worker.pool)
    state = state or WorkerState(worker_id=worker_id, pool=worker.pool)
    state.worker_id = worker_id
    topics = Topics(settings.fleet)
    metrics = WorkerMetrics(worker_id, worker.pool)
    client: MqttClient | None = None

    def readiness() -> Readiness:
        if stop.is_set():
            return Readiness.not_ready("stopping")
        if not state.models:
            return Readiness.not_ready("loading models")
        if client is None or not client.connected:
            return Readiness.not_ready("no connection to the broker")
        if not state.ready.is_set():
            return Readiness.not_ready("subscribing to the pool's requests")
        return Readiness(ready=True)

    def liveness() -> Readiness:
        stalled = time.monotonic() - state.loop_tick
        if stalled > LIVENESS_STALL_S:
            return Readiness.not_ready(f"event loop stalled for {stalled:.0f} s")
        return Readiness(ready=True)

    async with AsyncExitStack() as stack:
        stack.enter_context(_ticking(state))
        if worker.metrics_port is not None:
            probes = ProbeServer(
                metrics.registry,
                host=worker.metrics_host,
                port=worker.metrics_port,
                readiness=readiness,
                liveness=liveness,
                name="worker-http",
            )
            try:
                state.metrics_port = probes.start()
                stack.push_async_callback(probes.aclose)
            except OSError as exc:
                log.warning(
                    "cannot serve probes and metrics on %s:%d (%s): the worker runs without "
                    "them (set worker.metrics_port = 0 for a free port, or none to turn off)",
                    worker.metrics_host,
                    worker.metrics_port,
                    exc,
                )
        store = store_of(settings)
        keys = trusted_keys(settings)
        loaded = await asyncio.to_thread(load_models, worker, store, keys, settings)
        table = ModelTable()
        batcher = Batcher(
            max_queue=worker.max_queue,
            max_batch_size=worker.max_batch_size,
            max_batch_wait_ms=worker.max_batch_wait_ms,
            metrics=metrics,
        )
        for model, info in loaded:
            table.swap(model)
            state.models.append(info)
        meter = LoadMeter()

        def done(model: str, outcome: str, seconds: float) -> None:
            state.served += 1
            meter.done(model, outcome, seconds)

        service = InferenceService(
            table, batcher, agent_id=worker_id, metrics=metrics, on_done=done
        )

        async def handle(req: Decoded[InferenceRequest], msg: Message) -> InferenceReply | Encoded:
            meter.arrived()
            return await service.handle(req, msg)

        load_topic = topics.worker_load(worker.pool, worker_id)
        try:
            # No session survives the worker: the broker spreads a shared subscription's
            # messages over every session that holds it, offline ones too, so a stopped
            # worker's persistent session would swallow its share of the pool's requests until
            # it expired.
            client = MqttClient(
                settings.broker_address(),
                settings.mqtt.model_copy(update={"session_expiry_s": 0}),
                client_id=worker_id,
                clean_start=True,
                will=gone_will(topics, worker.pool, worker_id),
            )
        except ConfigError as exc:
            raise WorkerError(exc.message) from exc
        await stack.enter_async_context(batcher)
        await stack.enter_async_context(client)
        await serve(
            client,
            topics.worker_infer_shared(worker.pool),
            handle,
            expected=InferenceRequest,
            dedup=ReplyCache(),
        )
        log.info(
            "worker %s serving %s for pool %s",
            worker_id,
            ", ".join(f"{m.name} v{m.version}" for m in state.models),
            worker.pool,
        )
        state.ready.set()

        def snapshot() -> WorkerLoad:
            ready = readiness().ready
            metrics.ready.set(1 if ready else 0)
            depth = sum(batcher.queue_depth().values())
            return meter.report(
                worker_id=worker_id, pool=worker.pool, queue_depth=depth, ready=ready
            )

        reporter = asyncio.create_task(
            publish_loads(client, load_topic, worker.load_report_s, snapshot),
            name=f"load-reports:{worker_id}",
        )
        try:
            await stop.wait()
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            metrics.ready.set(0)
            await say_goodbye(client, load_topic)
    return state


@contextlib.contextmanager
def _ticking(state: WorkerState) -> Iterator[None]:
    """Keep ``state.loop_tick`` fresh from the event loop (what ``/livez`` looks at)."""

    async def tick() -> None:
        while True:
            state.loop_tick = time.monotonic()
            await asyncio.sleep(1.0)

    task = asyncio.create_task(tick(), name="worker-loop-tick")
    try:
        yield
    finally:
        task.cancel()
