"""``/api/v1/sessions`` on a real controller (in process), real mosquitto and real session
holders with a tiny GPT-2 decoder: what an API user relies on -- a conversation keeps its
history across turns and holders, nobody else's token reaches it, a turn over the size limit
changes nothing, an expired session is refused with when it expired and its copies are gone,
deleting it deletes every copy (also on a holder that was offline), and the controller's
replica only ever moves forward."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefed.cloud.registry.models import SessionState
from edgefed.common.broker import PrivateBroker
from edgefed.common.schemas import AgentState, encode
from edgefed.common.serving.runtime import OnnxModel
from edgefed.common.sessions.context import ChatMessage, SessionContext
from edgefed.common.sessions.wire import CONTEXT_TENSOR, SessionReplica
from tests.cloud.registry.conftest import db_url
from tests.cloud.sessions.rig import PARAMS, Rig, SlowModel, bearer, session_rig
from tests.edge.tiny_artifacts import TinyArtifact, build_tiny_artifacts

__all__ = ["db_url"]

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifact:
    return build_tiny_artifacts(tmp_path_factory.mktemp("tiny")).generate


@pytest.fixture(scope="module")
def model(tiny: TinyArtifact) -> OnnxModel:
    return OnnxModel.load(tiny.dir, tiny.manifest, providers=["CPUExecutionProvider"])


@pytest.fixture
async def rig(
    broker: PrivateBroker,
    fleet: str,
    tmp_path: Path,
    tiny: TinyArtifact,
    model: OnnxModel,
    db_url: str,
) -> AsyncIterator[Rig]:
    """The rig on an SQLite file, and on PostgreSQL when EDGEFED_TEST_POSTGRES_URL is set."""
    async with session_rig(broker, fleet, tmp_path, tiny, model, database_url=db_url) as r:
        yield r


async def _create(rig: Rig, token: str, **body: object) -> str:
    r = await rig.http.post(
        "/api/v1/sessions",
        json={"model": rig.tiny.name, "system_prompt": "be brief", **body},
        headers=bearer(token),
    )
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


async def _turn(rig: Rig, token: str, sid: str, message: str) -> dict[str, Any]:
    r = await rig.http.post(
        f"/api/v1/sessions/{sid}/turns",
        json={"message": message, "parameters": PARAMS},
        headers=bearer(token),
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _cold(rig: Rig, model: OnnxModel, messages: list[ChatMessage]) -> str:
    """What the model answers to the whole conversation, run from scratch."""
    from edgefed.common.sessions.chat import ChatFormat

    prompt = ChatFormat.for_artifact(rig.tiny.dir).render(messages)
    return model.generate_turn(prompt, PARAMS, None).text


async def test_a_conversation_keeps_its_history_and_the_controller_its_replica(
    rig: Rig, model: OnnxModel
) -> None:
    alice = await rig.token("alice")
    sid = await _create(rig, alice, metadata={"team": "ops"})
    row = rig.row(sid)
    assert row is not None
    assert row.holder is None
    assert row.version == 0
    assert row.context is not None
    assert b"be brief" not in row.context

    one = await _turn(rig, alice, sid, "the valve on line two leaks")
    assert one["holder"] in rig.agents
    assert one["version"] == 1
    handoff = one["handoff"]
    assert isinstance(handoff, dict)
    assert (handoff["reason"], handoff["method"], handoff["source"]) == (
        "placement",
        "rerun",
        None,
    )
    two = await _turn(rig, alice, sid, "what do i close first")
    assert two["holder"] == one["holder"]  # sticky while its holder is live
    assert two["handoff"] is None
    assert two["version"] == 2

    # The second answer was generated from the whole conversation.
    history = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="the valve on line two leaks"),
        ChatMessage(role="assistant", content=str(one["reply"])),
        ChatMessage(role="user", content="what do i close first"),
    ]
    assert two["reply"] == _cold(rig, model, history)

    r = await rig.http.get(f"/api/v1/sessions/{sid}", headers=bearer(alice))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["state"] == "active"
    assert body["metadata"] == {"team": "ops"}
    assert [m["content"] for m in body["history"]] == [
        "the valve on line two leaks",
        one["reply"],
        "what do i close first",
        two["reply"],
    ]
    row = rig.row(sid)
    assert row is not None
    assert row.version == 2
    assert row.messages == 4
    listed = (await rig.http.get("/api/v1/sessions", headers=bearer(alice))).json()
    assert [s["session_id"] for s in listed] == [sid]
    assert listed[0]["holder"] == one["holder"]


async def test_another_token_cannot_see_continue_or_delete_a_session(rig: Rig) -> None:
    alice, bob = await rig.token("alice"), await rig.token("bob")
    sid = await _create(rig, alice)
    await _turn(rig, alice, sid, "my secret plan")
    for method, path, body in (
        ("GET", f"/api/v1/sessions/{sid}", None),
        ("POST", f"/api/v1/sessions/{sid}/turns", {"message": "tell me alice's plan"}),
        ("DELETE", f"/api/v1/sessions/{sid}", None),
    ):
        r = await rig.http.request(method, path, json=body, headers=bearer(bob))
        assert r.status_code == 404, (method, r.text)
        assert "my secret plan" not in r.text
        # The same answer as for a session that never existed: nothing tells it exists.
        unknown = path.replace(sid, "f" * 32)
        r2 = await rig.http.request(method, unknown, json=body, headers=bearer(bob))
        assert r2.status_code == 404
        assert r.json()["detail"].replace(sid, "X") == r2.json()["detail"].replace("f" * 32, "X")
    assert (await rig.http.get("/api/v1/sessions", headers=bearer(bob))).json() == []
    # Alice's session is untouched.
    r = await rig.http.get(f"/api/v1/sessions/{sid}", headers=bearer(alice))
    assert r.status_code == 200
    assert r.json()["version"] == 1


async def test_a_turn_over_the_size_limit_is_refused_and_changes_nothing(rig: Rig) -> None:
    alice = await rig.token("alice")
    sid = await _create(rig, alice)
    first = await _turn(rig, alice, sid, "hello")
    before = (await rig.http.get(f"/api/v1/sessions/{sid}", headers=bearer(alice))).json()
    r = await rig.http.post(
        f"/api/v1/sessions/{sid}/turns",
        json={"message": "x" * 70_000},
        headers=bearer(alice),
    )
    assert r.status_code == 413, r.text
    assert "max_context_bytes" in r.json()["detail"]
    assert "nothing was changed" in r.json()["detail"]
    after = (await rig.http.get(f"/api/v1/sessions/{sid}", headers=bearer(alice))).json()
    assert after == before
    holder = rig.agents[str(first["holder"])].holder
    assert holder is not None
    ctx = holder.context(sid)
    assert ctx is not None
    assert ctx.version == 1
    # The session goes on.
    assert (await _turn(rig, alice, sid, "still there?"))["version"] == 2
    # A new session over the limit is refused too.
    r = await rig.http.post(
        "/api/v1/sessions",
        json={"model": rig.tiny.name, "system_prompt": "y" * 70_000},
        headers=bearer(alice),
    )
    assert r.status_code == 413, r.text


async def test_an_expired_session_is_refused_with_when_and_its_copies_are_gone(rig: Rig) -> None:
    alice = await rig.token("alice")
    sid = await _create(rig, alice, ttl_s=1.5)
    first = await _turn(rig, alice, sid, "remember the code 4711")
    agent = rig.agents[str(first["holder"])]
    assert agent.on_disk(sid)
    row = rig.row(sid)
    assert row is not None
    await rig.wait_for("the session expired", lambda: time.time() > float(first["expires_at"]))
    r = await rig.http.get(f"/api/v1/sessions/{sid}", headers=bearer(alice))
    assert r.status_code == 410, r.text
    assert f"session {sid} expired at" in r.json()["detail"]
    r = await rig.http.post(
        f"/api/v1/sessions/{sid}/turns", json={"message": "the code?"}, headers=bearer(alice)
    )
    assert r.status_code == 410
    # Every copy is gone: the controller's replica is wiped, the holder's file deleted.
    row = rig.row(sid)
    assert row is not None
    assert row.state == SessionState.EXPIRED
    assert row.context is None
    await rig.wait_for("the holder's copy deleted", lambda: not agent.on_disk(sid))
    assert not agent.keeps(sid)
    assert (await rig.http.get("/api/v1/sessions", headers=bearer(alice))).json() == []


async def test_delete_reaches_a_holder_that_was_offline_when_it_comes_back(rig: Rig) -> None:
    alice = await rig.token("alice")
    sid = await _create(rig, alice)
    first = await _turn(rig, alice, sid, "first turn")
    old = str(first["holder"])
    new = next(a for a in rig.agents if a != old)
    # The holder vanishes (its last will says offline): the next turn moves the session from
    # the controller's replica.
    await rig.agents[old].stop()
    await rig.wait_live(old, live=False)
    second = await _turn(rig, alice, sid, "second turn")
    assert second["holder"] == new
    handoff = second["handoff"]
    assert isinstance(handoff, dict)
    assert (handoff["reason"], handoff["method"], handoff["source"]) == ("offline", "rerun", None)
    r = await rig.http.get(f"/api/v1/sessions/{sid}", headers=bearer(alice))
    assert [m["content"] for m in r.json()["history"]][::2] == ["first turn", "second turn"]

    r = await rig.http.delete(f"/api/v1/sessions/{sid}", headers=bearer(alice))
    assert r.status_code == 200, r.text
    assert (await rig.http.get(f"/api/v1/sessions/{sid}", headers=bearer(alice))).status_code == 404
    await rig.wait_for("the live holder's copy deleted", lambda: not rig.agents[new].on_disk(sid))
    row = rig.row(sid)
    assert row is not None
    assert row.state == SessionState.DELETED
    assert row.context is None
    assert row.pending_deletes == [old]
    assert rig.agents[old].on_disk(sid)  # it was offline: its copy is still there ...

    await rig.agents[old].start()  # ... until it is back
    await rig.wait_for(
        "the returning holder's copy deleted", lambda: not rig.agents[old].on_disk(sid)
    )
    await rig.wait_for("no delete owed", lambda: (rig.row(sid) or row).pending_deletes == [])


async def test_a_holder_that_dies_mid_turn_hands_the_session_over_and_the_turn_finishes(
    rig: Rig, model: OnnxModel
) -> None:
    alice = await rig.token("alice")
    sid = await _create(rig, alice)
    first = await _turn(rig, alice, sid, "the boiler pressure is 3 bar")
    old = str(first["holder"])
    new = next(a for a in rig.agents if a != old)
    slow = rig.agents[old].slow = SlowModel(model, delay_s=5.0)
    turn = asyncio.create_task(_turn(rig, alice, sid, "is that too high"))
    await asyncio.to_thread(slow.started.wait, 30)
    await rig.agents[old].stop()  # mid-turn: its last will says offline
    second = await turn
    assert second["holder"] == new
    handoff = second["handoff"]
    assert isinstance(handoff, dict)
    assert (handoff["reason"], handoff["method"], handoff["source"]) == ("offline", "rerun", None)
    history = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="the boiler pressure is 3 bar"),
        ChatMessage(role="assistant", content=str(first["reply"])),
        ChatMessage(role="user", content="is that too high"),
    ]
    assert second["reply"] == _cold(rig, model, history)  # the full history reached the new one
    assert second["version"] == 2
    row = rig.row(sid)
    assert row is not None
    assert row.holder == new
    assert row.pending_deletes == [old]


async def test_a_draining_holder_hands_its_session_over_and_loses_its_copy(
    rig: Rig, model: OnnxModel
) -> None:
    alice = await rig.token("alice")
    sid = await _create(rig, alice)
    first = await _turn(rig, alice, sid, "the pump hums")
    old = str(first["holder"])
    new = next(a for a in rig.agents if a != old)
    await rig.agents[old].say(AgentState.DRAINING)
    await rig.wait_live(old, live=False)
    second = await _turn(rig, alice, sid, "is that bad")
    assert second["holder"] == new
    handoff = second["handoff"]
    assert isinstance(handoff, dict)
    assert handoff["reason"] == "drain"
    assert handoff["source"] == old
    assert handoff["method"] in ("kv-fp16", "rerun")
    assert handoff["context_tokens"] > 0
    assert set(handoff["estimates_ms"]) >= {"rerun"}
    history = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="the pump hums"),
        ChatMessage(role="assistant", content=str(first["reply"])),
        ChatMessage(role="user", content="is that bad"),
    ]
    assert second["reply"] == _cold(rig, model, history)
    await rig.wait_for("the old holder's copy deleted", lambda: not rig.agents[old].on_disk(sid))
    row = rig.row(sid)
    assert row is not None
    assert row.holder == new
    assert row.pending_deletes == []
    assert row.last_handoff is not None
    assert row.last_handoff["target"] == new
    metrics = (await rig.http.get("/metrics")).text
    assert 'edgefed_session_handoffs_total{method="rerun",reason="placement"}' in metrics
    assert 'reason="drain"' in metrics


async def test_replicas_only_move_the_controllers_copy_forward(rig: Rig) -> None:
    alice = await rig.token("alice")
    sid = await _create(rig, alice)
    await _turn(rig, alice, sid, "one")
    await _turn(rig, alice, sid, "two")
    row = rig.row(sid)
    assert row is not None
    assert row.version == 2
    assert row.context is not None
    key = rig.running.state.session_key
    assert key is not None
    fleet = rig.running.settings.fleet
    ctx = key.open_context(fleet, sid, row.context)
    holder = row.holder
    assert holder is not None

    def replica(version: int, text: str) -> tuple[SessionReplica, dict[str, np.ndarray]]:
        changed = ctx.model_copy(
            update={
                "version": version,
                "messages": [*ctx.messages, ChatMessage(role="user", content=text)],
            }
        )
        record = key.seal_context(fleet, changed)
        return (
            SessionReplica(
                session_id=sid,
                holder=holder,
                version=version,
                owner=ctx.owner,
                model=ctx.model,
                expires_at=ctx.expires_at,
                sent_at=time.time(),
            ),
            {CONTEXT_TENSOR: np.frombuffer(record, dtype=np.uint8)},
        )

    await rig.service.take_replica(holder, *replica(1, "stale"))
    row = rig.row(sid)
    assert row is not None
    assert row.version == 2
    assert key.open_context(fleet, sid, row.context or b"").messages == ctx.messages
    await rig.service.take_replica(holder, *replica(3, "newer"))
    row = rig.row(sid)
    assert row is not None
    assert row.version == 3
    assert key.open_context(fleet, sid, row.context or b"").messages[-1].content == "newer"
    # A record that does not open (tampered) is refused; a replica under another holder's
    # name is ignored.
    bad, tensors = replica(9, "tampered")
    raw = bytearray(tensors[CONTEXT_TENSOR].tobytes())
    raw[-1] ^= 1
    await rig.service.take_replica(
        holder, bad, {CONTEXT_TENSOR: np.frombuffer(bytes(raw), np.uint8)}
    )
    other = next(a for a in rig.agents if a != holder)
    await rig.service.take_replica(other, *replica(9, "spoofed"))
    row = rig.row(sid)
    assert row is not None
    assert row.version == 3


async def test_a_session_gets_503_with_retry_after_when_no_agent_serves_its_model(
    rig: Rig,
) -> None:
    alice = await rig.token("alice")
    r = await rig.http.post(
        "/api/v1/sessions", json={"model": "no-such-model"}, headers=bearer(alice)
    )
    assert r.status_code == 201
    sid = r.json()["session_id"]
    r = await rig.http.post(
        f"/api/v1/sessions/{sid}/turns", json={"message": "hello"}, headers=bearer(alice)
    )
    assert r.status_code == 503, r.text
    assert "no live agent serves model 'no-such-model'" in r.json()["detail"]
    assert int(r.headers["Retry-After"]) >= 1
    row = rig.row(sid)
    assert row is not None
    assert row.version == 0
    assert row.holder is None


async def test_a_session_moves_off_a_holder_much_slower_than_another(rig: Rig) -> None:
    alice = await rig.token("alice")
    sid = await _create(rig, alice)
    first = await _turn(rig, alice, sid, "the fan rattles")
    old = str(first["holder"])
    new = next(a for a in rig.agents if a != old)
    # Within the move factor (2): the session stays.
    await rig.agents[old].beat(latency_ms=150)
    await rig.agents[new].beat(latency_ms=100)
    model = rig.tiny.name
    await rig.wait_for(
        "heartbeats seen", lambda: rig.service.directory.latency_ms(new, model) == 100
    )
    second = await _turn(rig, alice, sid, "since this morning")
    assert second["holder"] == old
    assert second["handoff"] is None
    # Far slower than the best live agent: the session moves, from the old holder.
    await rig.agents[old].beat(latency_ms=900, seq=2)
    await rig.wait_for(
        "heartbeat seen", lambda: rig.service.directory.latency_ms(old, model) == 900
    )
    third = await _turn(rig, alice, sid, "should i stop it")
    assert third["holder"] == new
    handoff = third["handoff"]
    assert isinstance(handoff, dict)
    assert (handoff["reason"], handoff["source"]) == ("latency", old)
    assert third["version"] == 3
    await rig.wait_for("the old holder's copy deleted", lambda: not rig.agents[old].on_disk(sid))


async def test_a_local_apps_session_is_replicated_but_no_token_session_can_be_planted(
    rig: Rig,
) -> None:
    key = rig.running.state.session_key
    assert key is not None
    fleet = rig.running.settings.fleet
    agent = rig.agents["h1"]
    assert agent.client is not None

    def replica(owner: str, sid: str) -> tuple[SessionReplica, dict[str, np.ndarray]]:
        ctx = SessionContext(
            session_id=sid,
            owner=owner,
            model=rig.tiny.name,
            created_at=time.time(),
            expires_at=time.time() + 600,
            ttl_s=600,
        )
        record = key.seal_context(fleet, ctx)
        return (
            SessionReplica(
                session_id=sid,
                holder="h1",
                version=0,
                owner=owner,
                model=ctx.model,
                expires_at=ctx.expires_at,
                sent_at=time.time(),
            ),
            {CONTEXT_TENSOR: np.frombuffer(record, dtype=np.uint8)},
        )

    # A local app's session on h1, published as a holder does: kept, h1 its holder.
    encoded = encode(*replica("key:" + "0" * 64, "b" * 32))
    await agent.client.publish(
        agent.topics.session_replica("h1"),
        encoded.payload,
        qos=1,
        content_type=encoded.content_type,
    )
    await rig.wait_for("the local session replicated", lambda: rig.row("b" * 32) is not None)
    row = rig.row("b" * 32)
    assert row is not None
    assert row.holder == "h1"
    assert row.state == SessionState.ACTIVE
    # An API token's session the controller never made is no one's: not planted.
    await rig.service.take_replica("h1", *replica("token:1", "a" * 32))
    assert rig.row("a" * 32) is None


async def test_a_replica_saying_deleted_settles_the_delete_owed_by_that_holder(rig: Rig) -> None:
    alice = await rig.token("alice")
    sid = await _create(rig, alice)
    first = await _turn(rig, alice, sid, "first")
    old = str(first["holder"])
    await rig.agents[old].stop()
    await rig.wait_live(old, live=False)
    await _turn(rig, alice, sid, "second")
    row = rig.row(sid)
    assert row is not None
    assert row.pending_deletes == [old]
    gone = SessionReplica(
        session_id=sid,
        holder=old,
        version=1,
        owner=row.owner,
        model=row.model,
        expires_at=time.time() + 60,
        deleted=True,
        sent_at=time.time(),
    )
    await rig.service.take_replica(old, gone, {})
    row = rig.row(sid)
    assert row is not None
    assert row.pending_deletes == []
    assert row.holder != old  # the new holder keeps the session
    assert row.state == SessionState.ACTIVE
