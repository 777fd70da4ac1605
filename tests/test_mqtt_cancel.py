"""Cancellation and closing of the MQTT adapter against a real mosquitto: a cancelled call
ends cancelled (never swallowed), closing is bounded whatever the link does, and nothing is
left behind for the event loop to complain about ("Future exception was never retrieved")."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from asyncio.subprocess import PIPE
from typing import Any

import pytest

from edgefed.common.broker import PrivateBroker, free_port
from edgefed.common.errors import RemoteTemporaryError
from edgefed.common.mqtt import Message, MqttClient, Will
from edgefed.common.rpc import ReplyCache, Requester, serve
from edgefed.common.schemas import Decoded, InferenceReply, InferenceRequest
from edgefed.common.settings import Settings
from edgefed.common.topics import Topics
from edgefed.simulation.linkproxy import LinkProfile, LinkProxy

from .conftest import fast_settings
from .loop_complaints import loop_complaints

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CLOSE_BOUND_S = 10.0
"""Liveness bound for closing (the adapter promises about 3 s; this only catches a hang)."""


def describe(complaints: list[dict[str, Any]]) -> list[str]:
    return [f"{c.get('message')}: {c.get('exception')!r}" for c in complaints]


async def test_a_publish_cancelled_as_its_puback_arrives_ends_cancelled(
    settings: Settings, topics: Topics
) -> None:
    """The echo of the message and its PUBACK arrive together: a handler cancels the publish
    then. Python 3.11's ``asyncio.wait_for`` returned the PUBACK and dropped the cancellation,
    so a loop around such a publish never stopped."""
    topic = f"{topics.prefix}/cancel/echo"
    victim: asyncio.Task[None] | None = None
    cancel_requested: list[asyncio.Task[None]] = []

    async def on_echo(_message: Message) -> None:
        if victim is not None and victim.cancel():
            cancel_requested.append(victim)

    async with MqttClient.from_settings(settings, client_id=f"{topics.fleet}-echo") as client:
        await client.subscribe(topic, on_echo)
        for _ in range(40):
            victim = asyncio.create_task(client.publish(topic, b"x", qos=1, timeout=5))
            with contextlib.suppress(asyncio.CancelledError):
                await victim
            await asyncio.sleep(0.01)  # the echo of a completed publish comes meanwhile
    swallowed = [t for t in cancel_requested if not t.cancelled()]
    assert cancel_requested, "no publish was cancelled while it waited: the test proved nothing"
    assert swallowed == [], f"{len(swallowed)} of {len(cancel_requested)} cancellations lost"


_GIVE_UP_THEN_CLOSE = """
import asyncio, contextlib, sys
from edgefed.common.mqtt import MqttClient
from edgefed.common.settings import load_settings

async def main(url: str) -> None:
    settings = load_settings(broker_url=url, fleet="t", mqtt={"backoff_max_s": 0.5})
    async with MqttClient.from_settings(settings, client_id="gone", require_connection=False) as c:
        with contextlib.suppress(Exception):
            await c.publish("t/timed-out", b"x", timeout=0.2)
        waiting = asyncio.create_task(c.publish("t/cancelled", b"y"))
        await asyncio.sleep(0.2)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
    print("closed")

asyncio.run(main(sys.argv[1]))
"""


async def test_closing_after_a_publish_gave_up_leaves_no_unretrieved_error() -> None:
    """The broker is down: a publish times out, another is cancelled, then the client closes
    and the process ends. The PUBACK future of the first used to stay registered and got
    ClientClosedError at close that nobody retrieved ("Future exception was never retrieved"
    on stderr at exit). A process of its own, as a user runs it: that message comes when the
    future is collected, which a test's own event loop does not reliably see."""
    url = f"mqtt://127.0.0.1:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _GIVE_UP_THEN_CLOSE, url, stdout=PIPE, stderr=PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    assert out.decode().strip() == "closed"
    assert "never retrieved" not in err.decode(), err.decode()


