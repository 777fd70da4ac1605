"""The model table, the micro-batcher and the inference handler, without MQTT."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefed.common.errors import ErrorCode
from edgefed.common.mqtt import Message
from edgefed.common.schemas import Decoded, InferenceReply, InferenceRequest, Priority
from edgefed.common.serving.errors import InputTooLongError, OverloadedError, UnknownModelError
from edgefed.common.serving.runtime import CPU, OnnxModel
from edgefed.common.serving.service import (
    Batcher,
    DeadlineExpired,
    InferenceService,
    ModelTable,
    ServiceStopped,
)
from edgefed.edge.metrics import AgentMetrics

from .tiny_artifacts import SENTENCES, TinyArtifacts, resign


class FakeModel:
    """Stands in for an OnnxModel: echoes texts, records every batch, takes ``compute_s``."""

    def __init__(self, name: str = "fake", version: int = 1, compute_s: float = 0.0) -> None:
        self.name = name
        self.version = version
        self.compute_s = compute_s
        self.batches: list[list[str]] = []
        self._lock = threading.Lock()

    def run_text_batch(
        self, batch: Sequence[tuple[Sequence[str], Mapping[str, Any]]]
    ) -> list[list[dict[str, Any]]]:
        with self._lock:
            self.batches.append([t for texts, _ in batch for t in texts])
        time.sleep(self.compute_s)
        return [[{"echo": t} for t in texts] for texts, _ in batch]

    def run_tensors(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self.batches.append(["<tensors>"])
        return {"y": tensors["x"] * 2}

    @property
    def ran(self) -> list[str]:
        return [t for batch in self.batches for t in batch]


class CountingSession:
    """Wraps an ONNX Runtime session and counts its runs."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.runs = 0
        self.batch_sizes: list[int] = []

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.runs += 1
        self.batch_sizes.append(int(feeds["input_ids"].shape[0]))
        return self._session.run(outputs, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


@pytest.fixture
def embed(tiny_artifacts: TinyArtifacts) -> OnnxModel:
    art = tiny_artifacts.embed
    return OnnxModel.load(art.dir, art.manifest, providers=[CPU])


# --------------------------------------------------------------------------- model table


def test_model_table_get_swap_remove_and_report(embed: OnnxModel) -> None:
    table = ModelTable()
    with pytest.raises(UnknownModelError, match=r"'tiny-embed' is not served here \(serving: none"):
        table.get("tiny-embed")
    assert table.swap(embed) is None
    assert table.get("tiny-embed") is embed
    assert "tiny-embed" in table
    assert table.names() == ["tiny-embed"]
    (loaded,) = table.loaded()
    assert (loaded.name, loaded.version, loaded.role, loaded.providers) == (
        "tiny-embed",
        1,
        "full",
        [CPU],
    )
    with pytest.raises(UnknownModelError, match=r"serving: tiny-embed") as err:
        table.get("other")
    assert err.value.code is ErrorCode.NOT_FOUND
    assert table.remove("tiny-embed") is embed
    assert len(table) == 0


# --------------------------------------------------------------------------- batcher


async def test_concurrent_requests_form_one_micro_batch_and_one_ort_call(
    embed: OnnxModel,
) -> None:
    counting = CountingSession(embed.session)
    embed.session = counting
    async with Batcher(max_batch_size=8, max_batch_wait_ms=50) as batcher:
        results = await asyncio.gather(
            *(batcher.submit(embed, texts=[text], parameters={}) for text in SENTENCES[:6]),
            batcher.submit(embed, texts=SENTENCES[6:8], parameters={"normalize": False}),
        )
    assert counting.runs == 1
    assert counting.batch_sizes == [8]  # 7 requests, 8 texts, one ONNX Runtime call
    assert {r.batch_size for r in results} == {7}
    for text, result in zip(SENTENCES[:6], results, strict=False):
        assert result.outputs is not None
        np.testing.assert_allclose(
            result.outputs[0]["embedding"], embed.run_texts([text], {})[0]["embedding"], atol=1e-5
        )
    assert results[-1].outputs is not None
    assert len(results[-1].outputs) == 2


async def test_max_batch_size_one_switches_micro_batching_off(embed: OnnxModel) -> None:
    counting = CountingSession(embed.session)
    embed.session = counting
    async with Batcher(max_batch_size=8) as batcher:
        batcher.configure("tiny-embed", max_batch_size=1, max_batch_wait_ms=50)
        await asyncio.gather(*(batcher.submit(embed, texts=[t]) for t in SENTENCES[:5]))
    assert counting.runs == 5
    assert batcher.batches_run == 5


async def test_a_bad_request_in_a_batch_fails_alone(embed: OnnxModel) -> None:
    async with Batcher(max_batch_size=8, max_batch_wait_ms=50) as batcher:
        results = await asyncio.gather(
            batcher.submit(embed, texts=[SENTENCES[0]]),
            batcher.submit(embed, texts=["word " * 300]),
            batcher.submit(embed, texts=[SENTENCES[1]]),
            return_exceptions=True,
        )
    assert isinstance(results[1], InputTooLongError)
    for ok in (results[0], results[2]):
        assert not isinstance(ok, BaseException)
        assert ok.outputs


async def test_high_priority_overtakes_a_low_backlog() -> None:
    model = FakeModel(compute_s=0.01)
    done: list[str] = []

    async def one(text: str, priority: Priority) -> None:
        await batcher.submit(model, texts=[text], priority=priority)
        done.append(text)

    async with Batcher(max_batch_size=4, max_batch_wait_ms=1) as batcher:
        lows = [asyncio.create_task(one(f"low-{i}", Priority.LOW)) for i in range(20)]
        await asyncio.sleep(0.005)  # the worker is busy with the first LOW batch
        high = asyncio.create_task(one("high", Priority.HIGH))
        await asyncio.gather(high, *lows)
    position = done.index("high")
    assert position <= 8, done  # behind at most the batch that was running and the next one
    assert sum(1 for t in done[:position] if t.startswith("low")) < 10
    assert model.ran.index("high") < model.ran.index("low-19")


async def test_high_priority_for_another_model_runs_next() -> None:
    slow, other = FakeModel("slow", compute_s=0.01), FakeModel("other")
    async with Batcher(max_batch_size=2, max_batch_wait_ms=1) as batcher:
        lows = [
            asyncio.create_task(batcher.submit(slow, texts=[f"low-{i}"], priority=Priority.LOW))
            for i in range(10)
        ]
        await asyncio.sleep(0.005)
        await batcher.submit(other, texts=["high"], priority=Priority.HIGH)
        finished_lows = sum(t.done() for t in lows)
        await asyncio.gather(*lows)
    assert finished_lows <= 4


async def test_expired_requests_are_not_run() -> None:
    model = FakeModel(compute_s=0.1)
    async with Batcher(max_batch_size=1) as batcher:
        with pytest.raises(DeadlineExpired) as err:
            await batcher.submit(model, texts=["late"], deadline=time.monotonic() - 0.001)
        assert err.value.code is ErrorCode.EXPIRED
        # One request blocks the worker for 100 ms; the next one's deadline passes meanwhile.
        slow = asyncio.create_task(batcher.submit(model, texts=["slow"]))
        await asyncio.sleep(0.01)
        with pytest.raises(DeadlineExpired, match="was not run"):
            await batcher.submit(model, texts=["waits"], deadline=time.monotonic() + 0.03)
        await slow
    assert model.ran == ["slow"]
    assert batcher.expired == 2


async def test_a_full_queue_refuses_with_overloaded_and_a_retry_hint() -> None:
    model = FakeModel()
    metrics = AgentMetrics()
    batcher = Batcher(max_queue=2, metrics=metrics)  # not started: items wait
    waiting = [
        asyncio.create_task(batcher.submit(model, texts=[f"t{i}"], priority=Priority.LOW))
        for i in range(2)
    ]
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError, match="low queue is full") as err:
        await batcher.submit(model, texts=["one too many"], priority=Priority.LOW)
    assert err.value.code is ErrorCode.OVERLOADED
    assert err.value.retry_after is not None
    assert err.value.retry_after > 0
    assert batcher.queue_depth() == {Priority.HIGH: 0, Priority.NORMAL: 0, Priority.LOW: 2}
    assert b'edgefed_agent_queue_depth{priority="low"} 2.0' in metrics.render()
    async with batcher:
        high = await batcher.submit(model, texts=["other queues still take work"])
        await asyncio.gather(*waiting)
    assert high.outputs == [{"echo": "other queues still take work"}]
    assert b'edgefed_agent_queue_depth{priority="low"} 0.0' in metrics.render()


