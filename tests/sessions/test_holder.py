"""The session holder over a real mosquitto with a tiny GPT-2 decoder (ONNX, KV cache).

Two holders in one process (each with its own encrypted store), a local app's client and the
controller's client, as on a device: what a user relies on is that a conversation keeps its
history, that nobody else reaches it, that it moves between holders with its KV cache or by a
re-run and answers the same, that its copies at rest are encrypted, and that expiry and size
limits refuse clearly and lose nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefed.common.broker import PrivateBroker
from edgefed.common.errors import ErrorCode, RemoteError
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.rpc import ReplyCache, Requester, serve
from edgefed.common.schemas import Decoded, decode
from edgefed.common.serving.runtime import OnnxModel
from edgefed.common.sessions.chat import ChatFormat
from edgefed.common.sessions.context import ChatMessage, SessionContext, SessionLimits
from edgefed.common.sessions.crypto import FleetKey
from edgefed.common.sessions.errors import SessionKeyError, SessionStoreError
from edgefed.common.sessions.holder import HolderSettings, SessionHolder
from edgefed.common.sessions.store import SessionStore
from edgefed.common.sessions.wire import (
    CONTEXT_TENSOR,
    HandoffRecord,
    SessionReplica,
    SessionReply,
    SessionRequest,
)
from edgefed.common.settings import BrokerAddress, Settings
from edgefed.common.topics import Topics
from tests.edge.tiny_artifacts import TinyArtifact, build_tiny_artifacts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

OWNER = "token:7"
APP_KEY = "the-local-app-secret-0001"
PARAMS = {"max_new_tokens": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifact:
    return build_tiny_artifacts(tmp_path_factory.mktemp("tiny")).generate


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Side:
    holder: SessionHolder
    store_dir: Path


@dataclass
class Rig:
    topics: Topics
    key: FleetKey
    model: OnnxModel
    clock: Clock
    sides: dict[str, Side]
    cloud: Requester
    local: Requester
    replicas: list[tuple[SessionReplica, dict[str, np.ndarray]]]
    local_topics: Topics

    async def ask(
        self, holder: str, request: SessionRequest, *, local: bool = False, **kw: Any
    ) -> Decoded[SessionReply]:
        requester = self.local if local else self.cloud
        topics = self.local_topics if local else self.topics
        return await requester.request(
            topics.agent_sessions(holder), request, SessionReply, timeout=30, **kw
        )

    def turn(self, sid: str, message: str) -> SessionRequest:
        return SessionRequest(
            op="turn", session_id=sid, owner=OWNER, message=message, parameters=PARAMS
        )


def _holder(
    holder_id: str,
    root: Path,
    key: FleetKey,
    topics: Topics,
    model: OnnxModel,
    art: Path,
    clock: Clock,
) -> Side:
    fmt = ChatFormat.for_artifact(art)
    store_dir = root / holder_id / "sessions"
    holder = SessionHolder(
        holder_id=holder_id,
        topics=topics,
        key=key,
        store=SessionStore(store_dir, key, topics.fleet),
        models=lambda name: model,
        chat_format=lambda m: fmt,
        settings=HolderSettings(
            default_ttl_s=60.0,
            limits=SessionLimits(max_context_bytes=2_000, max_messages=50),
            replica_lag_s=0.05,
        ),
        clock=clock,
    )
    return Side(holder, store_dir)


@pytest.fixture
async def rig(
    broker: PrivateBroker, settings: Settings, tiny: TinyArtifact, tmp_path: Path
) -> AsyncIterator[Rig]:
    topics = Topics(settings.fleet)
    key = FleetKey.generate()
    clock = Clock()
    model = OnnxModel.load(tiny.dir, tiny.manifest, providers=["CPUExecutionProvider"])
    sides = {h: _holder(h, tmp_path, key, topics, model, tiny.dir, clock) for h in ("h1", "h2")}
    address = BrokerAddress.parse(broker.url)
    replicas: list[tuple[SessionReplica, dict[str, np.ndarray]]] = []

    async def on_replica(message: Message) -> None:
        decoded = decode(message.payload, message.content_type, SessionReplica)
        replicas.append((decoded.message, decoded.tensors))

    async with (
        MqttClient(address, settings.mqtt, client_id=f"{topics.fleet}-agents") as agents,
        MqttClient(address, settings.mqtt, client_id=f"{topics.fleet}-ctl") as ctl,
        MqttClient(address, settings.mqtt, client_id=f"{topics.fleet}-app") as app,
    ):
        await ctl.subscribe(topics.all_session_replicas(), on_replica)
        tasks = []
        for holder_id, side in sides.items():
            side.holder.restore()
            await serve(
                agents,
                topics.agent_sessions(holder_id),
                side.holder.handle_cloud,
                expected=SessionRequest,
                dedup=ReplyCache(),
            )
            tasks.append(asyncio.create_task(side.holder.replicate(agents)))
        # Local apps reach h1 on its own topic tree (a second topic prefix stands for the
        # local broker: same handler, the local entry point).
        local_topics = Topics(f"{topics.fleet}-local")
        await serve(
            agents,
            local_topics.agent_sessions("h1"),
            sides["h1"].holder.handle_local,
            expected=SessionRequest,
            dedup=ReplyCache(),
        )
        try:
            yield Rig(
                topics,
                key,
                model,
                clock,
                sides,
                Requester(ctl, topics),
                Requester(app, local_topics),
                replicas,
                local_topics,
            )
        finally:
            for task in tasks:
                task.cancel()


async def _create(rig: Rig, holder: str = "h1", **extra: Any) -> str:
    request = SessionRequest(
        op="create", owner=OWNER, model=rig.model.name, system_prompt="be brief", **extra
    )
    reply = await rig.ask(holder, request)
    assert reply.message.summary is not None
    return reply.message.summary.session_id


def _cold(rig: Rig, messages: list[ChatMessage], art: Path) -> str:
    """The reply a fresh model gives to the whole conversation (no cache)."""
    prompt = ChatFormat.for_artifact(art).render(messages)
    return rig.model.generate_turn(prompt, PARAMS, None).text


async def test_turns_keep_history_and_reuse_the_cache(rig: Rig, tiny: TinyArtifact) -> None:
    sid = await _create(rig)
    one = (await rig.ask("h1", rig.turn(sid, "the valve on line two leaks"))).message
    two = (await rig.ask("h1", rig.turn(sid, "what do i close first"))).message
    assert two.summary is not None
    assert two.summary.version == 2
    history = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="the valve on line two leaks"),
        ChatMessage(role="assistant", content=one.reply or ""),
        ChatMessage(role="user", content="what do i close first"),
    ]
    assert two.reply == _cold(rig, history, tiny.dir)
    # Turn two prefilled only what turn one's cache did not cover.
    assert (
        0
        < two.timings_ms["prefill_tokens"]
        < len(rig.model.tokenize_prompt(ChatFormat.for_artifact(tiny.dir).render(history)))
    )


async def test_contexts_at_rest_are_encrypted_and_survive_a_restart(
    rig: Rig, tiny: TinyArtifact, tmp_path: Path
) -> None:
    sid = await _create(rig)
    await rig.ask("h1", rig.turn(sid, "secret recipe: two parts sulphur"))
    files = [p for p in rig.sides["h1"].store_dir.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert b"sulphur" not in path.read_bytes()
    # A new holder process on the same disk has the session (the cache is gone: re-run).
    again = _holder("h1", tmp_path, rig.key, rig.topics, rig.model, tiny.dir, rig.clock)
    assert sid in again.holder.restore()
    ctx = again.holder.context(sid)
    assert ctx is not None
    assert ctx.messages[0].content == "secret recipe: two parts sulphur"
    # Another fleet's key opens nothing.
    other = SessionStore(rig.sides["h1"].store_dir, FleetKey.generate(), rig.topics.fleet)
    with pytest.raises(SessionKeyError):
        other.load(sid)


@pytest.mark.parametrize("kv_format", ["fp16", "int8", "none"])
async def test_a_session_moves_with_its_cache_or_by_rerun_and_answers_the_same(
    rig: Rig, tiny: TinyArtifact, kv_format: str
) -> None:
    sid = await _create(rig)
    first = (await rig.ask("h1", rig.turn(sid, "pump three hums loudly"))).message
    export = await rig.ask(
        "h1", SessionRequest(op="export", session_id=sid, owner=OWNER, kv_format=kv_format)
    )
    assert CONTEXT_TENSOR in export.tensors
    assert export.message.context_tokens > 0
    assert export.message.kv is not None
    assert (
        export.message.kv["bytes_per_token"]["fp16"] > export.message.kv["bytes_per_token"]["int8"]
    )
    assert any(n.startswith("kv.") for n in export.tensors) == (kv_format != "none")
    method = {"fp16": "kv-fp16", "int8": "kv-int8", "none": "rerun"}[kv_format]
    plan = HandoffRecord(
        session_id=sid,
        source="h1",
        target="h2",
        reason="latency",
        method=method,
        context_tokens=export.message.context_tokens,
    )
    adopted = await rig.ask(
        "h2",
        SessionRequest(
            op="adopt",
            session_id=sid,
            owner=OWNER,
            kv_format=kv_format,
            kv=export.message.kv,
            handoff=plan,
        ),
        tensors=export.tensors,
    )
    assert adopted.message.handoff is not None
    assert adopted.message.handoff.method == method
    assert adopted.message.handoff.target == "h2"
    second = (await rig.ask("h2", rig.turn(sid, "is that bad"))).message
    history = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="pump three hums loudly"),
        ChatMessage(role="assistant", content=first.reply or ""),
        ChatMessage(role="user", content="is that bad"),
    ]
    expected = _cold(rig, history, tiny.dir)
    if kv_format == "int8":  # lossy cache: the same answer is not guaranteed, a close one is
        assert second.reply is not None
        assert second.tokens > 0
    else:
        assert second.reply == expected
    # The new holder did not prefill the whole conversation again at the turn.
    assert second.timings_ms["prefill_tokens"] < export.message.context_tokens


async def test_other_owners_and_local_apps_reach_only_their_own(rig: Rig) -> None:
    sid = await _create(rig)
    await rig.ask("h1", rig.turn(sid, "my pin is 4417"))
    for op in ("get", "turn", "delete", "export"):
        request = SessionRequest(op=op, session_id=sid, owner="token:8", message="pin?")
        with pytest.raises(RemoteError) as err:
            await rig.ask("h1", request)
        assert err.value.code == ErrorCode.NOT_FOUND
        assert "4417" not in str(err.value)
    listed = await rig.ask("h1", SessionRequest(op="list", owner="token:8"))
    assert listed.message.sessions == []
    # A local app: creates with its key, another key sees nothing, and it cannot move sessions.
    created = await rig.ask(
        "h1",
        SessionRequest(op="create", owner_key=APP_KEY, model=rig.model.name),
        local=True,
    )
    assert created.message.summary is not None
    local_sid = created.message.summary.session_id
    reply = await rig.ask(
        "h1",
        SessionRequest(
            op="turn", session_id=local_sid, owner_key=APP_KEY, message="hello", parameters=PARAMS
        ),
        local=True,
    )
    assert reply.message.summary is not None
    assert reply.message.summary.version == 1
    with pytest.raises(RemoteError) as err:
        await rig.ask(
            "h1",
            SessionRequest(op="get", session_id=local_sid, owner_key="another-apps-secret-02"),
            local=True,
        )
    assert err.value.code == ErrorCode.NOT_FOUND
    with pytest.raises(RemoteError) as err:  # the controller's session, through the local door
        await rig.ask("h1", SessionRequest(op="get", session_id=sid, owner_key=APP_KEY), local=True)
    assert err.value.code == ErrorCode.NOT_FOUND
    with pytest.raises(RemoteError) as err:
        await rig.ask(
            "h1", SessionRequest(op="export", session_id=local_sid, owner_key=APP_KEY), local=True
        )
    assert err.value.code == ErrorCode.MALFORMED


async def test_expiry_and_size_limits_refuse_clearly_and_lose_nothing(rig: Rig) -> None:
    sid = await _create(rig, ttl_s=30.0)
    await rig.ask("h1", rig.turn(sid, "hello"))
    with pytest.raises(RemoteError) as err:
        await rig.ask("h1", rig.turn(sid, "x" * 3_000))  # over the 2,000 bytes
    assert err.value.code == ErrorCode.TOO_LARGE
    assert "2000" in str(err.value) or "2,000" in str(err.value)
    got = await rig.ask("h1", SessionRequest(op="get", session_id=sid, owner=OWNER))
    assert got.message.summary is not None
    assert got.message.summary.version == 1  # nothing changed
    assert got.message.context is not None
    assert len(got.message.context["messages"]) == 2

    rig.clock.now += 31.0
    with pytest.raises(RemoteError) as err:
        await rig.ask("h1", rig.turn(sid, "still there?"))
    assert err.value.code == ErrorCode.GONE
    assert "expired" in str(err.value)
    assert sid not in rig.sides["h1"].holder.sessions()
    assert sid not in SessionStore(rig.sides["h1"].store_dir, rig.key, rig.topics.fleet).ids()
    for _ in range(100):  # the controller hears that the copy is gone
        if any(r.session_id == sid and r.deleted for r, _ in rig.replicas):
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("no deleted replica for the expired session")


async def test_every_change_reaches_the_replica_sealed(rig: Rig) -> None:
    sid = await _create(rig)
    await rig.ask("h1", rig.turn(sid, "note: torque 40 Nm"))
    for _ in range(100):
        mine = [(r, t) for r, t in rig.replicas if r.session_id == sid and not r.deleted]
        if mine and mine[-1][0].version == 1:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail(f"no replica of version 1: {rig.replicas}")
    replica, tensors = mine[-1]
    assert replica.holder == "h1"
    assert replica.owner == OWNER
    sealed = np.asarray(tensors[CONTEXT_TENSOR], dtype=np.uint8).tobytes()
    assert b"torque" not in sealed
    ctx = rig.key.open_context(rig.topics.fleet, sid, sealed)
    assert ctx.version == 1
    assert ctx.messages[0].content == "note: torque 40 Nm"


def test_an_expired_session_whose_file_cannot_be_deleted_is_kept_and_deleted_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = FleetKey.generate()
    clock = Clock()
    store = SessionStore(tmp_path / "sessions", key, "f1")
    holder = SessionHolder(
        holder_id="h1",
        topics=Topics("f1"),
        key=key,
        store=store,
        models=lambda name: pytest.fail("no model is needed to expire a session"),
        chat_format=lambda m: pytest.fail("no chat format is needed to expire a session"),
        clock=clock,
    )
    ctx = SessionContext(
        session_id="s1",
        owner=OWNER,
        model="m",
        created_at=clock.now,
        expires_at=clock.now + 10,
        ttl_s=10,
    )
    store.save(ctx)
    assert holder.restore() == ["s1"]
    clock.now += 11
    real_delete = store.delete

    def failing(session_id: str) -> bool:
        raise SessionStoreError(f"cannot delete session {session_id}: disk gone read-only")

    monkeypatch.setattr(store, "delete", failing)
    assert holder.expire_now() == []
    assert holder.sessions() == ["s1"]  # nothing half-deleted: kept whole for the next sweep
    assert store.ids() == ["s1"]
    monkeypatch.setattr(store, "delete", real_delete)
    assert holder.expire_now() == ["s1"]
    assert holder.sessions() == []
    assert store.ids() == []
