"""Presence and telemetry of the agent: resource figures for heartbeats, recent latency, and an
on-disk outbox that keeps telemetry while the cloud is unreachable and delivers it after.

The outbox is a SQLite file in the state directory (``outbox.sqlite``, WAL journal): a message
is deleted only after the cloud broker acknowledged it (QoS 1 PUBACK), so a crash or a cut
uplink loses nothing but what exceeds the bound (the oldest messages go first, counted) or what
a full disk refuses (dropped, counted: telemetry never stops the agent serving).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from edgefed.common.errors import BrokerUnavailable, ClientClosedError, PublishError
from edgefed.common.mqtt import MqttClient
from edgefed.common.schemas import LatencyFigures, ResourceFigures

log = logging.getLogger(__name__)


def sample_resources() -> ResourceFigures:
    """CPU, memory and load of the device now (GPU figures are added when a probe exists)."""
    memory = psutil.virtual_memory()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return ResourceFigures(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory_used_bytes=int(memory.total - memory.available),
        memory_total_bytes=int(memory.total),
        load_average_1m=load,
    )


class LatencyWindow:
    """The last ``size`` request latencies per model, for heartbeats."""

    def __init__(self, size: int = 512) -> None:
        self._samples: dict[str, deque[float]] = {}
        self._size = size
        self._ewma: dict[str, float] = {}

    def record(self, model: str, seconds: float) -> None:
        ms = seconds * 1000
        self._samples.setdefault(model, deque(maxlen=self._size)).append(ms)
        previous = self._ewma.get(model)
        self._ewma[model] = ms if previous is None else 0.8 * previous + 0.2 * ms

    def figures(self) -> dict[str, LatencyFigures]:
        out = {}
        for model, samples in self._samples.items():
            ordered = sorted(samples)
            if not ordered:
                continue
            out[model] = LatencyFigures(
                count=len(ordered),
                p50_ms=statistics.median(ordered),
                p99_ms=ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
                ewma_ms=self._ewma.get(model),
            )
        return out


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    id: int
    topic: str
    payload: bytes
    content_type: str | None


class Outbox:
    """A bounded FIFO of messages for the cloud, on disk."""

    def __init__(self, path: Path, *, max_messages: int = 100_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_messages = max_messages
        self.dropped = 0
        """Messages dropped because the outbox was full (oldest first)."""
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "topic TEXT NOT NULL, payload BLOB NOT NULL, content_type TEXT, created REAL)"
        )
        self._changed = asyncio.Event()

    def put(self, topic: str, payload: bytes, content_type: str | None = None) -> None:
        """Queue a message. A disk that refuses the write (full) drops this message, counted
        and logged: telemetry must never stop the agent serving."""
        try:
            with self._db:
                self._db.execute(
                    "INSERT INTO outbox (topic, payload, content_type, created) "
                    "VALUES (?, ?, ?, ?)",
                    (topic, payload, content_type, time.time()),
                )
                excess = len(self) - self.max_messages
                if excess > 0:
                    self._db.execute(
                        "DELETE FROM outbox WHERE id IN "
                        "(SELECT id FROM outbox ORDER BY id LIMIT ?)",
                        (excess,),
                    )
                    self.dropped += excess
                    log.warning("outbox full: dropped the %d oldest messages", excess)
        except sqlite3.OperationalError as exc:  # "database or disk is full", I/O errors
            self.dropped += 1
            log.warning("outbox %s refused a message for %s (%s): dropped", self.path, topic, exc)
            return
        self._changed.set()

    def peek(self, limit: int = 100) -> list[OutboxMessage]:
        rows = self._db.execute(
            "SELECT id, topic, payload, content_type FROM outbox ORDER BY id LIMIT ?", (limit,)
        ).fetchall()
        return [OutboxMessage(int(r[0]), str(r[1]), bytes(r[2]), r[3]) for r in rows]

    def delete(self, ids: list[int]) -> None:
        if ids:
            with self._db:
                self._db.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in ids])

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    async def wait_for_messages(self) -> None:
        if len(self) == 0:
            self._changed.clear()
            await self._changed.wait()

    def close(self) -> None:
        self._db.close()


async def drain_outbox(
    outbox: Outbox,
    client: MqttClient,
    *,
    on_sent: Callable[[int], None] | None = None,
    batch: int = 100,
) -> None:
    """Forever: deliver the outbox to the cloud in order, deleting what the broker acknowledged.

    While the cloud is unreachable it waits for the connection; nothing is deleted unacked.
    """
    while True:
        await outbox.wait_for_messages()
        if not client.connected:
            try:
                await client.wait_connected(None)
            except BrokerUnavailable:
                await asyncio.sleep(1.0)
                continue
        for message in outbox.peek(batch):
            try:
                await client.publish(
                    message.topic,
                    message.payload,
                    qos=1,
                    content_type=message.content_type,
                    timeout=client.settings.publish_timeout_s,
                )
            except (PublishError, BrokerUnavailable):
                break  # not acknowledged: kept, sent again when the link is back
            except ClientClosedError:
                return
            outbox.delete([message.id])
            if on_sent is not None:
                on_sent(1)
