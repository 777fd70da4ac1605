"""Lightweight in-process agents for the router's tests: each serves ``InferenceRequest`` on its
``agents/<id>/infer`` topic with the real ``rpc.serve`` (and its ReplyCache) over the real
mosquitto, publishes its retained status with a last will, and lets a test control its speed,
freeze it, make it fail, or kill it (the broker then publishes the will)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from edgefed.common.errors import ErrorCode, PayloadError, TemporaryError
from edgefed.common.mqtt import Message, MqttClient, Will
from edgefed.common.rpc import ReplyCache, serve
from edgefed.common.schemas import (
    AgentState,
    AgentStatus,
    Decoded,
    InferenceReply,
    InferenceRequest,
)
from edgefed.common.settings import Settings
from edgefed.common.topics import Topics


class Overloaded(TemporaryError):
    code = ErrorCode.OVERLOADED


@dataclass
class SimAgent:
    agent_id: str
    settings: Settings
    topics: Topics
    delay_s: float = 0.002
    serial: bool = False
    """Compute one request at a time (a queue forms), like a device with one accelerator."""
    fail_with: Exception | None = None
    received: Counter[str] = field(default_factory=Counter)
    executed: Counter[str] = field(default_factory=Counter)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    client: MqttClient | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def start(self) -> SimAgent:
        self.gate.set()
        offline = AgentStatus(agent_id=self.agent_id, state=AgentState.OFFLINE, reason="lost")
        self.client = MqttClient.from_settings(
            self.settings,
            client_id=f"{self.topics.fleet}-{self.agent_id}",
            will=Will(self.topics.agent_status(self.agent_id), offline.to_json()),
        )
        await self.client.__aenter__()
        await serve(
            self.client,
            self.topics.agent_infer(self.agent_id),
            self.handle,
            expected=InferenceRequest,
            dedup=ReplyCache(),
        )
        await self.set_state(AgentState.ONLINE)
        return self

    async def set_state(self, state: AgentState) -> None:
        assert self.client is not None
        status = AgentStatus(agent_id=self.agent_id, state=state)
        await self.client.publish(
            self.topics.agent_status(self.agent_id), status.to_json(), retain=True
        )

    async def handle(self, req: Decoded[InferenceRequest], msg: Message) -> InferenceReply:
        rid = req.message.request_id
        self.received[rid] += 1
        await self.gate.wait()  # a frozen agent: requests wait here, unanswered
        deadline = req.message.deadline
        if msg.expired() or (deadline is not None and time.time() >= deadline):
            raise _Expired("request expired in the agent's queue")
        if self.fail_with is not None:
            raise self.fail_with
        if self.serial:
            async with self._lock:
                await asyncio.sleep(self.delay_s)
        else:
            await asyncio.sleep(self.delay_s)
        self.executed[rid] += 1
        return InferenceReply(
            request_id=rid,
            model=req.message.model,
            version=1,
            served_by=self.agent_id,
            outputs={"at": time.time()},
        )

    def freeze(self) -> None:
        self.gate.clear()

    def thaw(self) -> None:
        self.gate.set()

    async def kill(self) -> None:
        """Vanish: the broker publishes the last will (offline); in-flight work is lost."""
        assert self.client is not None
        await self.client.aclose(publish_will=True)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.aclose()


class _Expired(PayloadError):
    code = ErrorCode.EXPIRED
