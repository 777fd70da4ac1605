"""Split execution: the head of a split encoder runs here, its tail on a cloud worker reached over
MQTT, and the texts' embeddings match the full model's; what crosses the link is the activation;
a tail the pool does not serve is a clear error. Real mosquitto, real worker, real ONNX Runtime,
a tiny 4-layer BERT split at k=1 and k=2."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefed.cloud.compress.export import export_onnx
from edgefed.cloud.compress.publish import graph_specs
from edgefed.cloud.settings import CloudSettings, load_cloud_settings
from edgefed.cloud.split import export_split, sign_split, split_artifact_name
from edgefed.cloud.worker.pool import WorkerState, run_worker
from edgefed.common.artifact import generate_signing_key, verify, write_artifact
from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import PayloadError
from edgefed.common.mqtt import MqttClient
from edgefed.common.routing import Router, Target
from edgefed.common.rpc import Requester
from edgefed.common.schemas import Decoded, InferenceReply, InferenceRequest
from edgefed.common.serving.errors import InputTooLongError
from edgefed.common.serving.runtime import OnnxModel
from edgefed.common.serving.split import (
    SplitExecutionError,
    SplitExecutor,
    TailNotServed,
    requester_sender,
    router_sender,
)
from edgefed.common.topics import Topics
from tests.cloud.split.tiny_split import build
from tests.conftest import fast_settings

pytestmark = pytest.mark.timeout(120)

NAME = "tiny-bert"
TARGET = "fp32"
POOL = "split"
HIDDEN = 32
CPU = ["CPUExecutionProvider"]
TEXTS = [
    "Hi there.",
    "Fresh bread smells wonderful early in the morning, every single day.",
    "Split models send activations, not texts.",
]


@dataclass
class World:
    store: Path
    full: OnnxModel
    heads: dict[int, OnnxModel] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("split-exec")
    key = generate_signing_key()
    (root / "ctl").mkdir()
    key.save(root / "ctl" / "signing.key")
    key.verify_key.save(root / "ctl" / "signing.pub")
    store = root / "ctl" / "artifacts"
    build("bert", root / "model")

    full_dir = export_onnx(root / "model", store / NAME / "v1" / TARGET, "feature-extraction")
    inputs, outputs, opset = graph_specs(full_dir / "model.onnx")
    write_artifact(
        full_dir,
        name=NAME,
        version=1,
        task="feature-extraction",
        target=TARGET,
        signing_key=key,
        inputs=inputs,
        outputs=outputs,
        opset=opset,
    )
    full = OnnxModel.load(full_dir, verify(full_dir, key.verify_key), providers=CPU)
    out = World(store=store, full=full)
    for k in (1, 2):
        pair = export_split(root / "model", root / f"k{k}", k, task="feature-extraction")
        arts = sign_split(pair, NAME, 1, key, TARGET, store=store)
        manifest = verify(arts.head_dir, key.verify_key)
        out.heads[k] = OnnxModel.load(arts.head_dir, manifest, providers=CPU)
    return out


def worker_settings(broker: PrivateBroker, fleet: str, store: Path, *ks: int) -> CloudSettings:
    return load_cloud_settings(
        broker_url=broker.url,
        fleet=fleet,
        mqtt=fast_settings(broker.url, fleet).mqtt.model_dump(),
        controller={"data_dir": store.parent},
        worker={
            "models": [split_artifact_name(NAME, k, "tail") for k in ks],
            "pool": POOL,
            "target": TARGET,
        },
    )


@contextlib.asynccontextmanager
async def tail_worker(
    broker: PrivateBroker, fleet: str, store: Path, *ks: int
) -> AsyncIterator[tuple[WorkerState, Requester]]:
    """One worker serving the tails at ``ks`` for the pool, and a requester to reach it."""
    settings = worker_settings(broker, fleet, store, *ks)
    stop = asyncio.Event()
    state = WorkerState(worker_id="", pool=POOL)
    task = asyncio.create_task(run_worker(settings, stop=stop, state=state))
    try:
        ready = asyncio.create_task(state.ready.wait())
        await asyncio.wait([ready, task], timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
        assert state.ready.is_set()
        async with MqttClient.from_settings(
            settings, client_id=f"edge-{uuid.uuid4().hex[:6]}"
        ) as client:
            yield state, Requester(client, Topics(fleet))
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)


class Recorder:
    """Wraps a sender and keeps what it was asked to send."""

    def __init__(self, send: Any) -> None:
        self.send = send
        self.sent: list[tuple[InferenceRequest, dict[str, np.ndarray]]] = []

    async def __call__(
        self, request: InferenceRequest, tensors: Mapping[str, np.ndarray]
    ) -> Decoded[InferenceReply]:
        self.sent.append((request, dict(tensors)))
        reply: Decoded[InferenceReply] = await self.send(request, tensors)
        return reply


def _embeddings(results: list[dict[str, Any]]) -> np.ndarray:
    return np.asarray([r["embedding"] for r in results], dtype=np.float64)


@pytest.mark.parametrize("k", [1, 2])
async def test_head_here_and_tail_on_a_worker_give_the_full_models_embeddings(
    broker: PrivateBroker, fleet: str, world: World, k: int
) -> None:
    full = _embeddings(world.full.run_texts(TEXTS, {}))
    raw = _embeddings(world.full.run_texts(TEXTS, {"normalize": False}))
    head = world.heads[k]
    ids, _ = head.tokenize(TEXTS, {})
    batch, seq = ids.shape
    async with tail_worker(broker, fleet, world.store, k) as (state, requester):
        topic = Topics(fleet).worker_infer(POOL)
        fp16 = Recorder(requester_sender(requester, topic, timeout=20))
        router = Router(requester, [Target.pool(Topics(fleet), POOL)])
        fp32 = Recorder(router_sender(router, timeout=20))
        half = await SplitExecutor(head, fp16).run(TEXTS)
        exact = await SplitExecutor(head, fp32, wire_dtype="float32").run(TEXTS)
        unnormalised = await SplitExecutor(head, fp32, wire_dtype="float32").run(
            TEXTS, {"normalize": False}
        )

    # fp32 on the wire: the full model's embeddings; fp16: the same direction.
    np.testing.assert_allclose(_embeddings(exact.results), full, atol=1e-4)
    np.testing.assert_allclose(_embeddings(unnormalised.results), raw, rtol=1e-4, atol=1e-4)
    got = _embeddings(half.results)
    cosines = (got * full).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(full, axis=1)
    assert cosines.min() > 0.999, cosines

    # What crossed: the activation (batch x sequence x hidden) and the mask, nothing else.
    ((request, tensors),) = fp16.sent
    assert request.model == f"{NAME}.k{k}.tail"
    assert request.version == 1
    assert request.texts is None
    assert set(tensors) == {"hidden_states", "attention_mask"}
    assert tensors["hidden_states"].dtype == np.float16
    assert tensors["hidden_states"].shape == (batch, seq, HIDDEN)
    mask_bytes = batch * seq * 8
    assert half.sent_bytes == batch * seq * HIDDEN * 2 + mask_bytes
    assert exact.sent_bytes == batch * seq * HIDDEN * 4 + mask_bytes
    assert half.received_bytes == batch * seq * HIDDEN * 4  # the tail's last_hidden_state
    assert half.tail.served_by == exact.tail.served_by == state.worker_id
    assert half.tail.model == f"{NAME}.k{k}.tail"
    assert state.served == 3


async def test_a_tail_the_pool_does_not_serve_is_a_clear_error(
    broker: PrivateBroker, fleet: str, world: World
) -> None:
    async with tail_worker(broker, fleet, world.store, 1) as (state, requester):
        send = requester_sender(requester, Topics(fleet).worker_infer(POOL), timeout=20)
        with pytest.raises(TailNotServed, match=r"tiny-bert\.k2\.tail v1 of split model"):
            await SplitExecutor(world.heads[2], send).run(TEXTS)
        with pytest.raises(TailNotServed, match=r"tiny-bert\.k1\.tail v7"):
            await SplitExecutor(world.heads[1], send, tail_version=7).run(TEXTS)
        routed = router_sender(Router(requester, [Target.pool(Topics(fleet), POOL)]), timeout=20)
        with pytest.raises(TailNotServed, match=r"tiny-bert\.k2\.tail"):
            await SplitExecutor(world.heads[2], routed).run(TEXTS)
    assert state.served == 3  # each answered with an error, nothing ran


async def test_bad_heads_and_bad_texts_are_refused_before_anything_is_sent(
    world: World,
) -> None:
    async def never(_r: InferenceRequest, _t: Mapping[str, np.ndarray]) -> Decoded[InferenceReply]:
        raise AssertionError("nothing should be sent")

    with pytest.raises(SplitExecutionError, match="full model, not a split head"):
        SplitExecutor(world.full, never)
    executor = SplitExecutor(world.heads[1], never)
    with pytest.raises(PayloadError, match="texts is empty"):
        await executor.run([])
    with pytest.raises(PayloadError, match="normalize must be true or false"):
        await executor.run(["x"], {"normalize": "yes"})
    with pytest.raises(InputTooLongError, match=r"402 tokens long.*at most 128"):
        await executor.run(["word " * 400])
