"""A holder's sessions at rest: one encrypted file per session.

Each session lives in ``<directory>/<session_id>.session``, a record sealed with the fleet key
(:mod:`.crypto`). A save writes a temporary file (mode 0600), flushes it to disk and renames it
over the old record, so a crash at any point leaves the previous record or the new one, never a
mix; temporary files a crash leaves behind are removed when the store is opened. Records that do
not open (another key, damaged) are set aside as ``*.bad`` files by :meth:`SessionStore.load_all`
rather than deleted, so a misconfigured key loses nothing.

One store (one process) per directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import threading
from pathlib import Path

from edgefed.common.errors import PayloadError
from edgefed.common.sessions.context import SessionContext, is_session_id
from edgefed.common.sessions.crypto import FleetKey
from edgefed.common.sessions.errors import SessionConflict, SessionKeyError, SessionStoreError

__all__ = ["RECORD_SUFFIX", "SessionStore"]

log = logging.getLogger(__name__)

RECORD_SUFFIX = ".session"
_TMP_SUFFIX = ".tmp"
_BAD_SUFFIX = ".bad"


class SessionStore:
    """The sessions a holder keeps, encrypted on disk under ``directory``."""

    def __init__(self, directory: Path, key: FleetKey, fleet: str) -> None:
        self.directory = Path(directory)
        self.key = key
        self.fleet = fleet
        self._lock = threading.RLock()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SessionStoreError(
                f"cannot create the session directory {self.directory}: {exc}"
            ) from exc
        self._remove_leftovers()

    # ------------------------------------------------------------------------ paths

    def _path(self, session_id: str) -> Path:
        if not is_session_id(session_id):
            raise PayloadError(f"{session_id!r} is not a session id")
        path = self.directory / f"{session_id}{RECORD_SUFFIX}"
        if path.parent != self.directory:  # pragma: no cover - the pattern allows no '/'
            raise PayloadError(f"{session_id!r} is not a session id")
        return path

    def _matching(self, pattern: str) -> list[Path]:
        regex = re.compile(pattern)
        try:
            return [p for p in self.directory.iterdir() if regex.fullmatch(p.name)]
        except OSError:
            return []

    def _tmp_files(self, session_id: str | None = None) -> list[Path]:
        """Temporary files of interrupted saves (of one session, or of all)."""
        name = re.escape(session_id) if session_id is not None else ".+"
        suffix = re.escape(RECORD_SUFFIX)
        return self._matching(rf"\.{name}{suffix}\.[0-9a-f]+{re.escape(_TMP_SUFFIX)}")

    def _bad_files(self, session_id: str) -> list[Path]:
        """Records of the session set aside because they did not open."""
        name = re.escape(session_id + RECORD_SUFFIX)
        return self._matching(rf"{name}\.[0-9a-f]+{re.escape(_BAD_SUFFIX)}")

    def _remove_leftovers(self) -> None:
        for tmp in self._tmp_files():
            log.info("removing %s, left by an interrupted save", tmp)
            with contextlib.suppress(OSError):
                tmp.unlink()

    # ------------------------------------------------------------------------ reading

    def ids(self) -> list[str]:
        """The ids of the sessions on disk (sorted)."""
        try:
            names = [p.name for p in self.directory.iterdir()]
        except OSError as exc:
            raise SessionStoreError(
                f"cannot list the session directory {self.directory}: {exc}"
            ) from exc
        found = (n[: -len(RECORD_SUFFIX)] for n in names if n.endswith(RECORD_SUFFIX))
        return sorted(sid for sid in found if is_session_id(sid))

    def _read(self, session_id: str) -> bytes | None:
        try:
            return self._path(session_id).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SessionStoreError(f"cannot read session {session_id}'s record: {exc}") from exc

    def load(self, session_id: str) -> SessionContext | None:
        """The session, ``None`` if there is no record of it (or ``session_id`` is no valid
        id). Raises :class:`SessionKeyError` if its record does not open."""
        if not is_session_id(session_id):
            return None
        record = self._read(session_id)
        if record is None:
            return None
        return self.key.open_context(self.fleet, session_id, record)

    def load_all(self, now: float) -> list[SessionContext]:
        """Every session on disk that has not expired at ``now``. A record that does not open
        is logged and set aside (renamed ``<id>.session.<random>.bad``), never deleted."""
        contexts: list[SessionContext] = []
        for sid in self.ids():
            try:
                ctx = self.load(sid)
            except SessionKeyError as exc:
                self._quarantine(sid, exc)
                continue
            except SessionStoreError as exc:
                log.warning("skipping session %s: %s", sid, exc.message)
                continue
            if ctx is not None and not ctx.expired(now):
                contexts.append(ctx)
        return contexts

    def _quarantine(self, session_id: str, why: SessionKeyError) -> Path | None:
        with self._lock:
            path = self._path(session_id)
            bad = path.with_name(f"{path.name}.{secrets.token_hex(4)}{_BAD_SUFFIX}")
            try:
                os.replace(path, bad)
            except FileNotFoundError:
                return None
            except OSError as exc:
                log.error("session %s does not open and cannot be set aside: %s", session_id, exc)
                return None
            log.warning("session %s set aside as %s: %s", session_id, bad, why.message)
            return bad

    # ------------------------------------------------------------------------ writing

    def save(self, ctx: SessionContext) -> None:
        """Write ``ctx`` atomically. Raises :class:`SessionConflict` (and writes nothing) if the
        record on disk has a higher version; :class:`SessionStoreError` if the write fails (the
        previous record is then still there)."""
        path = self._path(ctx.session_id)
        record = self.key.seal_context(self.fleet, ctx)
        with self._lock:
            try:
                current = self.load(ctx.session_id)
            except SessionKeyError as exc:
                self._quarantine(ctx.session_id, exc)
                current = None
            if current is not None and current.version > ctx.version:
                raise SessionConflict(
                    f"session {ctx.session_id}: version {ctx.version} is older than the stored "
                    f"version {current.version}; nothing was written (re-read it, then retry)"
                )
            self._write(path, record)

    def _write(self, path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._sync_directory()
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise SessionStoreError(
                f"cannot write {path.name} in {self.directory}: {exc} (the previous record, if "
                "any, is unchanged)"
            ) from exc

    def _sync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete(self, session_id: str) -> bool:
        """Remove the session's record (and any leftovers of a save or quarantined copies).
        ``True`` if a record was removed."""
        if not is_session_id(session_id):
            return False
        path = self._path(session_id)
        with self._lock:
            try:
                path.unlink()
                removed = True
            except FileNotFoundError:
                removed = False
            except OSError as exc:
                raise SessionStoreError(f"cannot delete session {session_id}: {exc}") from exc
            extra = self._tmp_files(session_id) + self._bad_files(session_id)
            for leftover in extra:
                with contextlib.suppress(OSError):
                    leftover.unlink()
            if removed or extra:
                with contextlib.suppress(OSError):
                    self._sync_directory()
            return removed

    def purge_expired(self, now: float) -> list[str]:
        """Delete the sessions expired at ``now``; their ids. Records that do not open are left
        for :meth:`load_all` to set aside."""
        purged: list[str] = []
        for sid in self.ids():
            try:
                ctx = self.load(sid)
            except (SessionKeyError, SessionStoreError):
                continue
            if ctx is not None and ctx.expired(now) and self.delete(sid):
                purged.append(sid)
        if purged:
            log.info("purged %d expired sessions", len(purged))
        return purged
