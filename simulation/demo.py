"""``edgefed demo``: the main job on embedded defaults.

For now it shows the foundation end to end on one machine: a private mosquitto (or the broker of
``EDGEFED_BROKER_URL``), a demo agent that announces itself (retained status, last will) and
answers inference requests over MQTT v5 request/reply, and a caller that measures round trips,
sends a malformed request to show the error reply, and times one out. The simulation harness
(a fleet of real agents, compression, routing, faults) grows from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import RemoteError, RequestTimeout
from edgefed.common.mqtt import Message, MqttClient, Will
from edgefed.common.rpc import Requester, serve
from edgefed.common.schemas import (
    JSON_CONTENT_TYPE,
    AgentState,
    AgentStatus,
    Decoded,
    ErrorReply,
    InferenceReply,
    InferenceRequest,
    decode,
)
from edgefed.common.settings import Settings
from edgefed.common.topics import Topics

AGENT_ID = "demo-agent"


@dataclass
class DemoReport:
    broker_url: str
    private_broker: bool
    topics: dict[str, str]
    round_trips_ms: list[float] = field(default_factory=list)
    payload_bytes: int = 0
    sample_reply: dict[str, object] = field(default_factory=dict)
    malformed_reply: dict[str, object] = field(default_factory=dict)
    timeout_error: str = ""
    status_seen: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        data = sorted(self.round_trips_ms)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, round(q * (len(data) - 1)))]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.round_trips_ms) if self.round_trips_ms else float("nan")


async def _agent_handler(req: Decoded[InferenceRequest], msg: Message) -> InferenceReply:
    texts = req.message.texts or []
    return InferenceReply(
        request_id=req.message.request_id,
        model=req.message.model,
        version=1,
        served_by=AGENT_ID,
        outputs={"lengths": [len(t) for t in texts]},
    )


async def run_demo(
    settings: Settings,
    *,
    requests: int = 200,
    payload_bytes: int = 1024,
    progress: Callable[[str], None] = lambda _: None,
) -> DemoReport:
    """Run the demo against the configured broker, or a private one when none is set."""
    with contextlib.ExitStack() as stack:
        private = settings.broker_url is None
        if private:
            progress("starting a private mosquitto")
            broker = stack.enter_context(
                PrivateBroker(
                    persistence=settings.broker.persistence,
                    data_dir=settings.broker.data_dir,
                    mosquitto_path=settings.broker.mosquitto_path,
                    start_timeout_s=settings.broker.start_timeout_s,
                )
            )
            settings = settings.model_copy(update={"broker_url": broker.url})
        assert settings.broker_url is not None
        return await _run(settings, requests, payload_bytes, progress, private=private)


async def _run(
    settings: Settings,
    requests: int,
    payload_bytes: int,
    progress: Callable[[str], None],
    *,
    private: bool,
) -> DemoReport:
    topics = Topics(settings.fleet)
    report = DemoReport(
        broker_url=settings.broker_url or "",
        private_broker=private,
        payload_bytes=payload_bytes,
        topics={
            "status": topics.agent_status(AGENT_ID),
            "infer": topics.agent_infer(AGENT_ID),
            "replies": topics.replies("demo-caller"),
        },
    )
    offline = AgentStatus(agent_id=AGENT_ID, state=AgentState.OFFLINE, reason="connection lost")
    will = Will(topics.agent_status(AGENT_ID), offline.to_json(), content_type=JSON_CONTENT_TYPE)
    seen: asyncio.Queue[AgentStatus] = asyncio.Queue()

    async def on_status(msg: Message) -> None:
        await seen.put(decode(msg.payload, msg.content_type, AgentStatus).message)

    async with (
        MqttClient.from_settings(settings, client_id=AGENT_ID, will=will) as agent,
        MqttClient.from_settings(settings, client_id="demo-caller") as caller,
    ):
        progress(f"agent {AGENT_ID} online, serving {topics.agent_infer(AGENT_ID)}")
        await serve(agent, topics.agent_infer(AGENT_ID), _agent_handler, expected=InferenceRequest)
        online = AgentStatus(agent_id=AGENT_ID, state=AgentState.ONLINE, labels={"demo": "true"})
        await agent.publish(
            topics.agent_status(AGENT_ID),
            online.to_json(),
            retain=True,
            content_type=JSON_CONTENT_TYPE,
        )
        await caller.subscribe(topics.agent_status(AGENT_ID), on_status)
        status = await asyncio.wait_for(seen.get(), settings.mqtt.request_timeout_s)
        report.status_seen.append(status.state.value)

        requester = Requester(caller, topics)
        text = "x" * max(0, payload_bytes - 150)  # the JSON envelope adds ~150 bytes
        progress(f"sending {requests} requests of ~{payload_bytes} bytes")
        for i in range(requests):
            req = InferenceRequest(model="demo", texts=[text])
            started = time.perf_counter()
            reply = await requester.request(topics.agent_infer(AGENT_ID), req, InferenceReply)
            report.round_trips_ms.append((time.perf_counter() - started) * 1000)
            if i == 0:
                report.sample_reply = reply.message.model_dump(mode="json")

        raw = await requester.request_raw(topics.agent_infer(AGENT_ID), b"{not json")
        report.malformed_reply = decode(
            raw.payload, raw.content_type, ErrorReply
        ).message.model_dump(mode="json")
        try:
            await requester.request(
                topics.agent_infer("nobody-home"),
                InferenceRequest(model="demo"),
                InferenceReply,
                timeout=1.0,
            )
        except (RequestTimeout, RemoteError) as exc:
            report.timeout_error = f"{type(exc).__name__}: {exc}"
        await agent.publish(
            topics.agent_status(AGENT_ID),
            AgentStatus(agent_id=AGENT_ID, state=AgentState.OFFLINE, reason="demo over").to_json(),
            retain=True,
            content_type=JSON_CONTENT_TYPE,
        )
        status = await asyncio.wait_for(seen.get(), settings.mqtt.request_timeout_s)
        report.status_seen.append(status.state.value)
    return report
