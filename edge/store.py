"""The agent's installed models on disk, and what it remembers about them across restarts.

Layout under the agent's state directory::

    <state_dir>/
      installed.json            what is installed (written atomically: tmp + fsync + rename)
      models/<name>/v<N>/       a verified artifact (manifest.json, manifest.sig, model files)
      staging/<name>/v<N>/      downloads in progress (wiped when the store is opened)

``installed.json`` records per model the **current** version (the one to serve), the
**previous** one (kept on disk for instant rollback), the **highest** version ever activated
(it never goes down: the rollback-protection floor) and the desired-state entry each was
deployed with (role, split point, providers, batching); plus the highest desired-state
**generation** applied (replay protection).

Versions only go up: :meth:`ModelStore.install` refuses anything below the highest version
activated. The highest version itself may be installed again when it is not the current one
(its copy on disk was tampered with and dropped, or it was rolled back while the controller
still asks for it) -- that repairs, it never downgrades. :meth:`ModelStore.floor` is the lowest
*new* version.

A corrupted ``installed.json`` is moved aside (``installed.json.corrupt-<time>``), logged as an
error and treated as empty, so the agent keeps running; the floors are then recovered from the
version folders still on disk (a conservative guess: never lower than what was installed), and
those folders are removed because nothing says which of them is sound.

The store is synchronous (small files, renames); callers on an event loop run the heavier
calls (:meth:`install`, :meth:`activate`, :meth:`rollback`) in a thread. A lock makes it safe to
call from several threads.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefed.common.artifact import Manifest
from edgefed.common.errors import ArtifactRejected, RejectReason
from edgefed.common.schemas import DesiredModel
from edgefed.common.topics import ID_PATTERN
from edgefed.edge.errors import AgentError

log = logging.getLogger(__name__)

INSTALLED_NAME = "installed.json"
MODELS_DIR = "models"
STAGING_DIR = "staging"
STORE_FORMAT = 1

_NAME = re.compile(ID_PATTERN)
_VERSION_DIR = re.compile(r"^v([1-9][0-9]{0,17})$")


class StoreError(AgentError):
    """The model store was asked for something it cannot do (unknown model or version, no
    previous version to roll back to, a name that is not a valid identifier)."""


class InstalledModel(BaseModel):
    """What the store remembers about one model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    current: int | None = None
    """Version to serve; None when no sound copy is installed (only the floor is known)."""
    previous: int | None = None
    """Version kept on disk for instant rollback."""
    highest: int = Field(ge=0)
    """Highest version ever activated: nothing lower is ever installed again."""
    enabled: bool = True
    """False when the desired state no longer lists the model (files kept, not served)."""
    settings: DesiredModel | None = None
    """The desired-state entry the current version was deployed with."""
    previous_settings: DesiredModel | None = None
    """The desired-state entry the previous version was deployed with."""

    @property
    def floor(self) -> int:
        """The lowest new version this model accepts."""
        return self.highest + 1


class _StoreFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: int = STORE_FORMAT
    generation: int = Field(default=0, ge=0)
    generation_digest: str | None = None
    models: dict[str, InstalledModel] = Field(default_factory=dict)


