"""The holder's session files: atomic saves, nothing lost on a crash, versions never go back."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from edgefed.common.errors import PayloadError
from edgefed.common.sessions.context import SessionContext
from edgefed.common.sessions.crypto import FleetKey
from edgefed.common.sessions.errors import SessionConflict, SessionKeyError, SessionStoreError
from edgefed.common.sessions.store import SessionStore

KEY = FleetKey.generate()


def context(session_id: str = "s1", *, expires_at: float = 2000.0) -> SessionContext:
    return SessionContext(
        session_id=session_id,
        owner="token:1",
        model="chat-small",
        created_at=1000.0,
        expires_at=expires_at,
        ttl_s=1000.0,
    )


def store(directory: Path, key: FleetKey = KEY, fleet: str = "f") -> SessionStore:
    return SessionStore(directory, key, fleet)


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_save_load_round_trip_in_a_private_encrypted_file(tmp_path: Path) -> None:
    directory = tmp_path / "sessions"
    s = store(directory)
    ctx = context().with_turn("my secret question", "answer", now=1500.0)

    s.save(ctx)

    assert s.load("s1") == ctx
    assert store(directory).load("s1") == ctx  # another process, after a restart
    assert files(directory) == ["s1.session"]
    assert b"secret" not in (directory / "s1.session").read_bytes()
    assert stat.S_IMODE((directory / "s1.session").stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert s.ids() == ["s1"]
    assert s.load("nope") is None


def test_a_lower_version_is_refused_and_the_newer_record_kept(tmp_path: Path) -> None:
    s = store(tmp_path)
    v0 = context()
    v2 = v0.with_turn("a", "b", now=1100.0).with_turn("c", "d", now=1200.0)
    s.save(v2)

    with pytest.raises(SessionConflict) as info:
        s.save(v0.with_turn("x", "y", now=1300.0))

    assert "version 1 is older than the stored version 2" in info.value.message
    assert s.load("s1") == v2
    s.save(v2)  # the same version again is fine (a replica re-sent)
    s.save(v2.with_turn("e", "f", now=1400.0))
    loaded = s.load("s1")
    assert loaded is not None
    assert loaded.version == 3


def test_a_crash_after_writing_the_temporary_file_loses_nothing(tmp_path: Path) -> None:
    s = store(tmp_path)
    old = context().with_turn("q", "a", now=1100.0)
    s.save(old)
    new = old.with_turn("q2", "a2", now=1200.0)
    # what a crash between write and rename leaves: a complete temporary record
    (tmp_path / ".s1.session.0123456789ab.tmp").write_bytes(KEY.seal_context("f", new))
    # and one cut off halfway through its write
    (tmp_path / ".s1.session.ba9876543210.tmp").write_bytes(KEY.seal_context("f", new)[:17])

    reopened = store(tmp_path)

    assert reopened.load("s1") == old
    assert reopened.ids() == ["s1"]
    assert files(tmp_path) == ["s1.session"]  # leftovers removed when the store opens
    reopened.save(new)
    assert reopened.load("s1") == new


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_a_save_that_fails_midway_keeps_the_previous_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    s = store(tmp_path)
    old = context().with_turn("q", "a", now=1100.0)
    s.save(old)
    real = getattr(os, failing)
    calls = {"n": 0}

    def crash(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if failing == "write" and calls["n"] == 1:
            real(args[0], bytes(args[1])[:10])  # type: ignore[call-overload]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(SessionStoreError, match="No space left on device") as info:
        s.save(old.with_turn("q2", "a2", now=1200.0))
    monkeypatch.undo()

    assert "previous record" in info.value.message
    assert calls["n"] >= 1
    assert s.load("s1") == old
    assert files(tmp_path) == ["s1.session"]


def test_delete_removes_the_record_and_leftovers(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save(context("s1"))
    s.save(context("s10"))
    (tmp_path / ".s1.session.abcdef.tmp").write_bytes(b"partial")
    (tmp_path / "s1.session.0badc0de.bad").write_bytes(b"old")

    assert s.delete("s1") is True
    assert s.delete("s1") is False
    assert s.load("s1") is None
    assert files(tmp_path) == ["s10.session"]  # another session's files are not touched
    assert s.delete("../s10") is False
    assert s.ids() == ["s10"]


def test_purge_expired_deletes_only_expired_records(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.save(context("old", expires_at=1500.0))
    s.save(context("edge", expires_at=1600.0))
    s.save(context("live", expires_at=1700.0))

    assert sorted(s.purge_expired(1600.0)) == ["edge", "old"]

    assert files(tmp_path) == ["live.session"]
    assert s.purge_expired(1600.0) == []
    assert [c.session_id for c in s.load_all(1600.0)] == ["live"]
    assert s.load_all(1700.0) == []  # expired: not loaded (purge deletes it)
    assert s.ids() == ["live"]


def test_records_that_do_not_open_are_set_aside_not_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    s = store(tmp_path)
    s.save(context("good"))
    store(tmp_path, key=FleetKey.generate()).save(context("otherkey"))
    store(tmp_path, fleet="other-fleet").save(context("otherfleet"))
    damaged = bytearray(KEY.seal_context("f", context("damaged")))
    damaged[-1] ^= 1
    (tmp_path / "damaged.session").write_bytes(bytes(damaged))
    (tmp_path / "moved.session").write_bytes((tmp_path / "good.session").read_bytes())
    original = (tmp_path / "damaged.session").read_bytes()

    with pytest.raises(SessionKeyError, match="damaged"):
        s.load("damaged")
    assert s.purge_expired(1500.0) == []  # does not touch what it cannot read
    with caplog.at_level(logging.WARNING, logger="edgefed.common.sessions.store"):
        loaded = s.load_all(1500.0)

    assert [c.session_id for c in loaded] == ["good"]
    assert s.ids() == ["good"]
    bad = sorted(p.name for p in tmp_path.glob("*.bad"))
    assert [name.split(".")[0] for name in bad] == ["damaged", "moved", "otherfleet", "otherkey"]
    assert next(tmp_path.glob("damaged.session.*.bad")).read_bytes() == original
    assert "damaged" in caplog.text
    assert "set aside" in caplog.text


def test_saving_over_a_record_that_does_not_open_sets_it_aside(tmp_path: Path) -> None:
    store(tmp_path, key=FleetKey.generate()).save(context("s1"))
    s = store(tmp_path)

    s.save(context("s1"))

    assert s.load("s1") == context("s1")
    assert len(list(tmp_path.glob("s1.session.*.bad"))) == 1


def test_invalid_ids_never_become_paths(tmp_path: Path) -> None:
    s = store(tmp_path / "sessions")
    (tmp_path / "secret.session").write_bytes(b"outside")
    bad = context().model_copy(update={"session_id": "../secret"})  # bypasses validation

    with pytest.raises(PayloadError, match="not a session id"):
        s.save(bad)

    assert s.load("../secret") is None
    assert s.delete("../secret") is False
    assert (tmp_path / "secret.session").read_bytes() == b"outside"
    assert s.ids() == []


def test_an_unusable_directory_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")

    with pytest.raises(SessionStoreError, match="cannot create the session directory"):
        store(tmp_path / "file" / "sessions")
