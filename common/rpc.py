"""Request/reply over MQTT v5: response topic + correlation data, message expiry as the deadline.

A requester publishes with ``ResponseTopic`` = its own ``clients/<id>/replies`` topic,
``CorrelationData`` = 16 random bytes and ``MessageExpiryInterval`` = the deadline in whole
seconds (rounded up), then waits for the reply with the same correlation data. It gets the reply,
a remote error (:class:`RemoteTemporaryError` / :class:`RemotePermanentError` from an
:class:`ErrorReply`) or :class:`RequestTimeout` -- never silence.

A responder (:func:`serve`) answers every request that carries a response topic: with the
handler's reply, or an :class:`ErrorReply` when the payload is malformed, of an unknown kind or
schema version, already past its deadline, or when the handler fails. A failing request never
stops the responder. Requests are de-duplicated by their id (``request_id`` / ``command_id``):
a retried or re-delivered request gets the first answer again instead of running twice.

Clocks differ between machines (an edge device an hour off is common), so an absolute
``deadline`` in a payload is never compared with the responder's clock as it is: the requester
adds its own wall-clock time as the user property ``sent-at``, and the responder re-bases the
deadline onto its clock (``its now + deadline - sent-at``) before checking it and before the
handler sees it. A request without ``sent-at`` (a third-party client) is taken at its word.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import numpy as np

from edgefed.common.errors import (
    EdgefedError,
    ErrorCode,
    PayloadError,
    RemotePermanentError,
    RemoteTemporaryError,
    RequestTimeout,
    TemporaryError,
)
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.schemas import (
    Decoded,
    Encoded,
    ErrorReply,
    WireModel,
    decode,
    encode,
    peek_request_id,
)
from edgefed.common.tensors import Compression
from edgefed.common.topics import Topics

log = logging.getLogger(__name__)

M = TypeVar("M", bound=WireModel)
R = TypeVar("R", bound=WireModel)

Reply = WireModel | Encoded
RequestHandler = Callable[[Decoded[M], Message], Awaitable[Reply]]


class Requester:
    """Sends requests from one client and matches replies by correlation data."""

    def __init__(
        self,
        client: MqttClient,
        topics: Topics,
        *,
        inbox_id: str | None = None,
        default_timeout: float | None = None,
    ) -> None:
        self.client = client
        self.reply_topic = topics.replies(inbox_id or client.client_id)
        self.default_timeout = default_timeout or client.settings.request_timeout_s
        self._waiting: dict[bytes, asyncio.Future[Message]] = {}
        self._start_lock = asyncio.Lock()
        self._started = False
        self.late_replies = 0
        """Replies that arrived after their request timed out (dropped)."""

    async def start(self) -> None:
        """Subscribe to the reply topic (idempotent)."""
        if self._started:
            return
        async with self._start_lock:
            if not self._started:
                await self.client.subscribe(self.reply_topic, self._on_reply)
                self._started = True

    async def _on_reply(self, message: Message) -> None:
        corr = message.correlation_data
        fut = self._waiting.get(corr) if corr is not None else None
        if fut is None or fut.done():
            self.late_replies += 1
            log.debug("reply on %s matches no waiting request; dropped", message.topic)
            return
        fut.set_result(message)

    async def request_raw(
        self,
        topic: str,
        payload: bytes,
        *,
        content_type: str | None = None,
        timeout: float | None = None,
        user_properties: Iterable[tuple[str, str]] = (),
    ) -> Message:
        """Publish a request and return the raw reply message, or raise RequestTimeout."""
        await self.start()
        limit = timeout if timeout is not None else self.default_timeout
        corr = uuid.uuid4().bytes
        fut: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        properties = list(user_properties)
        if not any(key == SENT_AT for key, _ in properties):  # see "Clocks" above
            properties.append((SENT_AT, repr(time.time())))
        self._waiting[corr] = fut
        try:
            async with asyncio.timeout(limit):
                await self.client.publish(
                    topic,
                    payload,
                    qos=1,
                    content_type=content_type,
                    correlation_data=corr,
                    response_topic=self.reply_topic,
                    expiry_s=limit,
                    user_properties=properties,
                    wait=False,
                )
                return await fut
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from {topic} within {limit:g} s", retry_after=0.0
            ) from None
        finally:
            self._waiting.pop(corr, None)

    async def request(
        self,
        topic: str,
        message: WireModel,
        expected: type[R] | Sequence[type[R]],
        *,
        tensors: Mapping[str, np.ndarray] | None = None,
        compression: Compression = Compression.NONE,
        timeout: float | None = None,
        user_properties: Iterable[tuple[str, str]] = (),
    ) -> Decoded[R]:
        """Send a schema message and decode the reply as one of ``expected``.

        An :class:`ErrorReply` raises :class:`RemoteTemporaryError` or
        :class:`RemotePermanentError`.
        """
        out = encode(message, tensors, compression=compression)
        reply = await self.request_raw(
            topic,
            out.payload,
            content_type=out.content_type,
            timeout=timeout,
            user_properties=user_properties,
        )
        kinds: list[type[WireModel]] = [expected] if isinstance(expected, type) else list(expected)
        decoded: Decoded[WireModel] = decode(
            reply.payload,
            reply.content_type,
            [*kinds, ErrorReply],
            max_bytes=self.client.settings.max_payload_bytes,
        )
        if isinstance(decoded.message, ErrorReply):
            raise remote_error(decoded.message)
        return decoded  # type: ignore[return-value]


def remote_error(reply: ErrorReply) -> RemoteTemporaryError | RemotePermanentError:
    """The exception that an error reply stands for."""
    if reply.retryable:
        return RemoteTemporaryError(
            reply.message,
            code=reply.code,
            request_id=reply.request_id,
            retry_after=reply.retry_after_s,
        )
    return RemotePermanentError(reply.message, code=reply.code, request_id=reply.request_id)


class ReplyCache:
    """Answers of recent requests by id, so a repeated request is answered, not re-run."""

    def __init__(self, max_entries: int = 4096, ttl_s: float = 600.0) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._entries: OrderedDict[str, tuple[float, asyncio.Future[Encoded]]] = OrderedDict()
        self.hits = 0

    def lookup(self, key: str) -> asyncio.Future[Encoded] | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stamp, fut = entry
        if time.monotonic() - stamp > self.ttl_s:
            del self._entries[key]
            return None
        self.hits += 1
        return fut

    def reserve(self, key: str) -> asyncio.Future[Encoded]:
        fut: asyncio.Future[Encoded] = asyncio.get_running_loop().create_future()
        self._entries[key] = (time.monotonic(), fut)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return fut

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)


def _request_key(message: WireModel, response_topic: str | None) -> str | None:
    """Requests are the same when the same requester (reply topic) reuses an id: one client's
    id never answers another client's request."""
    for attr in ("request_id", "command_id"):
        value = getattr(message, attr, None)
        if isinstance(value, str):
            return f"{message.KIND}:{response_topic}:{value}"
    return None


