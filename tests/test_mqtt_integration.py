"""The MQTT layer against a real mosquitto started by the suite (see conftest.py)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import (
    BrokerAuthError,
    BrokerUnavailable,
    ClientClosedError,
    ConfigError,
    ErrorCode,
    RemotePermanentError,
    RemoteTemporaryError,
    RequestTimeout,
    TemporaryError,
)
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.rpc import Requester, serve
from edgefed.common.schemas import (
    AgentState,
    AgentStatus,
    Decoded,
    ErrorReply,
    InferenceReply,
    InferenceRequest,
    decode,
    encode,
)
from edgefed.common.settings import Settings
from edgefed.common.tensors import Compression
from edgefed.common.topics import Topics

from .conftest import fast_settings, wait_broker_saved

pytestmark = pytest.mark.integration


def client(settings: Settings, client_id: str, **kw: object) -> MqttClient:
    return MqttClient.from_settings(settings, client_id=client_id, **kw)  # type: ignore[arg-type]


async def echo_handler(req: Decoded[InferenceRequest], msg: Message) -> InferenceReply:
    return InferenceReply(
        request_id=req.message.request_id,
        model=req.message.model,
        version=1,
        served_by="echo",
        outputs={"texts": req.message.texts},
    )


async def test_request_reply_round_trip_matches_replies_to_requests(
    settings: Settings, topics: Topics
) -> None:
    async with client(settings, "server") as srv, client(settings, "caller") as cli:
        await serve(srv, topics.agent_infer("a1"), echo_handler, expected=InferenceRequest)
        requester = Requester(cli, topics)

        async def one(i: int) -> tuple[int, Decoded[InferenceReply]]:
            req = InferenceRequest(model="m", texts=[f"text {i}"])
            return i, await requester.request(topics.agent_infer("a1"), req, InferenceReply)

        results = await asyncio.gather(*(one(i) for i in range(40)))

    for i, reply in results:
        assert reply.message.outputs == {"texts": [f"text {i}"]}
        assert reply.message.served_by == "echo"


async def test_tensors_travel_with_a_request_and_its_reply(
    settings: Settings, topics: Topics
) -> None:
    async def double(req: Decoded[InferenceRequest], msg: Message) -> object:
        reply = InferenceReply(
            request_id=req.message.request_id, model="m", version=1, served_by="x"
        )
        return encode(reply, {"y": req.tensors["x"] * 2, "mask": req.tensors["mask"]})

    x = np.random.default_rng(0).standard_normal((1, 16, 8)).astype(np.float32)
    mask = np.ones((1, 16), dtype=np.int64)
    async with client(settings, "server") as srv, client(settings, "caller") as cli:
        await serve(srv, topics.agent_infer("a1"), double, expected=InferenceRequest)  # type: ignore[arg-type]
        reply = await Requester(cli, topics).request(
            topics.agent_infer("a1"),
            InferenceRequest(model="m"),
            InferenceReply,
            tensors={"x": x, "mask": mask},
            compression=Compression.FP16,
        )
    np.testing.assert_allclose(reply.tensors["y"], 2 * x, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(reply.tensors["mask"], mask)


async def test_a_payload_larger_than_the_socket_buffer_round_trips_intact(
    settings: Settings, topics: Topics
) -> None:
    blob = np.random.default_rng(1).integers(0, 255, size=5_000_000, dtype=np.uint8)

    async def echo_tensors(req: Decoded[InferenceRequest], msg: Message) -> object:
        reply = InferenceReply(
            request_id=req.message.request_id, model="m", version=1, served_by="x"
        )
        return encode(reply, req.tensors)

    async with client(settings, "server") as srv, client(settings, "caller") as cli:
        await serve(srv, topics.agent_infer("big"), echo_tensors, expected=InferenceRequest)  # type: ignore[arg-type]
        reply = await Requester(cli, topics).request(
            topics.agent_infer("big"),
            InferenceRequest(model="m"),
            InferenceReply,
            tensors={"blob": blob},
        )
    np.testing.assert_array_equal(reply.tensors["blob"], blob)


async def test_request_without_reply_before_deadline_raises_timeout(
    settings: Settings, topics: Topics
) -> None:
    async def slow(req: Decoded[InferenceRequest], msg: Message) -> InferenceReply:
        await asyncio.sleep(3)
        return await echo_handler(req, msg)

    async with client(settings, "server") as srv, client(settings, "caller") as cli:
        await serve(srv, topics.agent_infer("slow"), slow, expected=InferenceRequest)
        requester = Requester(cli, topics)
        started = time.monotonic()
        with pytest.raises(RequestTimeout, match="no reply"):
            await requester.request(
                topics.agent_infer("slow"), InferenceRequest(model="m"), InferenceReply, timeout=0.5
            )
        assert time.monotonic() - started >= 0.5
        with pytest.raises(RequestTimeout) as info:
            await requester.request(
                topics.agent_infer("nobody"),
                InferenceRequest(model="m"),
                InferenceReply,
                timeout=0.3,
            )
        assert isinstance(info.value, TemporaryError)


async def test_request_that_expires_while_the_responder_is_offline_is_never_executed(
    settings: Settings, topics: Topics
) -> None:
    executed: list[str] = []

    async def record(req: Decoded[InferenceRequest], msg: Message) -> InferenceReply:
        executed.append(req.message.request_id)
        return await echo_handler(req, msg)

    target = topics.agent_infer("sleepy")
    # The responder has a persistent session and a subscription, then goes away.
    async with client(settings, "sleepy") as srv:
        await serve(srv, target, record, expected=InferenceRequest)
    async with client(settings, "caller") as cli:
        requester = Requester(cli, topics)
        expired = InferenceRequest(model="m")
        with pytest.raises(RequestTimeout):
            await requester.request(target, expired, InferenceReply, timeout=1.0)
        await asyncio.sleep(1.2)  # let the 1 s message expiry pass at the broker
        live = asyncio.create_task(
            requester.request(target, InferenceRequest(model="m"), InferenceReply, timeout=5)
        )
        async with client(settings, "sleepy") as srv:
            await serve(srv, target, record, expected=InferenceRequest)
            reply = await live
    assert expired.request_id not in executed
    assert executed == [reply.message.request_id]


async def test_qos1_message_sent_while_subscriber_is_away_arrives_after_it_returns(
    settings: Settings, topics: Topics
) -> None:
    topic = topics.telemetry("a1")
    got: asyncio.Queue[Message] = asyncio.Queue()

    async def on_message(msg: Message) -> None:
        await got.put(msg)

    async with client(settings, "collector") as sub:
        await sub.subscribe(topic, on_message)
    async with client(settings, "sender") as pub:
        await pub.publish(topic, b"while you were away", qos=1)
    assert got.empty()
    async with client(settings, "collector") as sub:
        await sub.subscribe(topic, on_message)
        msg = await asyncio.wait_for(got.get(), 5)
    assert msg.payload == b"while you were away"


async def test_a_message_whose_handler_dies_with_the_process_is_delivered_again(
    broker: PrivateBroker, settings: Settings, fleet: str, topics: Topics
) -> None:
    topic = topics.commands("a1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).parent / "procs" / "stuck_subscriber.py"),
        broker.url,
        fleet,
        "worker-1",
        topic,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 30)).strip() == b"READY"
        async with client(settings, "sender") as pub:
            await pub.publish(topic, b"do the work")
        assert (await asyncio.wait_for(proc.stdout.readline(), 10)).strip() == b"GOT do the work"
        proc.kill()  # the handler never finished: the message was never acknowledged
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()

    again: asyncio.Queue[Message] = asyncio.Queue()

    async def on_message(msg: Message) -> None:
        await again.put(msg)

    async with client(settings, "worker-1") as worker:
        await worker.subscribe(topic, on_message)
        msg = await asyncio.wait_for(again.get(), 10)
    assert msg.payload == b"do the work"
    assert msg.dup


async def test_a_handler_that_raises_still_acknowledges_so_the_message_does_not_loop(
    settings: Settings, topics: Topics
) -> None:
    topic = topics.commands("a1")
    seen: list[bytes] = []

    async def fragile(msg: Message) -> None:
        seen.append(msg.payload)
        if msg.payload == b"poison":
            raise RuntimeError("cannot handle this one")

    async with client(settings, "worker-2") as worker, client(settings, "sender") as pub:
        await worker.subscribe(topic, fragile)
        await pub.publish(topic, b"poison")
        await pub.publish(topic, b"fine")
        for _ in range(50):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.05)
    async with client(settings, "worker-2") as worker:
        await worker.subscribe(topic, fragile)
        await asyncio.sleep(0.5)
    assert seen == [b"poison", b"fine"]


async def test_client_reconnects_by_itself_after_the_broker_is_killed_and_restarted(
    own_broker: PrivateBroker, fleet: str, topics: Topics
) -> None:
    settings = fast_settings(own_broker.url, fleet)
    target = topics.agent_infer("a1")
    async with client(settings, "server") as srv, client(settings, "caller") as cli:
        await serve(srv, target, echo_handler, expected=InferenceRequest)
        requester = Requester(cli, topics)
        await requester.request(
            target, InferenceRequest(model="m", texts=["before"]), InferenceReply
        )

        own_broker.kill()
        await asyncio.sleep(0.3)
        assert not cli.connected
        own_broker.start()
        await cli.wait_connected(10)
        await srv.wait_connected(10)
        # The broker lost every session (no persistence): subscriptions must have been renewed.
        reply = await requester.request(
            target, InferenceRequest(model="m", texts=["after"]), InferenceReply, timeout=5
        )
        assert reply.message.outputs == {"texts": ["after"]}
        assert cli.reconnects >= 1
        assert srv.reconnects >= 1


async def test_messages_queued_while_the_broker_is_down_are_sent_after_it_returns(
    tmp_path: Path, fleet: str, topics: Topics
) -> None:
    topic = topics.telemetry("a1")
    got: asyncio.Queue[Message] = asyncio.Queue()

    async def on_message(msg: Message) -> None:
        await got.put(msg)

    with PrivateBroker(data_dir=tmp_path / "b", persistence=True) as b:
        settings = fast_settings(b.url, fleet)
        async with client(settings, "collector") as sub, client(settings, "sender") as pub:
            await sub.subscribe(topic, on_message)
            await wait_broker_saved(b, time.time())
            b.kill()
            await asyncio.sleep(0.2)
            for i in range(5):
                await pub.publish(topic, f"queued {i}".encode(), wait=False)
            b.start()
            received = [await asyncio.wait_for(got.get(), 10) for _ in range(5)]
    assert sorted(m.payload for m in received) == [f"queued {i}".encode() for i in range(5)]


async def test_a_publish_that_waits_for_its_ack_waits_through_an_outage(
    tmp_path: Path, fleet: str, topics: Topics
) -> None:
    topic = topics.telemetry("a2")
    got: asyncio.Queue[Message] = asyncio.Queue()

    async def on_message(msg: Message) -> None:
        await got.put(msg)

    with PrivateBroker(data_dir=tmp_path / "b", persistence=True) as b:
        settings = fast_settings(b.url, fleet)
        async with client(settings, "collector") as sub, client(settings, "sender") as pub:
            await sub.subscribe(topic, on_message)
            await wait_broker_saved(b, time.time())
            b.kill()
            await asyncio.sleep(0.2)
            assert not pub.connected
            sending = asyncio.create_task(pub.publish(topic, b"through", timeout=20))
            await asyncio.sleep(0.2)
            assert not sending.done()  # waiting for the broker, not failed
            b.start()
            await sending  # acknowledged after the reconnect
            message = await asyncio.wait_for(got.get(), 10)
    assert message.payload == b"through"


async def test_last_will_marks_a_killed_client_offline(
    broker: PrivateBroker, settings: Settings, fleet: str, topics: Topics
) -> None:
    statuses: asyncio.Queue[AgentStatus] = asyncio.Queue()

    async def on_status(msg: Message) -> None:
        await statuses.put(decode(msg.payload, msg.content_type, AgentStatus).message)

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).parent / "procs" / "presence_client.py"),
        broker.url,
        fleet,
        "edge-7",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.strip() == b"READY"
        async with client(settings, "observer") as obs:
            await obs.subscribe(topics.agent_status("edge-7"), on_status)
            first = await asyncio.wait_for(statuses.get(), 5)
            assert first.state is AgentState.ONLINE
            proc.kill()
            second = await asyncio.wait_for(statuses.get(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert second.state is AgentState.OFFLINE
    assert second.agent_id == "edge-7"


async def test_bad_payloads_get_error_replies_and_the_responder_keeps_serving(
    settings: Settings, topics: Topics
) -> None:
    target = topics.agent_infer("a1")
    good = InferenceRequest(model="m", texts=["ok"]).model_dump(mode="json")
    cases = {
        b"this is not json": ErrorCode.MALFORMED,
        b"[1, 2]": ErrorCode.MALFORMED,
        json.dumps({**good, "v": 99}).encode(): ErrorCode.UNSUPPORTED_VERSION,
        json.dumps({**good, "kind": "launch-missiles"}).encode(): ErrorCode.UNKNOWN_KIND,
        json.dumps({**good, "model": "no/slashes"}).encode(): ErrorCode.MALFORMED,
        b"\x10\x00\x00\x00\x00\x00\x00\x00garbage": ErrorCode.MALFORMED,
    }
    async with client(settings, "server") as srv, client(settings, "caller") as cli:
        await serve(srv, target, echo_handler, expected=InferenceRequest)
        requester = Requester(cli, topics)
        for payload, code in cases.items():
            raw = await requester.request_raw(target, payload, timeout=5)
            err = decode(raw.payload, raw.content_type, ErrorReply).message
            assert err.code is code, (payload, err)
            assert err.message
        wrong_version = json.dumps({**good, "v": 99}).encode()
        raw = await requester.request_raw(target, wrong_version, timeout=5)
        assert (
            decode(raw.payload, raw.content_type, ErrorReply).message.request_id
            == good["request_id"]
        )
        reply = await requester.request(
            target, InferenceRequest(model="m", texts=["still"]), InferenceReply
        )
    assert reply.message.outputs == {"texts": ["still"]}


async def test_handler_failures_become_error_replies_of_the_right_kind(
    settings: Settings, topics: Topics
) -> None:
    async def broken(req: Decoded[InferenceRequest], msg: Message) -> InferenceReply:
        if req.message.texts == ["busy"]:
            raise TemporaryError("queue full", retry_after=2.0)
        raise ValueError("boom")

    target = topics.agent_infer("a1")
    async with client(settings, "server") as srv, client(settings, "caller") as cli:
        await serve(srv, target, broken, expected=InferenceRequest)
        requester = Requester(cli, topics)
        with pytest.raises(RemoteTemporaryError) as busy:
            await requester.request(
                target, InferenceRequest(model="m", texts=["busy"]), InferenceReply
            )
        assert busy.value.retry_after == 2.0
        with pytest.raises(RemoteTemporaryError) as internal:
            await requester.request(target, InferenceRequest(model="m"), InferenceReply)
        assert internal.value.code is ErrorCode.INTERNAL
        assert "boom" not in str(internal.value)  # internals stay in the responder's log


async def test_request_past_its_deadline_is_answered_with_expired_and_not_run(
    settings: Settings, topics: Topics
) -> None:
    ran: list[str] = []

    async def record(req: Decoded[InferenceRequest], msg: Message) -> InferenceReply:
        ran.append(req.message.request_id)
        return await echo_handler(req, msg)

    target = topics.agent_infer("a1")
    async with client(settings, "server") as srv, client(settings, "caller") as cli:
        await serve(srv, target, record, expected=InferenceRequest)
        late = InferenceRequest(model="m", deadline=time.time() - 1)
        with pytest.raises(RemotePermanentError) as info:
            await Requester(cli, topics).request(target, late, InferenceReply)
    assert info.value.code is ErrorCode.EXPIRED
    assert ran == []


async def test_a_repeated_request_id_runs_once_and_both_callers_get_the_reply(
    settings: Settings, topics: Topics
) -> None:
    calls = 0

    async def counting(req: Decoded[InferenceRequest], msg: Message) -> InferenceReply:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        return await echo_handler(req, msg)

    target = topics.agent_infer("a1")
    req = InferenceRequest(model="m", texts=["once"])
    async with client(settings, "server") as srv, client(settings, "caller") as cli:
        await serve(srv, target, counting, expected=InferenceRequest)
        requester = Requester(cli, topics)
        first, second = await asyncio.gather(
            requester.request(target, req, InferenceReply),
            requester.request(target, req, InferenceReply),
        )
        third = await requester.request(target, req, InferenceReply)
    assert calls == 1
    assert first.message == second.message == third.message


async def test_the_same_request_id_from_two_clients_is_two_requests(
    settings: Settings, topics: Topics
) -> None:
    target = topics.agent_infer("a1")
    async with (
        client(settings, "server") as srv,
        client(settings, "alice") as alice,
        client(settings, "mallory") as mallory,
    ):
        await serve(srv, target, echo_handler, expected=InferenceRequest)
        mine = await Requester(alice, topics).request(
            target,
            InferenceRequest(request_id="same-id", model="m", texts=["alice"]),
            InferenceReply,
        )
        theirs = await Requester(mallory, topics).request(
            target,
            InferenceRequest(request_id="same-id", model="m", texts=["mallory"]),
            InferenceReply,
        )
    assert mine.message.outputs == {"texts": ["alice"]}
    assert theirs.message.outputs == {"texts": ["mallory"]}


async def test_shared_subscription_spreads_requests_over_a_worker_pool_once_each(
    settings: Settings, topics: Topics
) -> None:
    served: Counter[str] = Counter()

    def worker(name: str):  # type: ignore[no-untyped-def]
        async def handle(req: Decoded[InferenceRequest], msg: Message) -> InferenceReply:
            served[name] += 1
            await asyncio.sleep(0.01)
            return InferenceReply(
                request_id=req.message.request_id, model="m", version=1, served_by=name
            )

        return handle

    async with (
        client(settings, "w1") as w1,
        client(settings, "w2") as w2,
        client(settings, "caller") as cli,
    ):
        await serve(w1, topics.worker_infer_shared("gpu"), worker("w1"), expected=InferenceRequest)
        await serve(w2, topics.worker_infer_shared("gpu"), worker("w2"), expected=InferenceRequest)
        requester = Requester(cli, topics)
        replies = await asyncio.gather(
            *(
                requester.request(
                    topics.worker_infer("gpu"), InferenceRequest(model="m"), InferenceReply
                )
                for _ in range(30)
            )
        )
    assert sum(served.values()) == 30
    assert served["w1"] > 0
    assert served["w2"] > 0
    assert Counter(r.message.served_by for r in replies) == served


async def test_password_auth_accepts_the_right_password_and_refuses_others(
    tmp_path: Path, fleet: str, topics: Topics
) -> None:
    with PrivateBroker(data_dir=tmp_path / "b", users={"agent-1": "s3cret"}) as b:
        good = fast_settings(b.url, fleet, username="agent-1", password="s3cret")
        async with client(good, "agent-1") as c:
            await c.publish(topics.heartbeat("agent-1"), b"hi")
        for creds in ({"username": "agent-1", "password": "wrong"}, {}):
            bad = fast_settings(b.url, fleet, **creds)
            with pytest.raises(BrokerAuthError, match="refused"):
                async with client(bad, "intruder"):
                    pass


async def test_mutual_tls_accepts_our_certificates_and_refuses_strangers(
    tmp_path: Path, fleet: str
) -> None:
    from .certs import TestCa

    ours = TestCa.create(tmp_path / "ours", "fleet-ca")
    theirs = TestCa.create(tmp_path / "theirs", "other-ca")
    server = ours.issue("broker", server=True)
    from edgefed.common.broker import BrokerTls

    tls = BrokerTls(
        cert_file=server.cert_file,
        key_file=server.key_file,
        ca_file=ours.cert_file,
        require_certificate=True,
    )
    with PrivateBroker(data_dir=tmp_path / "b", tls=tls) as b:
        assert b.url.startswith("mqtts://")
        mine = ours.issue("agent-1", server=False)
        good = fast_settings(
            b.url,
            fleet,
            ca_file=mine.cert_file.parent / "fleet-ca.crt",
            cert_file=mine.cert_file,
            key_file=mine.key_file,
        )
        async with client(good, "agent-1") as c:
            await c.publish(Topics(fleet).heartbeat("agent-1"), b"over tls")

        stranger = theirs.issue("intruder", server=False)
        foreign_cert = fast_settings(
            b.url,
            fleet,
            ca_file=ours.cert_file,
            cert_file=stranger.cert_file,
            key_file=stranger.key_file,
            connect_timeout_s=2.0,
        )
        with pytest.raises(BrokerAuthError, match="refused our TLS client certificate"):
            async with client(foreign_cert, "intruder"):
                pass
        # Without a certificate, TLS 1.3 may show the refusal as a plain close before CONNACK
        # (retried) rather than as the alert; a later attempt sees the alert, so give it time.
        no_cert = fast_settings(b.url, fleet, ca_file=ours.cert_file, connect_timeout_s=15.0)
        with pytest.raises(BrokerAuthError, match="refused our TLS client certificate"):
            async with client(no_cert, "anonymous"):
                pass
        untrusting = fast_settings(
            b.url,
            fleet,
            ca_file=theirs.cert_file,
            cert_file=mine.cert_file,
            key_file=mine.key_file,
        )
        with pytest.raises(BrokerAuthError, match="not trusted"):
            async with client(untrusting, "agent-1"):
                pass


async def test_connecting_to_a_port_with_no_broker_fails_with_broker_unavailable(
    fleet: str,
) -> None:
    from edgefed.common.broker import free_port

    settings = fast_settings(f"mqtt://127.0.0.1:{free_port()}", fleet, connect_timeout_s=1.0)
    with pytest.raises(BrokerUnavailable, match="no connection"):
        async with client(settings, "lonely"):
            pass


async def test_every_connection_turns_nagle_off_including_after_a_reconnect(
    own_broker: PrivateBroker, fleet: str
) -> None:
    settings = fast_settings(own_broker.url, fleet)
    async with client(settings, "quick") as c:
        assert c.tcp_nodelay is True
        own_broker.kill()
        own_broker.start()
        for _ in range(200):
            if c.reconnects >= 1 and c.connected:
                break
            await asyncio.sleep(0.05)
        assert c.reconnects == 1
        assert c.tcp_nodelay is True


async def test_a_closed_client_says_so_when_reused(settings: Settings, topics: Topics) -> None:
    c = client(settings, "short-lived")
    async with c:
        pass
    with pytest.raises(ClientClosedError):
        await c.publish(topics.heartbeat("x"), b"late")
    with pytest.raises(ClientClosedError):
        async with c:
            pass


async def test_publishing_to_a_wildcard_topic_is_refused(settings: Settings) -> None:
    async with client(settings, "careful") as c:
        with pytest.raises(ConfigError):
            await c.publish("edgefed/v1/x/agents/+/status", b"")
        with pytest.raises(ConfigError):
            await c.subscribe("edgefed/#/bad", lambda m: asyncio.sleep(0))
