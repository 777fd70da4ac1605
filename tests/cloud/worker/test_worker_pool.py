"""Cloud workers: a pool of workers splits its requests through the MQTT shared subscription
(no coordinator), answers with the model from the controller's store after verifying it, keeps
the deadline and de-duplication rules of the serving engine, and refuses what it cannot serve
with a clear error. Real mosquitto, real ONNX Runtime, tiny signed artifacts."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edgefed.cloud.settings import CloudSettings, load_cloud_settings
from edgefed.cloud.worker.pool import WorkerError, WorkerState, run_worker
from edgefed.common.artifact import SigningKey, generate_signing_key
from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import EdgefedError
from edgefed.common.mqtt import MqttClient
from edgefed.common.rpc import Requester
from edgefed.common.schemas import InferenceReply, InferenceRequest
from edgefed.common.topics import Topics
from tests.cloud.e2e.world import TARGET, build_sources, clean_env, publish
from tests.conftest import fast_settings

pytestmark = pytest.mark.timeout(120)
MODEL = "tiny-embed"
CLI = (sys.executable, "-m", "edgefed.cli", "cloud", "worker")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SigningKey]:
    root = tmp_path_factory.mktemp("worker")
    key = generate_signing_key()
    (root / "ctl").mkdir()
    key.save(root / "ctl" / "signing.key")
    key.verify_key.save(root / "ctl" / "signing.pub")
    sources = build_sources(root / "src")
    store = root / "ctl" / "artifacts"
    publish(store, sources["good"], 1, key)
    publish(store, sources["good"], 2, key)
    return store, key


def worker_settings(
    broker: PrivateBroker, fleet: str, store: Path, **worker: object
) -> CloudSettings:
    return load_cloud_settings(
        broker_url=broker.url,
        fleet=fleet,
        mqtt=fast_settings(broker.url, fleet).mqtt.model_dump(),
        controller={"data_dir": store.parent},
        worker={"models": [MODEL], "pool": "gpu-a", **worker},
    )


@contextlib.asynccontextmanager
async def workers(settings: CloudSettings, n: int) -> AsyncIterator[list[WorkerState]]:
    stop = asyncio.Event()
    states = [WorkerState(worker_id="", pool=settings.worker.pool) for _ in range(n)]
    tasks = [asyncio.create_task(run_worker(settings, stop=stop, state=s)) for s in states]
    try:
        for state, task in zip(states, tasks, strict=True):
            ready = asyncio.create_task(state.ready.wait())
            await asyncio.wait([ready, task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()
            assert state.ready.is_set()
        yield states
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_pool_of_workers_splits_the_load_and_serves_the_newest_version(
    broker: PrivateBroker, fleet: str, store: tuple[Path, SigningKey]
) -> None:
    settings = worker_settings(broker, fleet, store[0])
    topics = Topics(fleet)
    async with (
        workers(settings, 2) as states,
        MqttClient.from_settings(settings, client_id=f"caller-{uuid.uuid4().hex[:6]}") as caller,
    ):
        requester = Requester(caller, topics)
        replies = await asyncio.gather(
            *(
                requester.request(
                    topics.worker_infer("gpu-a"),
                    InferenceRequest(model=MODEL, texts=[f"request {i}"]),
                    InferenceReply,
                    timeout=20,
                )
                for i in range(60)
            )
        )
    assert len(replies) == 60
    assert {r.message.version for r in replies} == {2}  # the newest in the store
    served_by = {r.message.served_by for r in replies}
    assert served_by == {s.worker_id for s in states}  # both workers took a share
    assert sum(s.served for s in states) == 60  # each request executed once


async def test_a_repeated_request_id_is_answered_from_the_cache_not_run_again(
    broker: PrivateBroker, fleet: str, store: tuple[Path, SigningKey]
) -> None:
    settings = worker_settings(broker, fleet, store[0], models=[f"{MODEL}@1"])
    topics = Topics(fleet)
    async with (
        workers(settings, 1) as (state,),
        MqttClient.from_settings(settings, client_id=f"caller-{uuid.uuid4().hex[:6]}") as caller,
    ):
        requester = Requester(caller, topics)
        request = InferenceRequest(model=MODEL, texts=["once"])
        first = await requester.request(topics.worker_infer("gpu-a"), request, InferenceReply)
        again = await requester.request(topics.worker_infer("gpu-a"), request, InferenceReply)
    assert first.message.version == 1
    assert again.message.outputs == first.message.outputs
    assert state.served == 1


async def test_requests_for_a_model_the_pool_does_not_serve_get_an_error_reply(
    broker: PrivateBroker, fleet: str, store: tuple[Path, SigningKey]
) -> None:
    settings = worker_settings(broker, fleet, store[0])
    topics = Topics(fleet)
    async with (
        workers(settings, 1),
        MqttClient.from_settings(settings, client_id=f"caller-{uuid.uuid4().hex[:6]}") as caller,
    ):
        with pytest.raises(EdgefedError, match="other-model"):
            await Requester(caller, topics).request(
                topics.worker_infer("gpu-a"),
                InferenceRequest(model="other-model", texts=["x"]),
                InferenceReply,
                timeout=10,
            )


@pytest.mark.parametrize(
    ("worker", "says"),
    [
        ({"models": []}, "no models to serve"),
        ({"models": ["missing-model"]}, "holds no version of 'missing-model'"),
        ({"models": [f"{MODEL}@7"]}, "v7"),
        ({"target": "arm64"}, "holds no version"),
    ],
)
async def test_a_worker_refuses_to_start_on_what_it_cannot_serve(
    broker: PrivateBroker,
    fleet: str,
    store: tuple[Path, SigningKey],
    worker: dict[str, object],
    says: str,
) -> None:
    settings = worker_settings(broker, fleet, store[0], **worker)
    with pytest.raises(WorkerError, match=says):
        await run_worker(settings, stop=asyncio.Event())


async def test_an_artifact_signed_by_another_key_is_refused(
    broker: PrivateBroker, fleet: str, store: tuple[Path, SigningKey], tmp_path: Path
) -> None:
    stranger = generate_signing_key()
    other = tmp_path / "artifacts"
    shutil.copytree(store[0], other)
    src = store[0] / MODEL / "v2" / TARGET
    shutil.rmtree(other / MODEL / "v2" / TARGET)
    shutil.copytree(src, tmp_path / "plain", ignore=shutil.ignore_patterns("manifest.*"))
    publish(other, tmp_path / "plain", 2, stranger)
    settings = worker_settings(broker, fleet, other)
    settings = settings.model_copy(
        update={
            "worker": settings.worker.model_copy(
                update={"trusted_keys": [store[0].parent / "signing.pub"]}
            )
        }
    )
    with pytest.raises(WorkerError, match=r"v2.*(untrusted|signature|key)"):
        await run_worker(settings, stop=asyncio.Event())


def test_the_worker_command_serves_until_sigterm(
    broker: PrivateBroker, store: tuple[Path, SigningKey]
) -> None:
    fleet = f"w-{secrets.token_hex(3)}"
    proc = subprocess.Popen(
        [*CLI, "--model", MODEL, "--pool", "cli", "--store", str(store[0])],
        env=clean_env(
            EDGEFED_BROKER_URL=broker.url,
            EDGEFED_FLEET=fleet,
            EDGEFED_CONTROLLER__DATA_DIR=str(store[0].parent),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        settings = fast_settings(broker.url, fleet)
        topics = Topics(fleet)

        async def ask() -> InferenceReply:
            async with MqttClient.from_settings(settings, client_id="cli-caller") as caller:
                requester = Requester(caller, topics)
                for _ in range(100):
                    try:
                        reply = await requester.request(
                            topics.worker_infer("cli"),
                            InferenceRequest(model=MODEL, texts=["hi"]),
                            InferenceReply,
                            timeout=1,
                        )
                        return reply.message
                    except EdgefedError:
                        await asyncio.sleep(0.3)  # not subscribed yet
                raise AssertionError("the worker never answered")

        reply = asyncio.run(ask())
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert reply.version == 2
    assert proc.returncode == 0, err
    assert "worker stopped after" in out


async def test_a_stopped_worker_leaves_no_session_to_swallow_the_pools_requests(
    broker: PrivateBroker, fleet: str, store: tuple[Path, SigningKey]
) -> None:
    settings = worker_settings(broker, fleet, store[0])
    topics = Topics(fleet)
    async with workers(settings, 1) as (gone,):
        pass  # started, subscribed to the pool, then stopped
    async with (
        workers(settings, 1) as (state,),
        MqttClient.from_settings(settings, client_id=f"caller-{uuid.uuid4().hex[:6]}") as caller,
    ):
        requester = Requester(caller, topics)
        replies = await asyncio.gather(
            *(
                requester.request(
                    topics.worker_infer("gpu-a"),
                    InferenceRequest(model=MODEL, texts=[f"after {i}"]),
                    InferenceReply,
                    timeout=5,
                )
                for i in range(20)
            )
        )
    assert {r.message.served_by for r in replies} == {state.worker_id}
    assert gone.worker_id != state.worker_id