def _error_for(exc: BaseException, request_id: str | None) -> ErrorReply:
    if isinstance(exc, PayloadError):
        return ErrorReply(code=exc.code, message=exc.message, request_id=request_id)
    if isinstance(exc, TemporaryError):
        code = getattr(exc, "code", None)
        return ErrorReply(
            code=code if isinstance(code, ErrorCode) else ErrorCode.UNAVAILABLE,
            message=exc.message,
            request_id=request_id,
            retryable=True,
            retry_after_s=exc.retry_after,
        )
    if isinstance(exc, EdgefedError):
        code = getattr(exc, "code", None)
        return ErrorReply(
            code=code if isinstance(code, ErrorCode) else ErrorCode.INTERNAL,
            message=exc.message,
            request_id=request_id,
        )
    return ErrorReply(
        code=ErrorCode.INTERNAL,
        message=f"internal error ({type(exc).__name__}); see the responder's log",
        request_id=request_id,
        retryable=True,
    )


async def serve(
    client: MqttClient,
    topic_filter: str,
    handler: RequestHandler[M],
    *,
    expected: type[M] | Sequence[type[M]],
    dedup: ReplyCache | None = None,
    qos: int = 1,
    gate: Callable[[Message], str | None] | None = None,
) -> None:
    """Answer requests on ``topic_filter`` with ``handler`` (see the module docstring).

    ``gate(message)`` runs first; a reason it returns refuses the message unread, with a
    retryable ``unavailable`` error reply (none when it has no response topic)."""
    cache = dedup if dedup is not None else ReplyCache()
    kinds: list[type[M]] = [expected] if isinstance(expected, type) else list(expected)
    max_bytes = client.settings.max_payload_bytes

    async def respond(message: Message) -> None:
        request_id: str | None = None
        refusal = gate(message) if gate is not None else None
        if refusal is not None:
            request_id = peek_request_id(message.payload)
            log.info("refused request %s on %s: %s", request_id, message.topic, refusal)
            refused = ErrorReply(
                code=ErrorCode.UNAVAILABLE,
                message=refusal,
                request_id=request_id,
                retryable=True,
                retry_after_s=0.0,
            )
            await _send(client, message, encode(refused))
            return
        try:
            if message.expired():
                raise _ExpiredError("request expired before it was handled")
            decoded = decode(message.payload, message.content_type, kinds, max_bytes=max_bytes)
        except (PayloadError, _ExpiredError) as exc:
            request_id = peek_request_id(message.payload)
            error = (
                _error_for(exc, request_id)
                if isinstance(exc, PayloadError)
                else ErrorReply(code=ErrorCode.EXPIRED, message=str(exc), request_id=request_id)
            )
            reply: Encoded = encode(error)
            log.info("rejected request on %s (%s): %s", message.topic, error.code, error.message)
            await _send(client, message, reply)
            return

        request_id = getattr(decoded.message, "request_id", None) or getattr(
            decoded.message, "command_id", None
        )
        deadline = getattr(decoded.message, "deadline", None)
        if isinstance(deadline, float | int) and not isinstance(deadline, bool):
            local = local_deadline(float(deadline), message)
            if local != deadline:  # the handler and the hops after it use this clock's deadline
                decoded = Decoded(
                    decoded.message.model_copy(update={"deadline": local}), decoded.tensors
                )
            deadline = local
        if isinstance(deadline, float | int) and time.time() >= deadline:
            await _send(
                client,
                message,
                encode(
                    ErrorReply(
                        code=ErrorCode.EXPIRED,
                        message="request deadline passed before it was handled",
                        request_id=request_id,
                    )
                ),
            )
            return

        key = _request_key(decoded.message, message.response_topic)
        if key is not None:
            existing = cache.lookup(key)
            if existing is not None:
                log.debug("duplicate request %s: answering with the first reply", key)
                await _send(client, message, await asyncio.shield(existing))
                return
            slot = cache.reserve(key)
        try:
            result = await handler(decoded, message)
            reply = result if isinstance(result, Encoded) else encode(result)
        except Exception as exc:
            if not isinstance(exc, EdgefedError):
                log.exception("handler for %s failed", message.topic)
            reply = encode(_error_for(exc, request_id if isinstance(request_id, str) else None))
            if key is not None:
                cache.forget(key)  # a retry may succeed: do not pin the failure
                slot.set_result(reply)
                key = None
        except asyncio.CancelledError:
            if key is not None:  # duplicates waiting on this answer get a retryable error
                cache.forget(key)
                slot.set_result(encode(_stopped(request_id)))
            raise
        if key is not None:
            slot.set_result(reply)
        await _send(client, message, reply)

    await client.subscribe(topic_filter, respond, qos=qos)


