"""The agent's on-disk outbox: bounded, survives restarts, delivered in order once the cloud
acknowledges, nothing deleted before that."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edgefed.common.broker import PrivateBroker
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.topics import Topics
from edgefed.edge.telemetry import LatencyWindow, Outbox, drain_outbox, sample_resources
from tests.conftest import fast_settings


def test_the_outbox_keeps_messages_across_a_restart_in_order(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite")
    for i in range(3):
        box.put("t", f"m{i}".encode())
    box.close()

    reopened = Outbox(tmp_path / "outbox.sqlite")
    assert [m.payload for m in reopened.peek()] == [b"m0", b"m1", b"m2"]
    reopened.delete([reopened.peek(1)[0].id])
    assert [m.payload for m in reopened.peek()] == [b"m1", b"m2"]


def test_a_full_outbox_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.sqlite", max_messages=3)
    for i in range(5):
        box.put("t", f"m{i}".encode())
    assert [m.payload for m in box.peek()] == [b"m2", b"m3", b"m4"]
    assert box.dropped == 2


@pytest.mark.integration
async def test_queued_telemetry_is_delivered_when_the_cloud_comes_back(
    tmp_path: Path, fleet: str, topics: Topics
) -> None:
    box = Outbox(tmp_path / "outbox.sqlite")
    topic = topics.telemetry("a1")
    for i in range(5):
        box.put(topic, f"while offline {i}".encode())
    got: asyncio.Queue[Message] = asyncio.Queue()

    async def collect(m: Message) -> None:
        await got.put(m)

    with PrivateBroker(data_dir=tmp_path / "cloud") as cloud:
        settings = fast_settings(cloud.url, fleet)
        async with (
            MqttClient.from_settings(settings, client_id="controller") as ctl,
            MqttClient.from_settings(settings, client_id="a1") as agent,
        ):
            await ctl.subscribe(topic, collect)
            drain = asyncio.create_task(drain_outbox(box, agent))
            received = [(await asyncio.wait_for(got.get(), 10)).payload for _ in range(5)]
            for _ in range(50):
                if len(box) == 0:
                    break
                await asyncio.sleep(0.05)
            drain.cancel()
    assert received == [f"while offline {i}".encode() for i in range(5)]
    assert len(box) == 0


def test_latency_window_reports_median_and_p99_per_model() -> None:
    window = LatencyWindow(size=100)
    for ms in range(1, 101):
        window.record("m", ms / 1000)
    figures = window.figures()["m"]
    assert figures.count == 100
    assert figures.p50_ms == pytest.approx(50.5)
    assert figures.p99_ms == pytest.approx(99.0)


def test_resource_sample_has_real_memory_figures() -> None:
    sample = sample_resources()
    assert 0 < sample.memory_used_bytes <= sample.memory_total_bytes