async def test_tensor_requests_run_alone() -> None:
    model = FakeModel()
    x = np.arange(4, dtype=np.float32)
    async with Batcher(max_batch_wait_ms=20) as batcher:
        results = await asyncio.gather(
            batcher.submit(model, tensors={"x": x}),
            batcher.submit(model, texts=["a"]),
            batcher.submit(model, texts=["b"]),
        )
    assert results[0].tensors is not None
    np.testing.assert_array_equal(results[0].tensors["y"], 2 * x)
    assert model.batches == [["<tensors>"], ["a", "b"]]


async def test_closing_the_batcher_fails_waiting_requests_as_temporary() -> None:
    model = FakeModel(compute_s=0.05)
    batcher = Batcher(max_batch_size=1)
    await batcher.start()
    tasks = [asyncio.create_task(batcher.submit(model, texts=[f"t{i}"])) for i in range(3)]
    await asyncio.sleep(0.01)
    await batcher.aclose()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ServiceStopped) for r in results), results
    with pytest.raises(ServiceStopped):
        await batcher.submit(model, texts=["after"])


async def test_closing_while_a_batch_gathers_answers_its_requests() -> None:
    model = FakeModel()
    batcher = Batcher(max_batch_size=8, max_batch_wait_ms=5000)
    await batcher.start()
    task = asyncio.create_task(batcher.submit(model, texts=["gathering"]))
    await asyncio.sleep(0.01)
    await batcher.aclose()
    with pytest.raises(ServiceStopped):
        await task
    assert model.batches == []