FAILS_OVER = ("fails-over", "on-will")
"""User property of a request whose sender re-sends it elsewhere when the responder's last will
says it went offline (the router): a copy still queued for the responder then is stale."""
SENT_AT = "sent-at"
"""User property of a request: the requester's wall-clock time (Unix seconds) when it sent it."""


def local_deadline(deadline: float, message: Message) -> float:
    """``deadline`` (Unix seconds on the requester's clock) on this machine's clock, using the
    request's ``sent-at`` (unchanged without one, or with one that is not a finite number)."""
    sent = message.user_property(SENT_AT)
    if sent is None:
        return deadline
    try:
        sent_at = float(sent)
    except ValueError:
        return deadline
    if not math.isfinite(sent_at):
        return deadline
    return time.time() + (deadline - sent_at)


class _ExpiredError(Exception):
    pass


def _stopped(request_id: str | None) -> ErrorReply:
    """The answer for copies of a request whose first handling was cancelled (the responder
    is stopping): retry, here later or elsewhere."""
    return ErrorReply(
        code=ErrorCode.UNAVAILABLE,
        message="the responder stopped before answering",
        request_id=request_id if isinstance(request_id, str) else None,
        retryable=True,
        retry_after_s=0.0,
    )


async def _send(client: MqttClient, request: Message, reply: Encoded) -> None:
    if request.response_topic is None:
        return
    remaining = None
    if request.deadline is not None:
        remaining = max(1.0, request.deadline - time.monotonic())
    await client.publish(
        request.response_topic,
        reply.payload,
        qos=1,
        content_type=reply.content_type,
        correlation_data=request.correlation_data,
        expiry_s=remaining,
        wait=False,
    )
