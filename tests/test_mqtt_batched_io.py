"""The adapter writes every packet of one event-loop iteration with one send and reads many
packets per recv (see edgefed.common.mqtt, ``_BufferedSocket``); against a real mosquitto,
nothing may be lost, reordered or left unsent by that."""

from __future__ import annotations

import asyncio

import pytest

from edgefed.common.mqtt import Message, MqttClient, Will
from edgefed.common.settings import Settings
from edgefed.common.topics import Topics

pytestmark = pytest.mark.integration


async def test_a_burst_published_without_waiting_arrives_complete_and_in_order(
    settings: Settings, topics: Topics
) -> None:
    topic = topics.agent_infer("burst")
    got: list[bytes] = []
    all_in = asyncio.Event()

    async def on_message(msg: Message) -> None:
        got.append(msg.payload)
        if len(got) == 2000:
            all_in.set()

    async with (
        MqttClient.from_settings(settings, client_id="burst-rx") as rx,
        MqttClient.from_settings(settings, client_id="burst-tx") as tx,
    ):
        await rx.subscribe(topic, on_message)
        for i in range(2000):
            await tx.publish(topic, b"%d" % i + b"." * (i % 300), wait=False)
        await asyncio.wait_for(all_in.wait(), 30)

    assert got == [b"%d" % i + b"." * (i % 300) for i in range(2000)]


async def test_closing_right_after_queueing_sends_the_messages_and_a_clean_disconnect(
    settings: Settings, topics: Topics
) -> None:
    data_topic = topics.agent_infer("closing")
    will_topic = topics.agent_status("closing")
    seen: asyncio.Queue[Message] = asyncio.Queue()

    async def on_message(msg: Message) -> None:
        await seen.put(msg)

    async with MqttClient.from_settings(settings, client_id="closing-observer") as observer:
        await observer.subscribe(data_topic, on_message)
        await observer.subscribe(will_topic, on_message)
        sender = MqttClient.from_settings(
            settings,
            client_id="closing-sender",
            will=Will(will_topic, b"will", retain=False),
        )
        async with sender:
            for i in range(50):
                await sender.publish(data_topic, b"m%d" % i, wait=False)
        # Queued messages and the DISCONNECT left before the socket closed: no will. A
        # marker from a fresh client on the will's topic comes after anything the broker
        # published when the sender went away.
        async with MqttClient.from_settings(settings, client_id="closing-marker") as marker:
            await marker.publish(will_topic, b"marker")
        received = [await asyncio.wait_for(seen.get(), 10) for _ in range(51)]

    assert [m.payload for m in received if m.topic == data_topic] == [b"m%d" % i for i in range(50)]
    assert [m.payload for m in received if m.topic == will_topic] == [b"marker"]
