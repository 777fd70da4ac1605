"""The ``sessions`` table on real databases (an SQLite file; PostgreSQL when
EDGEFED_TEST_POSTGRES_URL is set), through the migrations: the controller's replica of a context
only moves forward, an ended session keeps a tombstone with its context wiped and remembers
which holders still owe a delete, and tombstones are forgotten once nothing is owed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine

from edgefed.cloud.registry.db import make_engine, make_sessionmaker, migrate
from edgefed.cloud.registry.models import SessionState
from edgefed.cloud.sessions.records import SessionTable
from edgefed.common.sessions.context import SessionContext
from edgefed.common.sessions.crypto import FleetKey
from tests.cloud.registry.conftest import db_url

__all__ = ["db_url"]

FLEET = "f1"
NOW = 1_800_000_000.0


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = make_engine(db_url)
    migrate(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def table(engine: Engine) -> SessionTable:
    return SessionTable(make_sessionmaker(engine, immediate=True), make_sessionmaker(engine))


def _ctx(version: int = 0, owner: str = "token:1") -> SessionContext:
    base = SessionContext(
        session_id="s" * 32,
        owner=owner,
        model="tiny",
        system_prompt="be brief",
        created_at=NOW,
        expires_at=NOW + 60,
        ttl_s=60,
    )
    for i in range(version):
        base = base.with_turn(f"q{i}", f"a{i}", NOW + i)
    return base


def test_the_replica_only_moves_forward(table: SessionTable) -> None:
    key = FleetKey.generate()
    first = _ctx()
    table.insert(first, key.seal_context(FLEET, first))
    two = _ctx(2)
    row, changed = table.store_context(
        two, key.seal_context(FLEET, two), holder="a1", set_holder=True
    )
    assert changed
    assert row is not None
    assert (row.version, row.messages, row.holder) == (2, 4, "a1")
    one = _ctx(1)
    row, changed = table.store_context(
        one, key.seal_context(FLEET, one), holder="a2", set_holder=True
    )
    assert not changed
    assert row is not None
    assert (row.version, row.holder) == (2, "a1")
    assert row.context is not None
    assert key.open_context(FLEET, row.id, row.context).version == 2
    # Another owner's context never lands on this row.
    theirs = _ctx(5, owner="token:2")
    _, changed = table.store_context(theirs, key.seal_context(FLEET, theirs))
    assert not changed
    got = table.get(first.session_id)
    assert got is not None
    assert got.version == 2


def test_an_ended_session_is_a_tombstone_that_remembers_owed_deletes(table: SessionTable) -> None:
    key = FleetKey.generate()
    ctx = _ctx(1)
    sid = ctx.session_id
    table.insert(ctx, key.seal_context(FLEET, ctx), holder="a1")
    moved = table.moved(sid, holder="a2", handoff={"method": "rerun"}, stale=["a1"])
    assert moved is not None
    assert (moved.holder, moved.pending_deletes, moved.handoffs) == ("a2", ("a1",), 1)
    before = table.end(sid, SessionState.EXPIRED, NOW + 100)
    assert before is not None
    assert before.holder == "a2"
    assert table.end(sid, SessionState.DELETED, NOW + 101) is None  # ended once
    row = table.get(sid)
    assert row is not None
    assert row.state is SessionState.EXPIRED
    assert (row.context, row.context_bytes, row.messages, row.holder) == (None, 0, 0, None)
    assert set(row.pending_deletes) == {"a1", "a2"}
    # A late replica cannot bring it back.
    newer = _ctx(3)
    _, changed = table.store_context(newer, key.seal_context(FLEET, newer), holder="a2")
    assert not changed
    assert table.purge_tombstones(NOW + 1_000) == 0  # deletes still owed
    table.deleted_on(sid, "a1")
    table.deleted_on(sid, "a2")
    row = table.get(sid)
    assert row is not None
    assert row.pending_deletes == ()
    assert table.purge_tombstones(NOW + 50) == 0  # ended after that
    assert table.purge_tombstones(NOW + 1_000) == 1
    assert table.get(sid) is None


def test_sessions_are_listed_per_owner_and_due_ones_found(table: SessionTable) -> None:
    key = FleetKey.generate()
    mine = _ctx()
    theirs = _ctx(owner="token:2").model_copy(
        update={"session_id": "t" * 32, "expires_at": NOW + 5}
    )
    table.insert(mine, key.seal_context(FLEET, mine))
    table.insert(theirs, key.seal_context(FLEET, theirs))
    assert [r.id for r in table.of_owner("token:1")] == [mine.session_id]
    assert table.due_to_expire(NOW + 10) == [theirs.session_id]
    assert sorted(table.due_to_expire(NOW + 61)) == sorted([mine.session_id, theirs.session_id])