@pytest.mark.parametrize("when", ["connected", "connecting", "unreachable", "closing"])
async def test_a_client_cancelled_at_any_point_of_its_life_stops_and_cleans_up(
    broker: PrivateBroker, topics: Topics, when: str
) -> None:
    """A task that holds a client is cancelled: while connected with QoS 1 messages unacked,
    while connecting through a link that delivers nothing, while the broker is unreachable, and
    while closing (cancelled twice). It ends in bounded time, and nothing is left unretrieved."""
    blackhole = LinkProfile(delay_ms=60_000)
    profile = blackhole if when == "connecting" else LinkProfile()
    async with LinkProxy(broker.host, broker.port, profile) as link:
        url = f"mqtt://127.0.0.1:{link.port}"
        if when == "unreachable":
            url = f"mqtt://127.0.0.1:{free_port()}"
        settings = fast_settings(url, topics.fleet)
        entered = asyncio.Event()
        closing = asyncio.Event()

        async def hold() -> None:
            client = MqttClient.from_settings(
                settings,
                client_id=f"{topics.fleet}-{when}",
                will=Will(f"{topics.prefix}/cancel/will", b"gone"),
                require_connection=False,
            )
            try:
                async with client:
                    if when in ("connected", "closing"):
                        await client.wait_connected(5)
                        link.profile = blackhole  # nothing is acknowledged any more
                        await client.publish(f"{topics.prefix}/cancel/q", b"x", wait=False)
                    entered.set()
                    await asyncio.Event().wait()
            finally:
                closing.set()

        with loop_complaints() as complaints:
            task = asyncio.create_task(hold())
            await asyncio.wait_for(entered.wait(), 10)
            await asyncio.sleep(0.3)  # connecting, retrying or waiting, as the case may be
            task.cancel()
            if when == "closing":
                await closing.wait()
                await asyncio.sleep(0.2)  # inside aclose, waiting for the PUBACK
                task.cancel()
            done, _ = await asyncio.wait([task], timeout=CLOSE_BOUND_S)
            assert task in done, f"the client did not stop within {CLOSE_BOUND_S} s of cancel"
            assert task.cancelled()
            del task
        assert describe(complaints) == []


async def test_a_connection_completed_after_close_is_hung_up_at_once(topics: Topics) -> None:
    """Closed while its connect thread still waits for a slow broker to accept: closing does
    not wait for the thread, and the connection that completes later is closed at once (left
    open, its CONNECT would log in with the client's id over the client's successor, and the
    broker would publish its will when the keep-alive ran out)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    filler = socket.socket()
    filler.setblocking(False)
    filler.connect_ex(address)  # the accept queue is full: the next handshake waits
    settings = fast_settings(f"mqtt://127.0.0.1:{address[1]}", topics.fleet)
    client = MqttClient.from_settings(
        settings, client_id=f"{topics.fleet}-late", require_connection=False
    )
    try:
        async with client:
            await asyncio.sleep(0.3)  # its thread is inside connect()
        assert await asyncio.to_thread(_connect_then_hang_up_seen, listener, 8.0)
    finally:
        filler.close()
        listener.close()


def _connect_then_hang_up_seen(listener: socket.socket, within_s: float) -> bool:
    """Accept connections until the client's comes: whether it is closed (``False``: it stays
    open after sending a CONNECT). The filler connection sends nothing and stays open."""
    listener.settimeout(within_s)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(1.0)
            received = b""
            try:
                while chunk := conn.recv(4096):
                    received += chunk
            except TimeoutError:
                if received.startswith(b"\x10"):
                    return False
                continue  # the filler
            return True


async def test_a_copy_of_a_request_whose_handling_was_cancelled_gets_a_retryable_error(
    settings: Settings, topics: Topics
) -> None:
    """Two responders share one reply cache (as an agent's two links do) and both get a
    request; the one running it stops, cancelling its handler. The copy waiting on that
    answer gets a retryable error at once instead of waiting forever for it."""
    target = topics.agent_infer("shared")
    cache = ReplyCache()
    started: list[str] = []
    never = asyncio.Event()

    def blocking(name: str) -> Any:
        async def handle(req: Decoded[InferenceRequest], msg: Message) -> InferenceReply:
            started.append(name)
            await never.wait()
            raise AssertionError("unreachable")

        return handle

    responders = {
        name: MqttClient.from_settings(settings, client_id=f"{topics.fleet}-{name}")
        for name in ("a", "b")
    }
    async with contextlib.AsyncExitStack() as stack:
        for name, responder in responders.items():
            await stack.enter_async_context(responder)
            await serve(responder, target, blocking(name), expected=InferenceRequest, dedup=cache)
        caller = await stack.enter_async_context(
            MqttClient.from_settings(settings, client_id=f"{topics.fleet}-caller")
        )
        request = asyncio.create_task(
            Requester(caller, topics).request(
                target, InferenceRequest(model="m", texts=["x"]), InferenceReply, timeout=10
            )
        )
        async with asyncio.timeout(10):
            while not started:  # noqa: ASYNC110 - the handler records its start, no event
                await asyncio.sleep(0.01)
        await responders[started[0]].aclose()
        with pytest.raises(RemoteTemporaryError, match="stopped before answering"):
            await request
    assert len(started) == 1
