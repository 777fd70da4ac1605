"""A shaping TCP proxy: real bytes over real sockets, with the delay, jitter, bandwidth, loss
and cuts of a network link between two processes on one machine.

Each direction of each connection is a pipe: chunks read from one side are scheduled by
:func:`schedule` and written to the other side when due. The schedule models a link:

* **bandwidth**: a direction is busy while it serialises a chunk (``bytes * 8 / bits per
  second``); the next chunk starts when the link is free (queueing, as on a real link);
* **delay**: one-way propagation after serialisation (an RTT of 20 ms is 10 ms each way);
* **jitter**: a uniform extra delay in ``[0, jitter]``; bytes never overtake each other (TCP
  delivers in order, so a late chunk holds back the ones after it);
* **loss**: a lost TCP segment is retransmitted after a timeout, so the chunk arrives
  ``retransmit_ms`` later (TCP hides loss as delay, and so does the proxy);
* **cut**: open connections are reset and new ones are accepted and closed at once, until the
  link is restored (what a device behind a dead uplink sees).

The profile can change while connections are open (``proxy.profile = ...``); it applies to
chunks read from then on. Emulation is honest within the limits of asyncio timers: about a
millisecond of timer slack, and chunk-level (not packet-level) scheduling, which slightly
overstates the delay of a large write's first byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 * 1024
"""Largest chunk read at once (about a dozen TCP segments)."""


class LinkProfile(BaseModel):
    """What a link does to the bytes that cross it (each direction alike)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    delay_ms: float = Field(default=0.0, ge=0, le=60_000)
    """One-way propagation delay (half the round trip)."""
    jitter_ms: float = Field(default=0.0, ge=0, le=60_000)
    """Uniform extra delay per chunk, in ``[0, jitter_ms]``."""
    bandwidth_mbps: float | None = Field(default=None, gt=0, le=1_000_000)
    """Link rate in megabits per second (None: unlimited)."""
    loss: float = Field(default=0.0, ge=0, lt=1)
    """Probability that a chunk is lost once and retransmitted."""
    retransmit_ms: float = Field(default=200.0, ge=0, le=60_000)
    """Extra delay of a retransmitted chunk (TCP's minimum RTO is 200 ms on Linux)."""

    @classmethod
    def from_rtt(
        cls, rtt_ms: float, bandwidth_mbps: float | None = None, **extra: float
    ) -> LinkProfile:
        """A symmetric link with round trip ``rtt_ms`` (split evenly between directions)."""
        return cls(delay_ms=rtt_ms / 2, bandwidth_mbps=bandwidth_mbps, **extra)


@dataclass
class Direction:
    """Scheduling state of one direction of one connection."""

    busy_until: float = 0.0
    """When the link finishes serialising what was already sent."""
    last_due: float = 0.0
    """When the previous chunk is delivered (bytes never overtake each other)."""


def schedule(
    now: float, size: int, state: Direction, profile: LinkProfile, rng: random.Random
) -> float:
    """When a chunk of ``size`` bytes read at ``now`` (seconds) is due at the far side;
    advances ``state``."""
    start = max(now, state.busy_until)
    serialise = 0.0
    if profile.bandwidth_mbps is not None:
        serialise = size * 8 / (profile.bandwidth_mbps * 1e6)
    state.busy_until = start + serialise
    due = state.busy_until + profile.delay_ms / 1000
    if profile.jitter_ms:
        due += rng.uniform(0, profile.jitter_ms) / 1000
    if profile.loss and rng.random() < profile.loss:
        due += profile.retransmit_ms / 1000
    due = max(due, state.last_due)
    state.last_due = due
    return due


@dataclass
class LinkStats:
    connections: int = 0
    refused: int = 0
    """Connections accepted and closed at once while the link was cut."""
    bytes_up: int = 0
    """Client to upstream."""
    bytes_down: int = 0
    """Upstream to client."""


@dataclass(eq=False)
class _Connection:
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def abort(self) -> None:
        for writer in self.writers:
            transport = writer.transport
            if transport is not None and not transport.is_closing():
                transport.abort()
        for task in self.tasks:
            task.cancel()


class LinkProxy:
    """Listens on ``listen_host:port`` (0: a free port) and forwards every connection to
    ``upstream``, shaped by ``profile``. Use as ``async with LinkProxy(...) as proxy``."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        profile: LinkProfile | None = None,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        seed: int | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.profile = profile or LinkProfile()
        self.listen_host = listen_host
        self._listen_port = listen_port
        self._rng = random.Random(seed)  # noqa: S311 - emulation, not cryptography
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._cut = False
        self.stats = LinkStats()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def cut_active(self) -> bool:
        return self._cut

    async def __aenter__(self) -> LinkProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.listen_host, self._listen_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until :meth:`restore`."""
        self._cut = True
        for conn in list(self._connections):
            conn.abort()
        log.info("link to %s:%d cut", *self.upstream)

    def restore(self) -> None:
        self._cut = False
        log.info("link to %s:%d restored", *self.upstream)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            self.stats.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError as exc:
            log.debug("upstream %s:%d refused: %s", *self.upstream, exc)
            writer.transport.abort()
            return
        self.stats.connections += 1
        conn = _Connection(writers=[writer, up_writer])
        self._connections.add(conn)
        conn.tasks = [
            asyncio.create_task(self._pipe(reader, up_writer, conn, up=True)),
            asyncio.create_task(self._pipe(up_reader, writer, conn, up=False)),
        ]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            pass  # the proxy is closing: this connection ends with it
        finally:
            conn.abort()
            self._connections.discard(conn)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: _Connection,
        *,
        up: bool,
    ) -> None:
        loop = asyncio.get_running_loop()
        state = Direction()
        queue: deque[tuple[float, bytes]] = deque()
        ready = asyncio.Event()
        eof = False

        async def deliver() -> None:
            while True:
                while not queue:
                    if eof:
                        return
                    ready.clear()
                    await ready.wait()
                due, data = queue[0]
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                queue.popleft()
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        conn.tasks.append(sender)
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    break
                if up:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
                queue.append(
                    (schedule(loop.time(), len(data), state, self.profile, self._rng), data)
                )
                ready.set()
            eof = True
            ready.set()
            await sender
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, asyncio.IncompleteReadError):
            conn.abort()
        finally:
            if not sender.done():
                sender.cancel()
