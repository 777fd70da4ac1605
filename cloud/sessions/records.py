"""The ``sessions`` table, read and written in short transactions (blocking: call from a thread).

Rows are handed out as frozen :class:`Row` snapshots. Every write that depends on what the row
holds reads it in the same transaction (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite write
transactions take the database's write lock at ``BEGIN``), so replicas, turns, expiry and
deletes arriving at the same time never undo each other: a context is only ever replaced by a
newer version, and an ended session never comes back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from edgefed.cloud.registry.db import as_utc, session_scope
from edgefed.cloud.registry.models import SessionRecord, SessionState
from edgefed.common.sessions.context import SessionContext

__all__ = ["Owed", "Row", "SessionTable"]


def _ts(value: datetime | None) -> float | None:
    stamp = as_utc(value)
    return stamp.timestamp() if stamp is not None else None


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


@dataclass(frozen=True, slots=True)
class Row:
    """One session as the registry holds it."""

    id: str
    owner: str
    model: str
    holder: str | None
    version: int
    state: SessionState
    created_at: float
    expires_at: float
    ended_at: float | None
    context: bytes | None
    context_bytes: int
    messages: int
    pending_deletes: tuple[str, ...]
    last_handoff: dict[str, Any] | None
    handoffs: int

    @property
    def active(self) -> bool:
        return self.state is SessionState.ACTIVE

    @classmethod
    def of(cls, r: SessionRecord) -> Row:
        return cls(
            id=r.id,
            owner=r.owner,
            model=r.model,
            holder=r.holder,
            version=r.version,
            state=SessionState(r.state),
            created_at=_ts(r.created_at) or 0.0,
            expires_at=_ts(r.expires_at) or 0.0,
            ended_at=_ts(r.ended_at),
            context=r.context,
            context_bytes=r.context_bytes,
            messages=r.messages,
            pending_deletes=tuple(r.pending_deletes or ()),
            last_handoff=r.last_handoff,
            handoffs=r.handoffs,
        )


@dataclass(frozen=True, slots=True)
class Owed:
    """A session whose copies on ``pending_deletes`` are still to be deleted."""

    id: str
    owner: str
    state: SessionState
    holder: str | None
    pending_deletes: tuple[str, ...]

    @property
    def active(self) -> bool:
        return self.state is SessionState.ACTIVE


def _with(pending: Iterable[str], add: Iterable[str] = (), drop: Iterable[str] = ()) -> list[str]:
    out = [p for p in pending if p not in set(drop)]
    for agent in add:
        if agent not in out and agent not in set(drop):
            out.append(agent)
    return out


class SessionTable:
    """Reads and writes of the ``sessions`` table."""

    def __init__(self, write: sessionmaker[Session], read: sessionmaker[Session] | None = None):
        self._write = write
        self._read = read or write

    def _locked(self, session: Session, session_id: str) -> SessionRecord | None:
        return session.scalars(
            select(SessionRecord).where(SessionRecord.id == session_id).with_for_update()
        ).first()

    # ------------------------------------------------------------------ reads

    def get(self, session_id: str) -> Row | None:
        with session_scope(self._read) as session:
            r = session.get(SessionRecord, session_id)
            return Row.of(r) if r is not None else None

    def of_owner(self, owner: str) -> list[Row]:
        with session_scope(self._read) as session:
            rows = session.scalars(
                select(SessionRecord)
                .where(SessionRecord.owner == owner, SessionRecord.state == SessionState.ACTIVE)
                .order_by(SessionRecord.created_at, SessionRecord.id)
            ).all()
            return [Row.of(r) for r in rows]

    def count_active(self, owner: str) -> int:
        return len(self.of_owner(owner))

    def due_to_expire(self, now: float) -> list[str]:
        with session_scope(self._read) as session:
            return list(
                session.scalars(
                    select(SessionRecord.id).where(
                        SessionRecord.state == SessionState.ACTIVE,
                        SessionRecord.expires_at <= _dt(now),
                    )
                ).all()
            )

    def owing_deletes(self) -> list[Owed]:
        """Sessions with holders that may still keep a copy they must delete (previous holders
        of moved sessions, every holder of ended ones). Reads no context."""
        with session_scope(self._read) as session:
            rows = session.execute(
                select(
                    SessionRecord.id,
                    SessionRecord.owner,
                    SessionRecord.state,
                    SessionRecord.holder,
                    SessionRecord.pending_deletes,
                )
            ).all()
            return [
                Owed(r.id, r.owner, SessionState(r.state), r.holder, tuple(r.pending_deletes))
                for r in rows
                if r.pending_deletes
            ]

    # ------------------------------------------------------------------ writes

    def insert(self, ctx: SessionContext, record: bytes, *, holder: str | None = None) -> Row:
        with session_scope(self._write) as session:
            r = SessionRecord(
                id=ctx.session_id,
                owner=ctx.owner,
                model=ctx.model,
                holder=holder,
                version=ctx.version,
                state=SessionState.ACTIVE,
                created_at=_dt(ctx.created_at),
                expires_at=_dt(ctx.expires_at),
                context=record,
                context_bytes=ctx.size_bytes(),
                messages=len(ctx.messages),
                pending_deletes=[],
                handoffs=0,
            )
            session.add(r)
            session.flush()
            return Row.of(r)

    def store_context(
        self,
        ctx: SessionContext,
        record: bytes,
        *,
        holder: str | None = None,
        set_holder: bool = False,
    ) -> tuple[Row | None, bool]:
        """Keep ``record`` (the sealed ``ctx``) if it is newer than the stored copy of an
        active session; ``set_holder`` also makes ``holder`` the session's holder (only when it
        has none, unless the context was newer). Returns (the row, whether it changed)."""
        with session_scope(self._write) as session:
            r = self._locked(session, ctx.session_id)
            if r is None or r.state != SessionState.ACTIVE or r.owner != ctx.owner:
                return (Row.of(r) if r is not None else None), False
            changed = False
            if ctx.version > r.version or r.context is None:
                r.version = ctx.version
                r.context = record
                r.context_bytes = ctx.size_bytes()
                r.messages = len(ctx.messages)
                r.expires_at = _dt(ctx.expires_at)
                changed = True
                if set_holder and holder is not None:
                    r.holder = holder
                    r.pending_deletes = _with(r.pending_deletes or [], drop=[holder])
            elif set_holder and holder is not None and r.holder is None:
                r.holder = holder
                changed = True
            session.flush()
            return Row.of(r), changed

    def moved(
        self,
        session_id: str,
        *,
        holder: str,
        handoff: dict[str, Any],
        stale: Iterable[str] = (),
    ) -> Row | None:
        """The session now lives on ``holder``; ``stale`` holders may still keep a copy."""
        with session_scope(self._write) as session:
            r = self._locked(session, session_id)
            if r is None or r.state != SessionState.ACTIVE:
                return Row.of(r) if r is not None else None
            r.holder = holder
            r.last_handoff = handoff
            r.handoffs = r.handoffs + 1
            r.pending_deletes = _with(r.pending_deletes or [], add=stale, drop=[holder])
            session.flush()
            return Row.of(r)

    def set_holder(self, session_id: str, holder: str | None, *, only_if: str | None) -> bool:
        """Set the holder if it is ``only_if`` now (a holder that dropped its copy)."""
        with session_scope(self._write) as session:
            r = self._locked(session, session_id)
            if r is None or r.state != SessionState.ACTIVE or r.holder != only_if:
                return False
            r.holder = holder
            return True

    def end(self, session_id: str, state: SessionState, now: float) -> Row | None:
        """Mark the session ended (expired or deleted): context wiped, every holder it had owes
        a delete. Returns the row as it was before (None: unknown or already ended)."""
        with session_scope(self._write) as session:
            r = self._locked(session, session_id)
            if r is None or r.state != SessionState.ACTIVE:
                return None
            before = Row.of(r)
            holders = [r.holder] if r.holder else []
            r.state = state
            r.ended_at = _dt(now)
            r.context = None
            r.context_bytes = 0
            r.messages = 0
            r.pending_deletes = _with(r.pending_deletes or [], add=holders)
            r.holder = None
            return before

    def owe_delete(self, session_id: str, agent: str) -> None:
        with session_scope(self._write) as session:
            r = self._locked(session, session_id)
            if r is None or (r.state == SessionState.ACTIVE and r.holder == agent):
                return
            if agent not in (r.pending_deletes or []):
                r.pending_deletes = _with(r.pending_deletes or [], add=[agent])

    def deleted_on(self, session_id: str, agent: str) -> None:
        """``agent`` confirmed it keeps no copy any more."""
        with session_scope(self._write) as session:
            r = self._locked(session, session_id)
            if r is not None and agent in (r.pending_deletes or []):
                r.pending_deletes = _with(r.pending_deletes or [], drop=[agent])

    def purge_tombstones(self, older_than: float) -> int:
        """Forget ended sessions that ended before ``older_than`` and owe no delete."""
        with session_scope(self._write) as session:
            ids = [
                r.id
                for r in session.scalars(
                    select(SessionRecord).where(
                        SessionRecord.state != SessionState.ACTIVE,
                        SessionRecord.ended_at < _dt(older_than),
                    )
                ).all()
                if not r.pending_deletes
            ]
            if ids:
                session.execute(delete(SessionRecord).where(SessionRecord.id.in_(ids)))
            return len(ids)
