"""Session records: only the right key, fleet and session id open them; keys load safely."""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path

import pytest

from edgefed.common.sessions.context import SessionContext
from edgefed.common.sessions.crypto import RECORD_VERSION, FleetKey
from edgefed.common.sessions.errors import SessionKeyError


def context(session_id: str = "s1") -> SessionContext:
    return SessionContext(
        session_id=session_id,
        owner="token:1",
        model="chat-small",
        system_prompt="secret system prompt",
        created_at=1.0,
        expires_at=601.0,
        ttl_s=600.0,
    ).with_turn("my bank pin is 1234", "noted", now=2.0)


def test_a_record_round_trips_and_hides_its_content() -> None:
    key = FleetKey.generate()
    ctx = context()

    record = key.seal_context("plant-3", ctx)

    assert record[0] == RECORD_VERSION
    assert b"1234" not in record
    assert b"secret" not in record
    assert key.open_context("plant-3", "s1", record) == ctx


def test_two_seals_of_the_same_plaintext_differ() -> None:
    key = FleetKey.generate()

    assert key.seal("f", "s1", b"same") != key.seal("f", "s1", b"same")


@pytest.mark.parametrize("position", [0, 1, 13, 20, -1])
def test_a_changed_byte_is_refused(position: int) -> None:
    key = FleetKey.generate()
    record = bytearray(key.seal_context("f", context()))
    record[position] ^= 0x01

    with pytest.raises(SessionKeyError, match="s1"):
        key.open_context("f", "s1", bytes(record))


def test_another_fleet_session_or_key_is_refused() -> None:
    key = FleetKey.generate()
    record = key.seal_context("fleet-a", context("s1"))

    with pytest.raises(SessionKeyError, match="fleet-b"):
        key.open("fleet-b", "s1", record)
    with pytest.raises(SessionKeyError, match="s2"):
        key.open("fleet-a", "s2", record)
    with pytest.raises(SessionKeyError, match="another key"):
        FleetKey.generate().open("fleet-a", "s1", record)


def test_truncated_and_unknown_format_records_are_refused() -> None:
    key = FleetKey.generate()
    record = key.seal("f", "s1", b"x")

    with pytest.raises(SessionKeyError, match="truncated"):
        key.open("f", "s1", record[:20])
    with pytest.raises(SessionKeyError, match="truncated"):
        key.open("f", "s1", b"")
    with pytest.raises(SessionKeyError, match="format 9"):
        key.open("f", "s1", bytes([9]) + record[1:])


def test_a_record_that_opens_but_holds_no_context_is_refused() -> None:
    key = FleetKey.generate()

    with pytest.raises(SessionKeyError, match="no valid context"):
        key.open_context("f", "s1", key.seal("f", "s1", b'{"session_id": "s1"}'))
    other = key.seal("f", "s1", context("s2").model_dump_json().encode())
    with pytest.raises(SessionKeyError, match="holds session s2"):
        key.open_context("f", "s1", other)


def test_base64_round_trip_and_bad_inputs() -> None:
    key = FleetKey.generate()
    text = key.to_base64()

    assert FleetKey.from_base64(text) == key
    assert FleetKey.from_base64(f"  {text}\n") == key
    assert FleetKey.from_base64(base64.urlsafe_b64encode(key.raw).decode().rstrip("=")) == key
    with pytest.raises(SessionKeyError, match="empty"):
        FleetKey.from_base64("  ")
    with pytest.raises(SessionKeyError, match="not valid base64"):
        FleetKey.from_base64("not base64!!")
    with pytest.raises(SessionKeyError, match="16 bytes, not 32"):
        FleetKey.from_base64(base64.b64encode(os.urandom(16)).decode())
    with pytest.raises(SessionKeyError, match="not 31"):
        FleetKey(os.urandom(31))


def test_the_key_never_shows_in_repr() -> None:
    key = FleetKey.generate()

    assert key.to_base64() not in repr(key)
    assert key.raw.hex() not in repr(key)
    assert key.fingerprint() in repr(key)


def test_load_or_create_makes_a_private_key_once(tmp_path: Path) -> None:
    path = tmp_path / "data" / "session.key"

    made = FleetKey.load_or_create(path)
    loaded = FleetKey.load_or_create(path)

    assert made == loaded
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert FleetKey.from_base64(path.read_text()) == made
    assert [p.name for p in path.parent.iterdir()] == ["session.key"]


def test_concurrent_creators_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "session.key"
    keys: list[FleetKey] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        keys.append(FleetKey.load_or_create(path))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(keys) == 8
    assert all(k == keys[0] for k in keys)
    assert FleetKey.from_base64(path.read_text()) == keys[0]


def test_a_corrupt_key_file_is_refused_not_replaced(tmp_path: Path) -> None:
    path = tmp_path / "session.key"
    path.write_text("garbage\n")

    with pytest.raises(SessionKeyError, match="restore it from a backup"):
        FleetKey.load_or_create(path)

    assert path.read_text() == "garbage\n"


def test_digest_is_keyed() -> None:
    key = FleetKey.generate()

    assert key.digest(b"a") == key.digest(b"a")
    assert key.digest(b"a") != key.digest(b"b")
    assert key.digest(b"a") != FleetKey.generate().digest(b"a")
    assert len(key.digest(b"a")) == 64
