"""Session contexts: limits that refuse before anything changes, expiry, immutable turns."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from edgefed.common.errors import ErrorCode, PermanentError, TemporaryError
from edgefed.common.sessions.context import (
    ChatMessage,
    SessionContext,
    SessionLimits,
    is_session_id,
    new_session_id,
    owner_of_key,
    owner_of_token,
)
from edgefed.common.sessions.crypto import FleetKey
from edgefed.common.sessions.errors import (
    SessionConflict,
    SessionError,
    SessionExpired,
    SessionKeyError,
    SessionNotFound,
    SessionTooLarge,
)
from edgefed.common.sessions.wire import SESSION_ID_PATTERN


def make(**overrides: object) -> SessionContext:
    fields: dict[str, object] = {
        "session_id": "s1",
        "owner": "token:7",
        "model": "chat-small",
        "system_prompt": "Be brief.",
        "created_at": 1000.0,
        "expires_at": 1600.0,
        "ttl_s": 600.0,
    }
    fields.update(overrides)
    return SessionContext.model_validate(fields)


def test_errors_carry_the_codes_a_holder_replies_with() -> None:
    assert SessionNotFound("x").code == ErrorCode.NOT_FOUND
    assert SessionExpired("x").code == ErrorCode.GONE
    assert SessionTooLarge("x").code == ErrorCode.TOO_LARGE
    assert SessionConflict("x").code == ErrorCode.CONFLICT
    assert SessionKeyError("x").code == ErrorCode.MALFORMED
    for cls in (SessionNotFound, SessionExpired, SessionTooLarge, SessionKeyError):
        assert issubclass(cls, SessionError)
        assert issubclass(cls, PermanentError)
    assert issubclass(SessionConflict, TemporaryError)
    assert SessionConflict("stale").retryable


def test_size_counts_utf8_bytes_of_prompt_messages_and_metadata() -> None:
    ctx = make(
        system_prompt="é",  # 2 bytes
        messages=[{"role": "user", "content": "日本"}, {"role": "assistant", "content": "ok"}],
        metadata={"a": 1},  # {"a":1} = 7 bytes
    )

    assert ctx.size_bytes() == 2 + 6 + 2 + 7


def test_with_turn_returns_a_new_context_and_leaves_the_original_untouched() -> None:
    ctx = make(metadata={"tags": ["x"]})

    new = ctx.with_turn("hello", "hi there", now=1500.0)
    new.metadata["tags"].append("y")

    assert ctx.messages == []
    assert ctx.version == 0
    assert ctx.expires_at == 1600.0
    assert ctx.metadata == {"tags": ["x"]}
    assert new.version == 1
    assert new.expires_at == 1500.0 + 600.0
    assert new.messages == [
        ChatMessage(role="user", content="hello"),
        ChatMessage(role="assistant", content="hi there"),
    ]
    assert new.with_turn("again", "sure", now=1700.0).version == 2


def test_too_many_messages_raises_naming_the_limit_and_size_and_changes_nothing() -> None:
    ctx = make(limits=SessionLimits(max_messages=4))
    ctx = ctx.with_turn("1", "1", now=1000.0).with_turn("2", "2", now=1000.0)

    with pytest.raises(SessionTooLarge) as info:
        ctx.check_can_add("3")
    with pytest.raises(SessionTooLarge):
        ctx.with_turn("3", "3", now=1000.0)

    assert info.value.limit == "max_messages"
    assert info.value.allowed == 4
    assert info.value.size == 6
    assert "max_messages" in info.value.message
    assert "6 messages" in info.value.message
    assert "s1" in info.value.message
    assert len(ctx.messages) == 4
    assert ctx.version == 2


def test_too_many_bytes_raises_before_the_turn_runs() -> None:
    ctx = make(system_prompt=None, limits=SessionLimits(max_context_bytes=100))
    ctx.check_can_add("x" * 100)  # exactly at the limit: allowed

    with pytest.raises(SessionTooLarge) as info:
        ctx.check_can_add("x" * 60, reserve_bytes=41)

    assert info.value.limit == "max_context_bytes"
    assert info.value.size == 101
    assert "101 bytes" in info.value.message
    assert "max_context_bytes = 100" in info.value.message


def test_with_turn_refuses_an_answer_that_takes_the_context_over_its_bytes() -> None:
    ctx = make(system_prompt=None, limits=SessionLimits(max_context_bytes=10))

    with pytest.raises(SessionTooLarge, match="max_context_bytes"):
        ctx.with_turn("hello", "a long answer", now=1000.0)

    assert ctx.messages == []


def test_check_limits_on_a_context_already_over_its_limit() -> None:
    ctx = make(system_prompt="x" * 50, limits=SessionLimits(max_context_bytes=10))

    with pytest.raises(SessionTooLarge, match="50 bytes"):
        ctx.check_limits()
    make().check_limits()


def test_expiry_names_the_session_and_when_it_expired() -> None:
    ctx = make(expires_at=1600.0)

    assert not ctx.expired(1599.9)
    ctx.check_alive(1599.9)
    assert ctx.expired(1600.0)
    with pytest.raises(SessionExpired) as info:
        ctx.check_alive(1700.0)

    assert "s1" in info.value.message
    assert "1970-01-01 00:26:40 UTC" in info.value.message
    assert "100 s ago" in info.value.message


def test_chat_is_system_prompt_then_history_then_next_message() -> None:
    ctx = make().with_turn("q1", "a1", now=1000.0)

    assert [(m.role, m.content) for m in ctx.chat("q2")] == [
        ("system", "Be brief."),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
    ]
    assert [m.role for m in make(system_prompt=None).chat(None)] == []


def test_summary_describes_the_session_without_its_messages() -> None:
    ctx = make(metadata={"app": "notes"}).with_turn("q", "a", now=1200.0)

    summary = ctx.summary("agent-1")

    assert summary.session_id == "s1"
    assert summary.model == "chat-small"
    assert summary.holder == "agent-1"
    assert summary.version == 1
    assert summary.messages == 2
    assert summary.context_bytes == ctx.size_bytes()
    assert summary.expires_at == 1800.0
    assert summary.metadata == {"app": "notes"}


@pytest.mark.parametrize(
    "overrides",
    [
        {"session_id": "../etc"},
        {"session_id": ""},
        {"session_id": "a/b"},
        {"ttl_s": 0},
        {"version": -1},
        {"metadata": {"x": float("nan")}},
        {"messages": [{"role": "tool", "content": "x"}]},
    ],
)
def test_invalid_contexts_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        make(**overrides)


def test_new_session_ids_are_valid_and_distinct() -> None:
    ids = {new_session_id() for _ in range(1000)}

    assert len(ids) == 1000
    for sid in ids:
        assert re.fullmatch(SESSION_ID_PATTERN, sid)
        assert is_session_id(sid)
        assert len(bytes.fromhex(sid)) == 16
    assert not is_session_id("../x")
    assert not is_session_id("-x")


def test_owners() -> None:
    key = FleetKey.generate()
    other = FleetKey.generate()

    owner = owner_of_key(key.raw, "my secret owner key")

    assert owner == "key:" + key.digest(b"my secret owner key")
    assert owner != owner_of_key(other.raw, "my secret owner key")
    assert owner != owner_of_key(key.raw, "my secret owner kez")
    assert "secret" not in owner
    assert owner_of_token(42) == "token:42"
    with pytest.raises(SessionKeyError, match="32 bytes"):
        owner_of_key(b"short", "x")
