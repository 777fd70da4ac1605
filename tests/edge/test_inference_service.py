"""The agent's inference service end to end: a real mosquitto, rpc.serve, real ONNX Runtime."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest

from edgefed.common.errors import ErrorCode, RemotePermanentError
from edgefed.common.mqtt import MqttClient
from edgefed.common.rpc import Requester, serve
from edgefed.common.schemas import InferenceReply, InferenceRequest, Priority
from edgefed.common.serving.runtime import CPU, OnnxModel
from edgefed.common.serving.service import Batcher, InferenceService, ModelTable
from edgefed.common.settings import Settings
from edgefed.common.topics import Topics
from edgefed.edge.metrics import AgentMetrics

from .tiny_artifacts import SENTENCES, TinyArtifacts

pytestmark = pytest.mark.integration

AGENT = "agent-1"


@dataclass
class Served:
    requester: Requester
    topic: str
    batcher: Batcher
    metrics: AgentMetrics
    table: ModelTable


@pytest.fixture
async def served(
    settings: Settings, topics: Topics, tiny_artifacts: TinyArtifacts
) -> AsyncIterator[Served]:
    table = ModelTable()
    for art in (tiny_artifacts.embed, tiny_artifacts.classify, tiny_artifacts.generate):
        table.swap(OnnxModel.load(art.dir, art.manifest, providers=[CPU]))
    metrics = AgentMetrics(AGENT)
    async with (
        MqttClient.from_settings(settings, client_id=AGENT) as agent,
        MqttClient.from_settings(settings, client_id="app") as app,
        Batcher(metrics=metrics) as batcher,
    ):
        service = InferenceService(table, batcher, agent_id=AGENT, metrics=metrics)
        topic = topics.agent_infer(AGENT)
        await serve(agent, topic, service.handle, expected=InferenceRequest)
        yield Served(Requester(app, topics), topic, batcher, metrics, table)


async def test_texts_in_results_out_for_each_task(served: Served) -> None:
    replies = await asyncio.gather(
        served.requester.request(
            served.topic,
            InferenceRequest(model="tiny-embed", texts=SENTENCES[:3]),
            InferenceReply,
        ),
        served.requester.request(
            served.topic,
            InferenceRequest(model="tiny-classify", texts=SENTENCES[:2], priority=Priority.HIGH),
            InferenceReply,
        ),
        served.requester.request(
            served.topic,
            InferenceRequest(
                model="tiny-generate", texts=["hello there"], parameters={"max_new_tokens": 4}
            ),
            InferenceReply,
        ),
    )
    embed, classify, generate = (r.message for r in replies)
    assert embed.served_by == AGENT
    assert embed.version == 1
    assert [len(r["embedding"]) for r in embed.outputs["results"]] == [32, 32, 32]
    assert set(embed.timings_ms) == {"queue", "compute"}
    assert all(sum(r["scores"].values()) == pytest.approx(1.0) for r in classify.outputs["results"])
    assert generate.outputs["results"][0]["tokens"] == 4


async def test_an_unknown_model_gets_a_not_found_error_reply(served: Served) -> None:
    with pytest.raises(RemotePermanentError, match="serving: tiny-classify") as err:
        await served.requester.request(
            served.topic, InferenceRequest(model="nope", texts=["x"]), InferenceReply
        )
    assert err.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(RemotePermanentError, match="serves v1") as err:
        await served.requester.request(
            served.topic,
            InferenceRequest(model="tiny-embed", version=7, texts=["x"]),
            InferenceReply,
        )
    assert err.value.code is ErrorCode.NOT_FOUND


async def test_a_text_too_long_gets_a_malformed_error_reply(served: Served) -> None:
    with pytest.raises(RemotePermanentError, match="at most 128") as err:
        await served.requester.request(
            served.topic,
            InferenceRequest(model="tiny-embed", texts=["word " * 500]),
            InferenceReply,
        )
    assert err.value.code is ErrorCode.MALFORMED


async def test_a_duplicate_request_id_is_executed_once(served: Served) -> None:
    request = InferenceRequest(model="tiny-embed", texts=[SENTENCES[0]])
    first, second = await asyncio.gather(
        served.requester.request(served.topic, request, InferenceReply),
        served.requester.request(served.topic, request, InferenceReply),
    )
    third = await served.requester.request(served.topic, request, InferenceReply)
    assert served.batcher.items_run == 1
    assert first.message == second.message == third.message


async def test_tensors_in_tensors_out(served: Served, tiny_artifacts: TinyArtifacts) -> None:
    enc = tiny_artifacts.tokenizer(SENTENCES[:2], padding=True, return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    mask = enc["attention_mask"].astype(np.int64)
    reply = await served.requester.request(
        served.topic,
        InferenceRequest(model="tiny-embed"),
        InferenceReply,
        tensors={"input_ids": ids, "attention_mask": mask},
    )
    hidden = reply.tensors["last_hidden_state"]
    assert hidden.shape == (*ids.shape, 32)
    assert reply.message.outputs == {}

    with pytest.raises(RemotePermanentError, match="cannot be fed from float32") as err:
        await served.requester.request(
            served.topic,
            InferenceRequest(model="tiny-embed"),
            InferenceReply,
            tensors={"input_ids": ids.astype(np.float32)},
        )
    assert err.value.code is ErrorCode.MALFORMED


async def test_embeddings_can_come_back_as_one_tensor(served: Served) -> None:
    as_json, as_tensor = await asyncio.gather(
        served.requester.request(
            served.topic,
            InferenceRequest(model="tiny-embed", texts=SENTENCES[:3]),
            InferenceReply,
        ),
        served.requester.request(
            served.topic,
            InferenceRequest(
                model="tiny-embed", texts=SENTENCES[:3], parameters={"return": "tensors"}
            ),
            InferenceReply,
        ),
    )
    embeddings = as_tensor.tensors["embeddings"]
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (3, 32)
    expected = np.asarray([r["embedding"] for r in as_json.message.outputs["results"]])
    np.testing.assert_array_equal(embeddings, expected.astype(np.float32))
    text = served.metrics.render().decode()
    assert 'edgefed_agent_requests_total{outcome="ok"} 2.0' in text
    assert 'edgefed_agent_info{agent_id="agent-1"} 1.0' in text