# --------------------------------------------------------------------------- the handler


def _request(**kw: Any) -> tuple[Decoded[InferenceRequest], Message]:
    return Decoded(InferenceRequest(**kw)), Message(topic="t", payload=b"", expiry_s=5)


async def test_a_swap_while_requests_run_fails_none(
    tiny_artifacts: TinyArtifacts, embed: OnnxModel, tmp_path: Path
) -> None:
    manifest = resign(tiny_artifacts.embed.dir, tmp_path / "v2", key=tiny_artifacts.key, version=2)
    v2 = OnnxModel.load(tmp_path / "v2", manifest, providers=[CPU])
    table = ModelTable()
    table.swap(embed)
    async with Batcher(max_batch_size=4, max_batch_wait_ms=1) as batcher:
        service = InferenceService(table, batcher, agent_id="agent-1", metrics=None)

        async def one(i: int) -> InferenceReply:
            reply = await service.handle(*_request(model="tiny-embed", texts=[SENTENCES[i % 10]]))
            assert isinstance(reply, InferenceReply)
            return reply

        first = [asyncio.create_task(one(i)) for i in range(30)]
        await asyncio.sleep(0.002)
        assert table.swap(v2) is embed
        second = [asyncio.create_task(one(i)) for i in range(30)]
        replies = await asyncio.gather(*first, *second)
    versions = [r.version for r in replies]
    assert set(versions) == {1, 2}
    assert versions[30:] == [2] * 30
    assert all(len(r.outputs["results"]) == 1 for r in replies)


async def test_the_handler_checks_the_request_before_queueing(embed: OnnxModel) -> None:
    table = ModelTable()
    table.swap(embed)
    metrics = AgentMetrics()
    done: list[tuple[str, str, float]] = []
    async with Batcher() as batcher:
        service = InferenceService(
            table,
            batcher,
            agent_id="agent-1",
            metrics=metrics,
            on_done=lambda m, o, s: done.append((m, o, s)),
        )
        with pytest.raises(UnknownModelError, match="serving: tiny-embed"):
            await service.handle(*_request(model="nope", texts=["x"]))
        with pytest.raises(UnknownModelError, match=r"version 3 is not served.*serves v1"):
            await service.handle(*_request(model="tiny-embed", version=3, texts=["x"]))
        with pytest.raises(Exception, match="neither texts nor tensors"):
            await service.handle(*_request(model="tiny-embed"))
        reply = await service.handle(*_request(model="tiny-embed", version=1, texts=["x"]))
        assert isinstance(reply, InferenceReply)
        assert set(reply.timings_ms) == {"queue", "compute"}
        with pytest.raises(DeadlineExpired):
            await service.handle(
                *_request(model="tiny-embed", texts=["x"], deadline=time.time() - 1)
            )
    assert batcher.items_run == 1
    assert [(m, o) for m, o, _ in done] == [
        ("nope", "not-found"),
        ("tiny-embed", "not-found"),
        ("tiny-embed", "malformed"),
        ("tiny-embed", "ok"),
        ("tiny-embed", "expired"),
    ]
    text = metrics.render().decode()
    assert 'edgefed_agent_requests_total{outcome="ok"} 1.0' in text
    assert 'edgefed_agent_requests_total{outcome="not-found"} 2.0' in text
    assert 'edgefed_agent_requests_total{outcome="expired"} 1.0' in text
