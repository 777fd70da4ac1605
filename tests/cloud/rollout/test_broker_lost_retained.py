"""A broker that comes back from its saved state (so the controller's MQTT session is still
there) but without the last retained desired state (what a crash inside mosquitto's autosave
window leaves) gets the recorded state published again: the registry stays the truth.

The loss is made deterministic here: the retained message is cleared by another client while
the controller is connected, then the broker restarts gracefully from its persistence file."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefed.cloud.fleet.desired import DesiredStatePublisher
from edgefed.common.broker import PrivateBroker
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.schemas import DesiredState, decode
from edgefed.common.topics import Topics

from .conftest import MODEL, TARGET, Cloud

pytestmark = pytest.mark.integration


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """This module's own mosquitto, persistent, so a restart keeps the sessions."""
    with PrivateBroker(data_dir=tmp_path / "persistent-broker", persistence=True) as b:
        yield b


async def retained_generation(cloud: Cloud, agent_id: str) -> int:
    """The generation of the retained desired state a new subscriber gets (0: none)."""
    topic = Topics(cloud.settings.fleet).desired(agent_id)
    got: asyncio.Queue[int] = asyncio.Queue()

    async def on_desired(message: Message) -> None:
        if message.retain and message.payload:
            state = decode(message.payload, message.content_type, DesiredState).message
            await got.put(state.generation)

    async with MqttClient.from_settings(
        cloud.settings, client_id=f"look-{uuid.uuid4().hex[:8]}"
    ) as c:
        await c.subscribe(topic, on_desired)
        try:
            return await asyncio.wait_for(got.get(), 2.0)
        except TimeoutError:
            return 0


async def test_a_retained_desired_state_lost_by_the_broker_is_published_again(
    cloud: Cloud, broker: PrivateBroker
) -> None:
    cloud.add_model()
    cloud.publish_version(1)
    cloud.enrol("a1", site="a")
    topics = Topics(cloud.settings.fleet)
    async with MqttClient.from_settings(
        cloud.settings, client_id=f"ctl-{uuid.uuid4().hex[:8]}"
    ) as client:
        publisher = DesiredStatePublisher(client, topics, store=cloud.store, public_url="http://x")
        await publisher.start()
        with cloud.sessions() as s:
            model = publisher.desired_model(s, MODEL, 1, TARGET)
            state = await publisher.publish(s, "a1", [model])
        assert await retained_generation(cloud, "a1") == state.generation
        assert not publisher.needs_resync

        async with MqttClient.from_settings(
            cloud.settings, client_id=f"eraser-{uuid.uuid4().hex[:8]}"
        ) as eraser:
            await eraser.publish(topics.desired("a1"), b"", qos=1, retain=True)
        assert await retained_generation(cloud, "a1") == 0
        await asyncio.sleep(1.5)  # mosquitto's autosave (1 s) writes the session to disk
        await asyncio.to_thread(broker.restart)

        deadline = time.monotonic() + 30
        while not publisher.needs_resync:  # the reconnect, session present, marks it
            assert time.monotonic() < deadline, "the reconnect did not ask for a resync"
            await asyncio.sleep(0.1)
        with cloud.sessions() as s:
            republished = await publisher.resync(s)
        assert republished == ["a1"]
        assert await retained_generation(cloud, "a1") == state.generation
