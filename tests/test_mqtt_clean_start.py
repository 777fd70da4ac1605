"""``clean_start="first"`` against a real mosquitto: a new client (a restarted process) does
not receive what was queued for its predecessor's session, and its own reconnects keep its
session (found by fault row 1: a restarted agent re-ran requests already failed over)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Literal

import pytest

from edgefed.common.broker import PrivateBroker
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.topics import Topics

from .conftest import fast_settings, wait_broker_saved

pytestmark = pytest.mark.integration


async def _queue_for_dead_session(settings_url: str, fleet: str, topic: str) -> None:
    """A persistent subscriber goes away; three messages are queued in its session."""
    settings = fast_settings(settings_url, fleet)
    async with MqttClient.from_settings(settings, client_id=f"{fleet}-agent") as sub:
        await sub.subscribe(topic, _ignore)
    async with MqttClient.from_settings(settings, client_id=f"{fleet}-pub") as pub:
        for i in range(3):
            await pub.publish(topic, f"queued {i}".encode())


async def _ignore(message: Message) -> None:
    return None


@pytest.mark.parametrize(("clean_start", "expected"), [("first", 0), (False, 3)])
async def test_a_new_client_with_clean_start_first_gets_nothing_of_its_predecessor(
    broker: PrivateBroker,
    fleet: str,
    topics: Topics,
    clean_start: bool | Literal["first"],
    expected: int,
) -> None:
    topic = topics.agent_infer("a1")
    await _queue_for_dead_session(broker.url, fleet, topic)
    got: list[bytes] = []

    async def on_message(message: Message) -> None:
        got.append(message.payload)

    settings = fast_settings(broker.url, fleet)
    async with MqttClient(
        settings.broker_address(),
        settings.mqtt,
        client_id=f"{fleet}-agent",
        clean_start=clean_start,
    ) as restarted:
        await restarted.subscribe(topic, on_message)
        async with MqttClient.from_settings(settings, client_id=f"{fleet}-pub") as pub:
            await pub.publish(topic, b"fresh")
        for _ in range(100):
            if b"fresh" in got:
                break
            await asyncio.sleep(0.05)
    assert got.count(b"fresh") == 1
    assert len(got) - 1 == expected


async def test_clean_start_first_keeps_the_session_through_a_reconnect(
    tmp_path: Path, fleet: str, topics: Topics
) -> None:
    topic = topics.agent_infer("a1")
    sessions: list[bool] = []
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_connect(session_present: bool) -> None:
        sessions.append(session_present)

    async def on_message(message: Message) -> None:
        await got.put(message.payload)

    with PrivateBroker(data_dir=tmp_path / "b", persistence=True) as b:
        settings = fast_settings(b.url, fleet)
        async with (
            MqttClient(
                settings.broker_address(), settings.mqtt, client_id="agent", clean_start="first"
            ) as agent,
            MqttClient.from_settings(settings, client_id="pub") as pub,
        ):
            agent.add_connect_hook(on_connect)
            await agent.subscribe(topic, on_message)
            await wait_broker_saved(b, time.time())
            b.kill()
            await asyncio.sleep(0.2)
            await pub.publish(topic, b"during the outage", wait=False)
            b.start()
            payload = await asyncio.wait_for(got.get(), 10)
            for _ in range(100):
                if sessions:
                    break
                await asyncio.sleep(0.05)
    assert payload == b"during the outage"
    assert sessions == [True]  # the reconnect resumed the session, it did not start clean
