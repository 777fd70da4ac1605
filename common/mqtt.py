"""The MQTT v5 adapter: the only module of edgefed that imports paho-mqtt.

Why paho-mqtt 2.x driven from asyncio, rather than aiomqtt: edgefed must not lose a QoS 1
message when a process dies, so it acknowledges a message only after its handler has finished
(paho's ``manual_ack``, which aiomqtt does not expose); it reconnects in one loop of its own with
capped, jittered backoff while keeping paho's queue of unacknowledged outgoing messages, which
paho re-sends after the reconnect (aiomqtt asks the caller to build a new client, which drops
that queue); and the benchmark compares against raw paho, so the only overhead is ours. The
asyncio integration is the one paho documents for external loops (``on_socket_open``,
``loop_read``/``loop_write``/``loop_misc``), also used by aiomqtt.

What the adapter guarantees:

* MQTT v5 only; persistent sessions (clean start off, session expiry from settings); QoS 1.
* A message is acknowledged after its handler returns (or raises), never before. Messages that
  arrive before a handler is registered are held, unacknowledged, until one is.
* One reconnect loop per client, capped exponential backoff with full jitter; per-phase
  timeouts (connect, subscribe, publish) from :class:`~edgefed.common.settings.MqttSettings`.
* Subscriptions are renewed after a reconnect when the broker lost the session.
* TCP_NODELAY on every socket (Nagle's algorithm would add ~40-90 ms per round trip).
* Few system calls per message (:class:`_BufferedSocket`): paho reads a packet's header a byte
  at a time and sends each packet with its own ``send``; the adapter reads the socket once per
  readable event and writes every packet queued during one event-loop iteration with one
  ``send``, so a burst of replies and acknowledgements costs one system call, not one each.
* TLS, mutual TLS, user name / password; a retained last will; shared subscriptions.
* paho's exceptions and return codes never leave this module: see :mod:`edgefed.common.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import socket
import ssl
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, Self

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgefed.common.errors import (
    BrokerAuthError,
    BrokerUnavailable,
    ClientClosedError,
    ConfigError,
    MessagingError,
    PublishError,
)
from edgefed.common.mqtt_wire import MalformedPublish, PublishFields, parse_publish
from edgefed.common.settings import BrokerAddress, MqttSettings, Settings

log = logging.getLogger(__name__)

#: CONNACK / SUBACK reason codes that retrying will not fix.
_AUTH_REASONS = {0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C, 0x90, 0x97, 0x9A}
_MAX_EXPIRY = 2**32 - 1
_CLOSE_GRACE_S = 1.0
"""How long closing waits for outstanding acknowledgements, then for the broker to hang up, then
for the client's own tasks to end: closing takes at most three times this, whatever the link."""


@dataclass(frozen=True, slots=True)
class Message:
    """An MQTT message as handlers see it (no paho types)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    dup: bool = False
    content_type: str | None = None
    correlation_data: bytes | None = None
    response_topic: str | None = None
    expiry_s: int | None = None
    """Remaining message expiry when the broker delivered it (``None``: never expires)."""
    user_properties: tuple[tuple[str, str], ...] = ()
    received_at: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float | None:
        """``time.monotonic()`` value after which the sender no longer waits for this message."""
        return None if self.expiry_s is None else self.received_at + self.expiry_s

    def expired(self, now: float | None = None) -> bool:
        deadline = self.deadline
        return deadline is not None and (now if now is not None else time.monotonic()) >= deadline

    def user_property(self, name: str) -> str | None:
        for key, value in self.user_properties:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Will:
    """The last will: published by the broker when the client vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
    content_type: str | None = None
    delay_s: int = 0
    """Will delay interval: a reconnect within this time cancels the will."""


Handler = Callable[[Message], Awaitable[None]]
ConnectHook = Callable[[bool], Awaitable[None]]


@dataclass(slots=True)
class _Subscription:
    topic_filter: str
    match_filter: str
    handler: Handler
    qos: int
    levels: tuple[str, ...] = ()
    wildcard: bool = False

    def __post_init__(self) -> None:
        self.levels = tuple(self.match_filter.split("/"))
        self.wildcard = "+" in self.levels or "#" in self.levels

    def matches(self, topic: str) -> bool:
        """MQTT topic matching (section 4.7), without building paho's matcher per call."""
        if not self.wildcard:
            return topic == self.match_filter
        parts = topic.split("/")
        if topic.startswith("$") and self.levels[0] in ("+", "#"):
            return False  # wildcards at the first level do not match $-topics
        for i, level in enumerate(self.levels):
            if level == "#":
                return True
            if i >= len(parts) or (level != "+" and level != parts[i]):
                return False
        return len(parts) == len(self.levels)


@dataclass(slots=True)
class _Inbound:
    message: Message
    mid: int
    generation: int


def backoff_delay(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, initial * 2**(attempt-1))]."""
    ceiling = min(cap, initial * (2 ** min(max(attempt - 1, 0), 30)))
    return rng.uniform(0, ceiling)


def _match_filter(topic_filter: str) -> str:
    """The filter that incoming topics are matched against (``$share/<group>/`` stripped)."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            raise ConfigError(
                f"shared subscription {topic_filter!r} must be $share/<group>/<filter>"
            )
        return parts[2]
    return topic_filter