class ModelStore:
    """Installed models under ``<state_dir>/models`` and their record ``installed.json``.

    Opening the store wipes ``staging/`` and removes version folders that the record does not
    reference (left by a crash between :meth:`install` and :meth:`activate`).
    """

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self.models_dir = self.state_dir / MODELS_DIR
        self.staging_root = self.state_dir / STAGING_DIR
        self._record_path = self.state_dir / INSTALLED_NAME
        self._lock = threading.RLock()
        self._pending: dict[tuple[str, int], DesiredModel] = {}
        for directory in (self.state_dir, self.models_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._wipe(self.staging_root)
        self.staging_root.mkdir(mode=0o700, exist_ok=True)
        self._data = self._load()
        self._remove_unreferenced()

    # ------------------------------------------------------------------ queries

    @property
    def generation(self) -> int:
        """The highest desired-state generation applied (0: none yet)."""
        with self._lock:
            return self._data.generation

    @property
    def generation_digest(self) -> str | None:
        """Digest of the desired state recorded with :attr:`generation`, when one was given."""
        with self._lock:
            return self._data.generation_digest

    def get(self, name: str) -> InstalledModel | None:
        """The record of ``name`` (also for a model with only a floor left), or None."""
        with self._lock:
            return self._data.models.get(name)

    def current(self, name: str) -> int | None:
        """The version of ``name`` to serve, or None when none is installed."""
        record = self.get(name)
        return record.current if record is not None else None

    def installed(self) -> list[InstalledModel]:
        """Every model with a current version, sorted by name."""
        with self._lock:
            return [m for _, m in sorted(self._data.models.items()) if m.current is not None]

    def floor(self, name: str) -> int:
        """The lowest *new* version of ``name`` accepted: highest activated + 1 (1 if none)."""
        record = self.get(name)
        return record.floor if record is not None else 1

    def highest(self, name: str) -> int:
        """The highest version of ``name`` ever activated (0 if none)."""
        record = self.get(name)
        return record.highest if record is not None else 0

    def path(self, name: str, version: int) -> Path:
        """Where version ``version`` of ``name`` lives (whether or not it is installed)."""
        _check_name(name)
        _check_version(version)
        return self.models_dir / name / f"v{version}"

    def staging_dir(self, name: str, version: int) -> Path:
        """A folder to download version ``version`` of ``name`` into (created; kept across
        attempts so a download can resume; wiped when the store is opened)."""
        _check_name(name)
        _check_version(version)
        path = self.staging_root / name / f"v{version}"
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    # ------------------------------------------------------------------ changes

    def install(self, staged_dir: Path, manifest: Manifest, desired: DesiredModel) -> Path:
        """Move a verified artifact into place and return its folder; :meth:`activate` then
        makes it the current version.

        Installing the current version again is a no-op (the staged folder is removed). A
        version below the highest one activated raises :class:`ArtifactRejected`
        (``VERSION_TOO_LOW``). The move is a rename within the state directory, so a crash
        leaves either no folder or a complete one.
        """
        name, version = manifest.name, manifest.version
        if desired.name != name or desired.version != version:
            raise StoreError(
                f"the artifact is {name} v{version} but the desired entry is "
                f"{desired.name} v{desired.version}"
            )
        with self._lock:
            record = self._data.models.get(name)
            if record is not None and record.current == version:
                log.info("%s v%d is already installed", name, version)
                self._remove_staged(staged_dir)
                return self.path(name, version)
            if record is not None and version < record.highest:
                raise ArtifactRejected(
                    RejectReason.VERSION_TOO_LOW,
                    f"{name} v{version} is lower than v{record.highest}, already installed "
                    "(versions only go up)",
                )
            dest = self.path(name, version)
            dest.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if os.path.lexists(dest):
                log.warning("replacing a leftover folder %s", dest)
                self._wipe(dest)
            _move_dir(Path(staged_dir), dest)
            self._pending[(name, version)] = desired
            log.info("installed %s v%d into %s", name, version, dest)
            return dest

    def activate(self, name: str, version: int) -> None:
        """Make ``version`` (installed by :meth:`install`, or the previous version) the current
        one; the old current becomes the previous; older folders are deleted."""
        with self._lock:
            record = self._data.models.get(name)
            if record is not None and record.current == version:
                return
            pending = self._pending.get((name, version))
            if pending is not None:
                settings = pending
            elif record is not None and record.previous == version:
                if record.previous_settings is None:
                    raise StoreError(f"{name} v{version} has no recorded settings")
                settings = record.previous_settings
            else:
                raise StoreError(f"{name} v{version} was not installed")
            if not self.path(name, version).is_dir():
                raise StoreError(f"{name} v{version} is not on disk")
            if record is not None and version < record.highest and pending is not None:
                raise ArtifactRejected(
                    RejectReason.VERSION_TOO_LOW,
                    f"{name} v{version} is lower than v{record.highest} (versions only go up)",
                )
            new = InstalledModel(
                name=name,
                current=version,
                previous=record.current if record is not None else None,
                highest=max(version, record.highest if record is not None else 0),
                enabled=True,
                settings=settings,
                previous_settings=record.settings if record is not None else None,
            )
            self._data.models[name] = new
            self._save()
            self._pending.pop((name, version), None)
            self._prune(new)
            log.info("activated %s v%d (previous: %s)", name, version, new.previous)

    def rollback(self, name: str) -> int:
        """Make the previous version current again and return it. The version rolled back from
        is deleted; the floor stays where it was (it will not be installed as a *new* version).
        Raises :class:`StoreError` when there is no previous version."""
        with self._lock:
            record = self._require(name)
            previous = record.previous
            if record.current is None or previous is None:
                raise StoreError(f"{name} has no previous version to roll back to")
            self._drop_current(record)
            return previous

    def drop(self, name: str, version: int) -> int | None:
        """Forget ``version`` of ``name`` and delete its folder (e.g. it was found tampered with).

        When it is the current version the previous one becomes current (None when there is
        none; the floor is kept). Returns the current version afterwards. Dropping a version
        that was installed but never activated just deletes its folder.
        """
        with self._lock:
            self._pending.pop((name, version), None)
            record = self._data.models.get(name)
            if record is None or version not in (record.current, record.previous):
                self._wipe(self.path(name, version))
                return record.current if record is not None else None
            if version == record.current:
                return self._drop_current(record)
            self._data.models[name] = record.model_copy(
                update={"previous": None, "previous_settings": None}
            )
            self._save()
            self._wipe(self.path(name, version))
            return record.current

    def discard(self, name: str, version: int) -> None:
        """Delete the folder of a version installed but never activated (a failed load); the
        current and previous versions are never touched."""
        with self._lock:
            self._pending.pop((name, version), None)
            record = self._data.models.get(name)
            if record is not None and version in (record.current, record.previous):
                return
            self._wipe(self.path(name, version))

    def clear_staging(self, name: str, version: int) -> None:
        """Delete the staging folder of ``name`` v``version`` (a download that will not resume)."""
        _check_name(name)
        _check_version(version)
        self._wipe(self.staging_root / name / f"v{version}")

    def update_settings(self, desired: DesiredModel) -> None:
        """Record new settings (batching, providers) for the current version of a model."""
        with self._lock:
            record = self._require(desired.name)
            if record.current != desired.version:
                raise StoreError(f"{desired.name} v{desired.version} is not the current version")
            if record.settings != desired:
                self._data.models[desired.name] = record.model_copy(update={"settings": desired})
                self._save()

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Mark a model as (not) wanted; a disabled model is not restored at start."""
        with self._lock:
            record = self._data.models.get(name)
            if record is not None and record.enabled != enabled:
                self._data.models[name] = record.model_copy(update={"enabled": enabled})
                self._save()

    def record_generation(self, generation: int, *, digest: str | None = None) -> None:
        """Remember that desired-state ``generation`` was applied (it never goes down)."""
        with self._lock:
            if generation < self._data.generation:
                log.warning(
                    "not recording generation %d: %d is already recorded",
                    generation,
                    self._data.generation,
                )
                return
            self._data.generation = generation
            self._data.generation_digest = digest
            try:
                self._save()
            except OSError as exc:  # a full disk must not stop the agent serving
                # Kept in memory and written with the next change; a restart before then
                # applies this generation again, which installs nothing new.
                log.warning("cannot record generation %d on disk: %s", generation, exc)

    # ------------------------------------------------------------------ internals

    def _require(self, name: str) -> InstalledModel:
        record = self._data.models.get(name)
        if record is None:
            raise StoreError(f"no model {name!r} is installed")
        return record

    def _drop_current(self, record: InstalledModel) -> int | None:
        dropped = record.current
        self._data.models[record.name] = record.model_copy(
            update={
                "current": record.previous,
                "settings": record.previous_settings,
                "previous": None,
                "previous_settings": None,
            }
        )
        self._save()
        if dropped is not None:
            self._wipe(self.path(record.name, dropped))
        log.warning(
            "%s: dropped v%s, now at %s",
            record.name,
            dropped,
            f"v{record.previous}" if record.previous is not None else "no version",
        )
        return record.previous

    def _load(self) -> _StoreFile:
        try:
            raw = self._record_path.read_bytes()
        except FileNotFoundError:
            return _StoreFile()
        except OSError as exc:
            log.error("cannot read %s (%s): starting with an empty store", self._record_path, exc)
            return self._recovered()
        try:
            data = _StoreFile.model_validate_json(raw)
            if data.format != STORE_FORMAT:
                raise ValueError(f"unknown format {data.format}")
            for name, record in data.models.items():
                _check_name(name)
                if record.name != name:
                    raise ValueError(f"entry {name!r} names {record.name!r}")
        except (ValidationError, ValueError, StoreError) as exc:
            aside = self._record_path.with_name(
                f"{INSTALLED_NAME}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
            )
            with contextlib.suppress(OSError):
                os.replace(self._record_path, aside)
            log.error(
                "%s is corrupted (%s); moved it to %s and starting with an empty store",
                self._record_path,
                str(exc).splitlines()[0],
                aside.name,
            )
            return self._recovered()
        return data

    def _recovered(self) -> _StoreFile:
        """An empty record keeping, as floors, the highest version folder of each model."""
        data = _StoreFile()
        for name, versions in self._folders().items():
            if versions:
                data.models[name] = InstalledModel(name=name, highest=max(versions))
                log.warning("%s: rollback floor recovered from disk: v%d", name, max(versions))
        if data.models:
            self._data = data
            self._save()
        return data

    def _folders(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        try:
            entries = list(os.scandir(self.models_dir))
        except OSError:
            return found
        for entry in entries:
            if not _NAME.match(entry.name) or not entry.is_dir(follow_symlinks=False):
                continue
            versions = found.setdefault(entry.name, [])
            with contextlib.suppress(OSError), os.scandir(entry.path) as children:
                for child in children:
                    match = _VERSION_DIR.match(child.name)
                    if match and child.is_dir(follow_symlinks=False):
                        versions.append(int(match.group(1)))
        return found

    def _remove_unreferenced(self) -> None:
        try:
            entries = list(os.scandir(self.models_dir))
        except OSError as exc:
            log.error("cannot list %s: %s", self.models_dir, exc)
            return
        for entry in entries:
            record = self._data.models.get(entry.name)
            if record is None or not entry.is_dir(follow_symlinks=False):
                log.warning("removing %s: not an installed model", entry.path)
                self._wipe(Path(entry.path))
                continue
            self._prune(record)

    def _prune(self, record: InstalledModel) -> None:
        """Delete everything in the model's folder but its current and previous versions."""
        keep = {f"v{v}" for v in (record.current, record.previous) if v is not None}
        folder = self.models_dir / record.name
        try:
            children = list(os.scandir(folder))
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot list %s: %s", folder, exc)
            return
        for child in children:
            if child.name not in keep:
                log.info("deleting %s", child.path)
                self._wipe(Path(child.path))

    def _remove_staged(self, staged_dir: Path) -> None:
        with contextlib.suppress(ValueError):
            Path(staged_dir).resolve().relative_to(self.staging_root.resolve())
            self._wipe(Path(staged_dir))

    def _save(self) -> None:
        data = (self._data.model_dump_json(indent=2) + "\n").encode()
        tmp = self._record_path.with_name(f".{INSTALLED_NAME}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._record_path)
            _fsync_dir(self.state_dir)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    @staticmethod
    def _wipe(path: Path) -> None:
        """Remove a file, link or folder tree (links are never followed); log failures."""
        try:
            if path.is_symlink() or not path.is_dir():
                path.unlink(missing_ok=True)
            else:
                shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove %s: %s", path, exc)


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise StoreError(f"{name!r} is not a valid model name")


def _check_version(version: int) -> None:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise StoreError(f"{version!r} is not a valid model version")


def _move_dir(src: Path, dest: Path) -> None:
    """Rename ``src`` to ``dest`` (copying first when they are on different file systems)."""
    try:
        os.rename(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
        shutil.copytree(src, tmp, symlinks=True)
        os.rename(tmp, dest)
        shutil.rmtree(src, ignore_errors=True)
    _fsync_dir(dest.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