def _check_topic(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise ConfigError(
            f"cannot publish to {topic!r}: topics must be non-empty, without wildcards"
        )


def _check_filter(topic_filter: str) -> None:
    levels = _match_filter(topic_filter).split("/")
    problem = None
    if not topic_filter or "\0" in topic_filter:
        problem = "it is empty or contains NUL"
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            problem = "'#' must be a whole level and the last one"
        elif "+" in level and level != "+":
            problem = "'+' must be a whole level"
    if problem:
        raise ConfigError(f"invalid subscription filter {topic_filter!r}: {problem}")


class PublishProperties(Properties):
    """MQTT v5 PUBLISH properties, packed once when built.

    paho's :class:`Properties` validates every attribute assignment by scanning its name table
    (~7 us each) and packs the same way; a request/reply sets several per message. This class
    packs the five properties edgefed uses directly (MQTT v5 section 3.3.2.3); paho only calls
    ``pack()`` on outgoing properties. ``tests/test_mqtt_properties.py`` checks it byte for
    byte against paho's own packing.
    """

    def __init__(
        self,
        *,
        content_type: str | None = None,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        expiry_s: int | None = None,
        user_properties: tuple[tuple[str, str], ...] = (),
    ) -> None:
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        body = bytearray()
        if expiry_s is not None:
            body += b"\x02" + struct.pack("!I", expiry_s)
        if content_type is not None:
            body += b"\x03" + _utf8(content_type)
        if response_topic is not None:
            body += b"\x08" + _utf8(response_topic)
        if correlation_data is not None:
            if len(correlation_data) > 0xFFFF:
                raise ConfigError("correlation data is limited to 65535 bytes")
            body += b"\x09" + struct.pack("!H", len(correlation_data)) + correlation_data
        for key, value in user_properties:
            body += b"\x26" + _utf8(key) + _utf8(value)
        object.__setattr__(self, "_packed", _variable_int(len(body)) + bytes(body))
        object.__setattr__(
            self,
            "_summary",
            f"PublishProperties(content_type={content_type!r}, response_topic={response_topic!r}, "
            f"expiry_s={expiry_s}, correlation={len(correlation_data or b'')} B, "
            f"user={len(user_properties)})",
        )

    def pack(self) -> bytes:
        packed: bytes = self._packed  # type: ignore[attr-defined]
        return packed

    def __str__(self) -> str:
        summary: str = self._summary  # type: ignore[attr-defined]
        return summary

    __repr__ = __str__


def _utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ConfigError("MQTT strings are limited to 65535 bytes")
    return struct.pack("!H", len(data)) + data


def _variable_int(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


_READ_CHUNK = 65536
"""Bytes asked of the kernel per read: a burst of small packets arrives in one call."""


class _BufferedSocket:
    """paho's socket with a read buffer and a write buffer (paho sees a plain socket).

    Reads: one ``recv`` of :data:`_READ_CHUNK` serves paho's many small reads. When a read
    returned less than it asked for, the socket is taken to be empty until the event loop says
    it is readable again (:meth:`begin_read`), so draining costs no extra ``recv`` that fails
    with ``EAGAIN``; level-triggered readiness makes that safe.

    Writes: ``send`` only appends; :meth:`flush` writes the whole buffer with as few ``send``
    calls as the kernel allows and says whether anything is left (then the adapter waits for
    the socket to be writable). :meth:`close` flushes first, so a DISCONNECT that paho queues
    and closes right after still leaves (otherwise the broker would publish the will).
    """

    __slots__ = ("_drained", "_rbuf", "_rpos", "_wbuf", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._rbuf = b""
        self._rpos = 0
        self._drained = False
        self._wbuf = bytearray()

    # reading

    def begin_read(self) -> None:
        """The event loop reported the socket readable: the next empty-buffer read asks it."""
        self._drained = False

    def recv(self, size: int) -> bytes:
        start = self._rpos
        buffered = len(self._rbuf) - start
        if buffered == 0:
            if self._drained and not self._tls_pending():
                raise BlockingIOError
            want = max(size, _READ_CHUNK)
            data: bytes = self.sock.recv(want)
            self._drained = len(data) < want
            if len(data) <= size:
                return data  # b"" at EOF: paho reports the connection lost
            self._rbuf, self._rpos = data, size
            return data[:size]
        if size >= buffered:
            out = self._rbuf[start:]
            self._rbuf, self._rpos = b"", 0
            return out
        self._rpos = start + size
        return self._rbuf[start : start + size]

    def pending(self) -> int:
        """Bytes readable without asking the kernel (buffered here or inside TLS)."""
        return len(self._rbuf) - self._rpos + self._tls_pending()

    def _tls_pending(self) -> int:
        pending = getattr(self.sock, "pending", None)
        return int(pending()) if pending is not None else 0

    # writing

    def send(self, buffer: bytes | bytearray) -> int:
        self._wbuf += buffer
        return len(buffer)

    def flush(self) -> bool:
        """Write what the kernel takes now; ``True`` when nothing is left. Raises ``OSError``
        (or an ``ssl.SSLError``) when the connection is broken."""
        buf = self._wbuf
        while buf:
            try:
                sent = self.sock.send(buf)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return False
            if sent <= 0:
                return False
            del buf[:sent]
        return True

    # the rest of the socket

    def close(self) -> None:
        try:
            with contextlib.suppress(OSError, ssl.SSLError):
                self.flush()
        finally:
            self._wbuf.clear()
            self.sock.close()

    def fileno(self) -> int:
        fileno: int = self.sock.fileno()
        return fileno

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PUBACK_PROPERTIES = Properties(PacketTypes.PUBACK)  # type: ignore[no-untyped-call]


class _PahoClient(paho.Client):
    """paho's client with the hot paths of request/reply made cheap; paho keeps the protocol.

    Three paho 2.x methods are replaced, each falling back to paho outside the case it speeds
    up (the fast paths carry every message of ``tests/test_mqtt_integration.py`` and
    ``tests/test_mqtt_batched_io.py``; ``tests/test_mqtt_wire.py`` checks the parser against
    paho's own):

    * ``_create_socket`` wraps paho's socket (TCP or TLS) in a :class:`_BufferedSocket`;
    * ``_handle_publish`` reads a v5 QoS 0/1 PUBLISH with :func:`parse_publish` and hands it to
      ``deliver`` (acknowledged later by the adapter, as ``manual_ack`` has paho do);
    * ``_handle_pubackcomp`` answers a plain successful PUBACK (packet id only, how brokers
      acknowledge almost every message) with shared reason-code and property objects, where
      paho builds two fresh ones whose constructors cost tens of microseconds.
    """

    def __init__(self, deliver: Callable[[PublishFields], None], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._edgefed_deliver = deliver

    def _create_socket(self) -> Any:
        return _BufferedSocket(super()._create_socket())

    def _handle_publish(self) -> MQTTErrorCode:
        header = self._in_packet["command"]
        if (
            not self._manual_ack
            or self._protocol != MQTTProtocolVersion.MQTTv5
            or (header >> 1) & 0x03 > 1
        ):
            return super()._handle_publish()
        try:
            fields = parse_publish(header, self._in_packet["packet"])
        except MalformedPublish as exc:
            raise MalformedPacket(str(exc)) from exc
        self._edgefed_deliver(fields)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_pubackcomp(self, cmd: Literal["PUBACK", "PUBCOMP"]) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or len(packet) != 2 or self._protocol != MQTTProtocolVersion.MQTTv5:
            return super()._handle_pubackcomp(cmd)
        mid = (packet[0] << 8) | packet[1]
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PUBACK_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


class MqttClient:
    """An MQTT v5 client session with a broker, used as ``async with MqttClient(...) as c``.

    ``require_connection`` makes entering wait (up to ``connect_timeout_s``) for the first
    connection and raise :class:`BrokerUnavailable` or :class:`BrokerAuthError` when it cannot be
    made; with ``False`` entering returns at once and the client keeps trying in the background
    (publishes are queued meanwhile), which is what an edge agent wants when the uplink is down.

    ``clean_start="first"`` discards the session a predecessor with the same client id left on
    the broker (its queued messages never reach this client), then keeps its own session through
    later reconnects: for a restarted agent, whose queued requests routers failed over on its
    last will. The discarding is a separate short connection (clean start, session expiry 0)
    before the first real one, because mosquitto never writes the session of a clean-start
    connection to its store: a broker restart would lose it.
    """

    def __init__(
        self,
        address: BrokerAddress,
        settings: MqttSettings,
        *,
        client_id: str,
        will: Will | None = None,
        clean_start: bool | Literal["first"] = False,
        require_connection: bool = True,
        max_queued_outgoing: int = 10_000,
        rng: random.Random | None = None,
    ) -> None:
        if not client_id or len(client_id) > 128:
            raise ConfigError("client_id must be 1-128 characters")
        self.address = address
        self.settings = settings
        self.client_id = client_id
        self._will = will
        self._clean_start = clean_start
        self._predecessor_discarded = False
        self._require_connection = require_connection
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._max_queued_outgoing = max_queued_outgoing

        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._paho: paho.Client | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

        self._connected: asyncio.Event | None = None
        self._generation = 0
        self._session_present = False
        self._fd: int | None = None
        self._write_scheduled = False
        self._writer_armed = False
        self._connack: asyncio.Future[tuple[int, bool]] | None = None
        self._lost: asyncio.Event | None = None
        self._fatal: MessagingError | None = None
        self._last_error: MessagingError | None = None
        self._connect_log: str | None = None
        self._closing = False
        self._closed = False
        self._entered = False

        self._subscriptions: dict[str, _Subscription] = {}
        self._pending_subacks: dict[int, asyncio.Future[list[ReasonCode]]] = {}
        self._pending_pubacks: dict[int, asyncio.Future[ReasonCode]] = {}
        self._unacked: set[int] = set()
        """Packet ids of QoS 1 messages published and not yet acknowledged by the broker."""
        self._all_acked: asyncio.Event | None = None
        self._held: deque[_Inbound] = deque(maxlen=10_000)
        self._connect_hooks: list[ConnectHook] = []
        self.reconnects = 0
        """Successful connections after the first (for tests and metrics)."""

    # ------------------------------------------------------------------ construction helpers

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        client_id: str,
        will: Will | None = None,
        require_connection: bool = True,
    ) -> MqttClient:
        return cls(
            settings.broker_address(),
            settings.mqtt,
            client_id=client_id,
            will=will,
            require_connection=require_connection,
        )

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        if self._closed or self._entered:
            raise ClientClosedError(f"MQTT client {self.client_id} cannot be entered twice")
        self._entered = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._connected = asyncio.Event()
        self._lost = asyncio.Event()
        self._paho = self._make_paho()
        self._supervisor = asyncio.create_task(
            self._run(), name=f"mqtt-connection:{self.client_id}"
        )
        if self._require_connection:
            try:
                await self.wait_connected(self.settings.connect_timeout_s)
            except BaseException:
                await self.aclose()
                raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self, *, publish_will: bool = False) -> None:
        """Disconnect cleanly (the will is discarded unless ``publish_will``) and stop.

        Bounded whatever the link does (see :data:`_CLOSE_GRACE_S`). Cancelling it skips the
        goodbye, never the clean-up: the socket is closed and the client's tasks are cancelled
        before the cancellation goes on.
        """
        if self._closed:
            return
        self._closing = True
        client = self._paho
        try:
            if client is not None:
                await self._say_goodbye(client, publish_will)
        finally:
            try:
                await self._stop_tasks()
            finally:
                self._release(client)

    async def _say_goodbye(self, client: paho.Client, publish_will: bool) -> None:
        """Let outstanding acknowledgements arrive, then DISCONNECT (each wait bounded)."""
        if self.connected and self._unacked:
            await self._wait_all_acked(_CLOSE_GRACE_S)
        if not self.connected:
            return
        reason = ReasonCode(
            PacketTypes.DISCONNECT,
            "Disconnect with will message" if publish_will else "Normal disconnection",
        )
        with contextlib.suppress(Exception):
            client.disconnect(reasoncode=reason)
            if client.want_write():
                client.loop_write()
        # Give the DISCONNECT a moment to leave; the broker closes the socket after it.
        if self._lost is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CLOSE_GRACE_S):
                    await self._lost.wait()

    async def _stop_tasks(self) -> None:
        """Cancel the connection loop and running handlers; wait a bounded time for them (a
        handler that ignores its cancellation is left behind with a warning, not waited for)."""
        tasks = [t for t in (self._supervisor, self._misc, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        done, stuck = await asyncio.wait(tasks, timeout=_CLOSE_GRACE_S)
        for task in done:
            if not task.cancelled():
                task.exception()  # retrieved: the tasks log their own failures
        for task in stuck:
            log.warning("mqtt %s: %s did not stop when cancelled", self.client_id, task.get_name())

    def _release(self, client: paho.Client | None) -> None:
        """Close the socket and fail whatever still waits on this client (synchronous)."""
        if client is not None:
            self._drop_socket(client)
        closed = ClientClosedError(f"MQTT client {self.client_id} closed")
        # Only futures that a caller awaits are registered (callers remove theirs when they
        # stop waiting), so every exception set here is retrieved.
        waiting: list[asyncio.Future[Any]] = [
            *self._pending_pubacks.values(),
            *self._pending_subacks.values(),
        ]
        for fut in waiting:
            if not fut.done():
                fut.set_exception(closed)
        self._pending_pubacks.clear()
        self._pending_subacks.clear()
        if self._connack is not None and not self._connack.done():
            self._connack.cancel()
        self._closed = True

    async def _wait_all_acked(self, timeout: float) -> None:
        """Wait (at most ``timeout``) for the broker to acknowledge every QoS 1 message sent.

        Closing with acknowledgements still unread makes the kernel reset the connection, and a
        reset can make the broker drop what it had not read yet -- queued messages and the
        DISCONNECT, so it would publish the will. Packets leave in batches (see
        :class:`_BufferedSocket`), so the last batch is usually still in the broker's buffer.
        """
        self._all_acked = asyncio.Event()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._all_acked.wait()
        finally:
            self._all_acked = None

    def add_connect_hook(self, hook: ConnectHook) -> None:
        """``await hook(session_present)`` after every (re)connection, once subscribed."""
        self._connect_hooks.append(hook)

    @property
    def tcp_nodelay(self) -> bool | None:
        """Whether Nagle's algorithm is off on the current socket (``None`` when not connected)."""
        sock = _raw_socket(self._paho.socket() if self._paho is not None else None)
        if sock is None:
            return None
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @property
    def connected(self) -> bool:
        return self._connected is not None and self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait for a live connection; raise the fatal error or :class:`BrokerUnavailable`."""
        self._check_open()
        assert self._connected is not None
        if self._fatal:
            raise self._fatal
        waiter = asyncio.ensure_future(self._connected.wait())
        assert self._supervisor is not None
        try:
            _done, _ = await asyncio.wait(
                {waiter, self._supervisor}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        if self._fatal:
            raise self._fatal
        if not self.connected:
            detail = f": {self._last_error.message}" if self._last_error else ""
            raise BrokerUnavailable(
                f"no connection to mqtt://{self.address.host}:{self.address.port} "
                f"within {timeout} s{detail}"
            )

    # ------------------------------------------------------------------ publish / subscribe

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        content_type: str | None = None,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        expiry_s: float | None = None,
        user_properties: Iterable[tuple[str, str]] = (),
        wait: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Publish a message.

        With QoS 1 and ``wait`` the call returns when the broker acknowledged it, waiting through
        reconnects for at most ``timeout`` (default ``publish_timeout_s``). On
        :class:`PublishError` the message may still be delivered later (at-least-once):
        receivers de-duplicate by id. Without ``wait`` the message is queued and the call returns
        at once; queued QoS 1 messages survive reconnects.
        """
        self._check_open()
        if qos not in (0, 1):
            raise ConfigError("edgefed publishes with QoS 0 or 1")
        _check_topic(topic)
        if len(payload) > self.settings.max_payload_bytes:
            raise PublishError(
                f"payload of {len(payload)} bytes exceeds max_payload_bytes "
                f"({self.settings.max_payload_bytes})"
            )
        if response_topic is not None:
            _check_topic(response_topic)
        props = PublishProperties(
            content_type=content_type,
            correlation_data=correlation_data,
            response_topic=response_topic,
            expiry_s=None if expiry_s is None else min(_MAX_EXPIRY, max(1, math.ceil(expiry_s))),
            user_properties=tuple(user_properties),
        )
        client = self._client()
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if qos == 1 and info.rc in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._unacked.add(info.mid)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise PublishError(
                f"outgoing queue is full ({self._max_queued_outgoing} messages) while the "
                "broker is unreachable",
                retry_after=self.settings.backoff_max_s,
            )
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise PublishError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos == 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            raise BrokerUnavailable(f"not connected: QoS 0 message to {topic} dropped")
        self._flush(client)
        # paho's is_published() raises for a message queued while disconnected (rc NO_CONN):
        # such a message is sent after the reconnect and its PUBACK resolves the future below.
        queued = info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN
        if qos == 0 or not wait or (not queued and info.is_published()):
            return
        loop = self._running_loop()
        fut = self._pending_pubacks.get(info.mid)
        if fut is None:
            fut = loop.create_future()
            self._pending_pubacks[info.mid] = fut
        if not queued and info.is_published():  # acknowledged while we registered
            self._pending_pubacks.pop(info.mid, None)
            return
        limit = timeout if timeout is not None else self.settings.publish_timeout_s
        try:
            # asyncio.timeout, not asyncio.wait_for: on Python 3.11, wait_for swallows a
            # cancellation that arrives together with the PUBACK, and the caller's loop runs on.
            async with asyncio.timeout(limit):
                reason = await fut
        except TimeoutError:
            raise PublishError(
                f"no PUBACK for the message to {topic} within {limit} s "
                "(it stays queued and may still be delivered)"
            ) from None
        finally:
            # Nobody waits for this PUBACK any more: a future left registered would get
            # ClientClosedError at close that no one retrieves.
            if self._pending_pubacks.get(info.mid) is fut:
                del self._pending_pubacks[info.mid]
        if reason.value >= 0x80:
            if reason.value in _AUTH_REASONS:
                raise BrokerAuthError(f"broker refused the publish to {topic}: {reason}")
            raise PublishError(f"broker refused the publish to {topic}: {reason}")

    async def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        qos: int = 1,
        timeout: float | None = None,
    ) -> None:
        """Route messages matching ``topic_filter`` to ``handler`` and subscribe at the broker.

        Returns once the broker granted the subscription (waiting for a connection for at most
        ``timeout``, default ``subscribe_timeout_s``). A filter can have one handler.
        """
        self._check_open()
        _check_filter(topic_filter)
        if topic_filter in self._subscriptions:
            raise ConfigError(f"{topic_filter!r} already has a handler")
        sub = _Subscription(topic_filter, _match_filter(topic_filter), handler, qos)
        self._subscriptions[topic_filter] = sub
        limit = timeout if timeout is not None else self.settings.subscribe_timeout_s
        try:
            async with asyncio.timeout(limit):
                while True:
                    await self.wait_connected(None)
                    generation = self._generation
                    try:
                        await self._send_subscribe([sub])
                        break
                    except BrokerUnavailable:
                        if self._generation == generation:
                            await asyncio.sleep(0.05)
        except TimeoutError:
            del self._subscriptions[topic_filter]
            raise BrokerUnavailable(
                f"subscription to {topic_filter!r} not granted within {limit} s"
            ) from None
        except BaseException:
            del self._subscriptions[topic_filter]
            raise
        self._release_held()

    async def unsubscribe(self, topic_filter: str) -> None:
        self._check_open()
        if self._subscriptions.pop(topic_filter, None) is None:
            return
        client = self._client()
        if self.connected:
            client.unsubscribe(topic_filter)
            self._flush(client)

    # ------------------------------------------------------------------ connection supervisor

    async def _run(self) -> None:
        try:
            await self._connection_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave callers waiting on a dead loop
            log.exception("mqtt %s: the connection loop failed", self.client_id)
            self._fatal = MessagingError(f"the MQTT connection loop failed: {exc!r}")

    async def _connection_loop(self) -> None:
        attempt = 0
        first = True
        assert self._connected is not None
        assert self._lost is not None
        while not self._closing:
            try:
                session_present = await self._connect_once()
            except BrokerAuthError as exc:
                self._fatal = exc
                log.error("mqtt %s: %s (not retrying)", self.client_id, exc.message)
                return
            except BrokerUnavailable as exc:
                self._last_error = exc
                attempt += 1
                delay = backoff_delay(
                    attempt, self.settings.backoff_initial_s, self.settings.backoff_max_s, self._rng
                )
                log.info("mqtt %s: %s; retrying in %.2f s", self.client_id, exc.message, delay)
                await asyncio.sleep(delay)
                continue
            attempt = 0
            if not first:
                self.reconnects += 1
            first = False
            self._session_present = session_present
            self._misc = asyncio.create_task(self._misc_loop(), name=f"mqtt-misc:{self.client_id}")
            try:
                if not session_present:
                    await self._resubscribe_all()
                self._connected.set()
                self._release_held()
                for hook in self._connect_hooks:
                    self._spawn(hook(session_present), "connect-hook")
                await self._lost.wait()
            except BrokerUnavailable as exc:
                self._last_error = exc
            except BrokerAuthError as exc:
                self._fatal = exc
                return
            finally:
                self._connected.clear()
                self._misc.cancel()
            if not self._closing:
                log.warning("mqtt %s: connection lost; reconnecting", self.client_id)

    async def _connect_once(self) -> bool:
        """One connection attempt: TCP (+TLS) in a thread, then CONNACK. Returns session_present."""
        assert self._lost is not None
        if self._clean_start == "first" and not self._predecessor_discarded:
            await self._discard_predecessor()
            self._predecessor_discarded = True
        client = self._client()
        loop = self._running_loop()
        self._lost.clear()
        self._connack = loop.create_future()
        self._generation += 1
        self._connect_log = None
        client.on_log = self._on_log  # only while connecting: paho formats every line it logs
        limit = self.settings.connect_timeout_s
        started = time.monotonic()
        connack = self._connack
        try:
            # asyncio.timeout, not asyncio.wait_for, which swallows a cancellation on Python 3.11
            # when the connection completes at the same moment (and the loop then runs on).
            async with asyncio.timeout(limit):
                await loop.run_in_executor(None, self._blocking_connect)
            async with asyncio.timeout(max(0.05, limit - (time.monotonic() - started))):
                code, session_present = await connack
        except TimeoutError:
            self._drop_socket(client)
            raise BrokerUnavailable(
                f"connecting to {self.address.host}:{self.address.port} timed out after {limit} s"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            self._drop_socket(client)
            raise BrokerAuthError(
                f"the broker's TLS certificate is not trusted: {exc.verify_message or exc}"
            ) from exc
        except ssl.SSLError as exc:
            self._drop_socket(client)
            raise BrokerAuthError(f"TLS handshake with the broker failed: {exc}") from exc
        except OSError as exc:
            self._drop_socket(client)
            raise BrokerUnavailable(
                f"cannot reach {self.address.host}:{self.address.port}: {exc}"
            ) from exc
        except (BrokerUnavailable, BrokerAuthError):
            self._drop_socket(client)
            raise
        finally:
            client.on_log = None
            if not connack.done():
                connack.cancel()  # abandoned: a late CONNACK or loss finds nobody waiting
        if code != 0:
            self._drop_socket(client)
            reason = ReasonCode(PacketTypes.CONNACK, identifier=code)
            if code in _AUTH_REASONS:
                raise BrokerAuthError(f"the broker refused the connection: {reason}")
            raise BrokerUnavailable(f"the broker refused the connection: {reason}")
        log.debug("mqtt %s connected (session present: %s)", self.client_id, session_present)
        return session_present

    async def _discard_predecessor(self) -> None:
        """Connect once with clean start and session expiry 0 under our client id, then
        disconnect: the broker drops the old session and keeps none of this one."""
        settings = self.settings.model_copy(update={"session_expiry_s": 0})
        async with MqttClient(self.address, settings, client_id=self.client_id, clean_start=True):
            log.debug("mqtt %s: discarded the session of a predecessor", self.client_id)

    def _blocking_connect(self) -> None:
        """Runs in an executor thread: paho opens the socket (and TLS) and sends CONNECT."""
        client = self._client()
        rc = client.reconnect()
        if self._closing or self._closed:
            # Closed while this thread connected: nobody reads this socket, and a CONNECT left
            # open would take the session (same client id) from the next instance of the client.
            self._close_late_socket(client)
            return
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerUnavailable(f"sending CONNECT failed: {paho.error_string(rc)}")

    def _close_late_socket(self, client: paho.Client) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._drop_socket, client)
                return
        with contextlib.suppress(Exception):
            client._sock_close()

    async def _resubscribe_all(self) -> None:
        subs = list(self._subscriptions.values())
        if subs:
            await self._send_subscribe(subs)

    async def _send_subscribe(self, subs: Sequence[_Subscription]) -> None:
        client = self._client()
        loop = self._running_loop()
        request = [(s.topic_filter, SubscribeOptions(qos=s.qos, retainHandling=0)) for s in subs]
        rc, mid = client.subscribe(request)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerUnavailable(f"subscribe failed: {paho.error_string(rc)}")
        fut: asyncio.Future[list[ReasonCode]] = loop.create_future()
        self._pending_subacks[mid] = fut
        self._flush(client)
        assert self._lost is not None
        lost: asyncio.Future[Any] = asyncio.ensure_future(self._lost.wait())
        try:
            done, _ = await asyncio.wait(
                {fut, lost},
                timeout=self.settings.subscribe_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            lost.cancel()
            self._pending_subacks.pop(mid, None)
        if fut not in done:
            raise BrokerUnavailable("no SUBACK from the broker")
        for sub, code in zip(subs, fut.result(), strict=False):
            if code.value >= 0x80:
                if code.value in _AUTH_REASONS:
                    raise BrokerAuthError(f"subscription to {sub.topic_filter!r} refused: {code}")
                raise BrokerUnavailable(f"subscription to {sub.topic_filter!r} refused: {code}")

    async def _misc_loop(self) -> None:
        client = self._client()
        while True:
            await asyncio.sleep(1.0)
            client.loop_misc()

    # ------------------------------------------------------------------ paho glue

    def _make_paho(self) -> paho.Client:
        client = _PahoClient(
            self._on_publish_fields,
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            transport="tcp",
            reconnect_on_failure=False,
            manual_ack=True,
        )
        client.connect_timeout = self.settings.connect_timeout_s
        client.max_inflight_messages_set(self.settings.receive_maximum)
        client.max_queued_messages_set(self._max_queued_outgoing)
        username = self.settings.username or self.address.username
        password = self.settings.password or self.address.password
        if username is not None:
            client.username_pw_set(username, password.get_secret_value() if password else None)
        if self.address.tls:
            client.tls_set_context(self._ssl_context())
            # paho checks the host name itself unless told the context does it.
            client.tls_insecure_set(not self.settings.tls_check_hostname)
        elif self.settings.cert_file or self.settings.ca_file:
            raise ConfigError(
                "TLS files are configured but the broker URL is not mqtts://; use mqtts://host:port"
            )
        if self._will is not None:
            will_props = Properties(PacketTypes.WILLMESSAGE)  # type: ignore[no-untyped-call]
            if self._will.content_type:
                will_props.ContentType = self._will.content_type
            if self._will.delay_s:
                will_props.WillDelayInterval = self._will.delay_s
            client.will_set(
                self._will.topic,
                self._will.payload,
                qos=self._will.qos,
                retain=self._will.retain,
                properties=will_props,
            )
        connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_props.SessionExpiryInterval = min(_MAX_EXPIRY, self.settings.session_expiry_s)
        connect_props.ReceiveMaximum = self.settings.receive_maximum
        client.connect_async(
            self.address.host,
            self.address.port,
            keepalive=self.settings.keepalive_s,
            clean_start=self._clean_start is True,
            properties=connect_props,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        return client

    def _ssl_context(self) -> ssl.SSLContext:
        s = self.settings
        try:
            ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if s.cert_file is not None:
                ctx.load_cert_chain(
                    str(s.cert_file), str(s.key_file) if s.key_file is not None else None
                )
            elif s.key_file is not None:
                raise ConfigError("mqtt.key_file is set without mqtt.cert_file")
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS files: {exc}") from exc
        ctx.check_hostname = s.tls_check_hostname
        return ctx

    def _in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        raw = _raw_socket(sock)
        if raw is not None and raw.family in (socket.AF_INET, socket.AF_INET6):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = sock.fileno()
        self._fd = fd
        self._in_loop(self._add_reader, fd)

    def _add_reader(self, fd: int) -> None:
        assert self._loop is not None
        if self._fd == fd and not (self._closed or self._closing):
            self._loop.add_reader(fd, self._do_read)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        fd = self._fd
        self._fd = None
        self._writer_armed = False
        if fd is not None and self._loop is not None and not self._loop.is_closed():
            self._in_loop(self._loop.remove_reader, fd)
            self._in_loop(self._loop.remove_writer, fd)

    # Writes: paho queues packets (and says so through on_socket_register_write); the adapter
    # hands them to the socket once per event-loop iteration (_write_out), where they leave in
    # one send. Only when the kernel's buffer is full does it wait for the socket to be writable.

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._schedule_write)

    def _schedule_write(self) -> None:
        if not self._write_scheduled and self._loop is not None and not self._loop.is_closed():
            self._write_scheduled = True
            self._loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        self._write_scheduled = False
        client = self._paho
        if client is None:
            return
        try:
            if client.want_write():
                client.loop_write()
            sock = client.socket()
            if not isinstance(sock, _BufferedSocket):
                return  # closed (a DISCONNECT closes the socket once written)
            done = sock.flush()
        except (OSError, ssl.SSLError) as exc:
            log.debug("mqtt %s write failed: %s", self.client_id, exc)
            self._drop_socket(client)
            self._mark_lost()
            return
        self._arm_writer(not done)

    def _arm_writer(self, wanted: bool) -> None:
        fd, loop = self._fd, self._loop
        if fd is None or loop is None or loop.is_closed() or wanted == self._writer_armed:
            return
        if wanted:
            loop.add_writer(fd, self._write_out)
        else:
            loop.remove_writer(fd)
        self._writer_armed = wanted

    def _do_read(self) -> None:
        client = self._paho
        if client is None:
            return
        sock = client.socket()
        if isinstance(sock, _BufferedSocket):
            sock.begin_read()
        try:
            while True:
                client.loop_read()
                sock = client.socket()
                if sock is not None and hasattr(sock, "pending") and sock.pending() > 0:
                    continue
                break
        except (OSError, ssl.SSLError) as exc:
            log.debug("mqtt %s read failed: %s", self.client_id, exc)
            self._drop_socket(client)
            self._mark_lost()

    def _flush(self, client: paho.Client) -> None:
        """Send queued packets at the end of this event-loop iteration (one send for all)."""
        self._schedule_write()

    def _drop_socket(self, client: paho.Client) -> None:
        sock = client.socket()
        if sock is not None:
            with contextlib.suppress(Exception):
                client._sock_close()
        if self._fd is not None and self._loop is not None and not self._loop.is_closed():
            fd, self._fd = self._fd, None
            with contextlib.suppress(Exception):
                self._loop.remove_reader(fd)
                self._loop.remove_writer(fd)
        self._writer_armed = False

    def _on_log(self, client: paho.Client, userdata: Any, level: int, buf: str) -> None:
        if level == paho.MQTT_LOG_ERR:
            self._connect_log = buf

    def _mark_lost(self) -> None:
        if self._lost is not None:
            self._lost.set()
        if self._connack is not None and not self._connack.done():
            detail = self._connect_log or ""
            lowered = detail.lower()
            if "alert" in lowered and ("certificate" in lowered or "unknown_ca" in lowered):
                # TLS 1.3: the broker checks our certificate after the handshake and answers
                # with an alert on the first read.
                self._connack.set_exception(
                    BrokerAuthError(f"the broker refused our TLS client certificate: {detail}")
                )
            else:
                suffix = f" ({detail})" if detail else ""
                self._connack.set_exception(
                    BrokerUnavailable(f"connection closed before CONNACK{suffix}")
                )
        for fut in list(self._pending_subacks.values()):
            if not fut.done():
                fut.set_exception(BrokerUnavailable("connection lost before SUBACK"))

    # paho callbacks: they run in the loop thread (inside loop_read/loop_write), except for
    # on_socket_* during the connect in the executor thread, handled above.

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        result = (reason_code.value, bool(flags.session_present))

        def deliver() -> None:
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(result)

        self._in_loop(deliver)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        log.debug("mqtt %s disconnected: %s", self.client_id, reason_code)
        self._in_loop(self._mark_lost)

    def _on_publish(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        def deliver() -> None:
            self._unacked.discard(mid)
            if not self._unacked and self._all_acked is not None:
                self._all_acked.set()
            fut = self._pending_pubacks.pop(mid, None)
            if fut is not None and not fut.done():
                fut.set_result(reason_code)

        self._in_loop(deliver)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        def deliver() -> None:
            fut = self._pending_subacks.get(mid)
            if fut is not None and not fut.done():
                fut.set_result(list(reason_codes))

        self._in_loop(deliver)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        message = Message(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            dup=bool(msg.dup),
            content_type=getattr(props, "ContentType", None),
            correlation_data=getattr(props, "CorrelationData", None),
            response_topic=getattr(props, "ResponseTopic", None),
            expiry_s=getattr(props, "MessageExpiryInterval", None),
            user_properties=tuple(getattr(props, "UserProperty", ()) or ()),
        )
        self._receive(message, msg.mid)

    def _on_publish_fields(self, f: PublishFields) -> None:
        """A v5 PUBLISH read by :func:`parse_publish` (the usual path; see :class:`_PahoClient`)."""
        message = Message(
            topic=f.topic,
            payload=f.payload,
            qos=f.qos,
            retain=f.retain,
            dup=f.dup,
            content_type=f.content_type,
            correlation_data=f.correlation_data,
            response_topic=f.response_topic,
            expiry_s=f.expiry_s,
            user_properties=f.user_properties,
        )
        self._receive(message, f.mid)

    def _receive(self, message: Message, mid: int) -> None:
        inbound = _Inbound(message, mid, self._generation)
        if not self._route(inbound):
            if len(self._held) == self._held.maxlen:
                log.warning("mqtt %s: too many unrouted messages; dropping oldest", self.client_id)
            self._held.append(inbound)

    def _route(self, inbound: _Inbound) -> bool:
        topic = inbound.message.topic
        for sub in self._subscriptions.values():
            if sub.matches(topic):
                self._spawn(self._handle(sub, inbound), f"handle:{sub.topic_filter}")
                return True
        return False

    def _release_held(self) -> None:
        held, self._held = self._held, deque(maxlen=self._held.maxlen)
        for inbound in held:
            if not self._route(inbound):
                self._held.append(inbound)

    async def _handle(self, sub: _Subscription, inbound: _Inbound) -> None:
        try:
            await sub.handler(inbound.message)
        except Exception:
            log.exception(
                "mqtt %s: handler for %s failed on %s",
                self.client_id,
                sub.topic_filter,
                inbound.message.topic,
            )
        finally:
            self._ack(inbound)

    def _ack(self, inbound: _Inbound) -> None:
        if inbound.message.qos == 0 or self._closed:
            return
        client = self._paho
        # A message id belongs to one connection; after a reconnect the broker re-sends the
        # message (dup) and that copy is acknowledged instead.
        if client is None or inbound.generation != self._generation or not self.connected:
            return
        client.ack(inbound.mid, inbound.message.qos)
        self._flush(client)

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(f"mqtt:{self.client_id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ small helpers

    def _client(self) -> paho.Client:
        if self._paho is None:
            raise ClientClosedError(f"MQTT client {self.client_id} is not entered")
        return self._paho

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _check_open(self) -> None:
        if self._closed or self._closing:
            raise ClientClosedError(f"MQTT client {self.client_id} is closed")
        if not self._entered:
            raise ClientClosedError(
                f"MQTT client {self.client_id} is not entered: use `async with`"
            )


def _raw_socket(sock: Any) -> socket.socket | None:
    """The OS socket under paho's (possibly buffered) socket, for socket options."""
    raw = sock.sock if isinstance(sock, _BufferedSocket) else sock
    return raw if isinstance(raw, socket.socket) else None


def new_client_id(prefix: str = "edgefed") -> str:
    """A client id unlikely to collide: ``<prefix>-<12 hex>``."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
