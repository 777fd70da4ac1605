"""File-system access for artifacts, relative to an open directory descriptor.

Every open below the artifact root uses ``O_NOFOLLOW`` (and ``O_DIRECTORY`` for folders) relative
to its parent's descriptor, so no symbolic link is ever followed, even when the tree changes
while it is being read. Problems are raised as :class:`ArtifactRejected`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from edgefed.common.artifact.manifest import RESERVED_NAMES
from edgefed.common.errors import ArtifactRejected, RejectReason

CHUNK_BYTES = 1024 * 1024
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def open_root(directory: Path) -> int:
    """Open the artifact directory itself (a symbolic link *to* it is fine; none inside is)."""
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        why = (
            "is not a directory"
            if exc.errno in (errno.ENOENT, errno.ENOTDIR)
            else "cannot be opened"
        )
        raise ArtifactRejected(
            RejectReason.NOT_A_DIRECTORY, f"{str(directory)!r} {why} ({exc.strerror})"
        ) from exc


@dataclass(frozen=True, slots=True)
class Scan:
    """Regular files found below the root (path -> size), without the manifest and signature."""

    files: dict[str, int]
    complete: bool
    """False when the scan stopped early because it found more than ``stop_after`` files."""


def scan(root_fd: int, *, stop_after: int | None = None) -> Scan:
    """Find every regular file below ``root_fd``; reject symbolic links and special files."""
    files: dict[str, int] = {}
    stack: list[tuple[str, int]] = [("", os.dup(root_fd))]
    try:
        while stack:
            prefix, fd = stack.pop()
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        rel = prefix + entry.name
                        if not prefix and entry.name in RESERVED_NAMES:
                            continue
                        try:
                            if entry.is_symlink():
                                raise ArtifactRejected(
                                    RejectReason.UNSAFE_PATH, f"{rel!r} is a symbolic link"
                                )
                            if entry.is_dir(follow_symlinks=False):
                                stack.append((rel + "/", _open_dir_at(fd, entry.name, rel)))
                            elif entry.is_file(follow_symlinks=False):
                                files[rel] = entry.stat(follow_symlinks=False).st_size
                                if stop_after is not None and len(files) > stop_after:
                                    return Scan(files, complete=False)
                            else:
                                raise ArtifactRejected(
                                    RejectReason.UNSAFE_PATH,
                                    f"{rel!r} is not a regular file or directory",
                                )
                        except OSError as exc:
                            raise ArtifactRejected(
                                RejectReason.UNSAFE_PATH,
                                f"{rel!r} changed while being listed ({exc.strerror})",
                            ) from exc
            except OSError as exc:
                raise ArtifactRejected(
                    RejectReason.UNSAFE_PATH,
                    f"{(prefix or './')!r} cannot be listed ({exc.strerror})",
                ) from exc
            finally:
                os.close(fd)
    finally:
        for _, fd in stack:
            os.close(fd)
    return Scan(files, complete=True)


def _open_dir_at(parent_fd: int, name: str, rel: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise ArtifactRejected(
            RejectReason.UNSAFE_PATH,
            f"{rel!r} is not a plain directory ({exc.strerror})",
        ) from exc


def open_file(root_fd: int, rel: str, *, missing: RejectReason = RejectReason.MISSING_FILE) -> int:
    """Open the regular file ``rel`` (a safe relative path) read-only without following links.

    ``missing`` is the reason given when the file does not exist or is not a regular file.
    """
    parts = rel.split("/")
    opened: list[int] = []
    fd = root_fd
    try:
        for part in parts[:-1]:
            fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            opened.append(fd)
        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ArtifactRejected(
                RejectReason.UNSAFE_PATH, f"{rel!r} goes through a symbolic link"
            ) from exc
        what = (
            "does not exist" if exc.errno in (errno.ENOENT, errno.ENOTDIR) else "cannot be opened"
        )
        raise ArtifactRejected(missing, f"{rel!r} {what} ({exc.strerror})") from exc
    finally:
        for d in opened:
            os.close(d)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ArtifactRejected(missing, f"{rel!r} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_limited(fd: int, limit: int) -> bytes:
    """Read at most ``limit`` bytes from ``fd`` (a caller passes its maximum plus one)."""
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = os.read(fd, min(CHUNK_BYTES, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def hash_fd(fd: int, size: int) -> tuple[str, int]:
    """SHA-256 (hex) of the first ``size`` bytes and how many bytes there were, reading at most
    ``size + 1`` bytes: a count above ``size`` means the file is longer than expected."""
    digest = hashlib.sha256()
    total = 0
    limit = size + 1
    while total < limit:
        chunk = os.read(fd, min(CHUNK_BYTES, limit - total))
        if not chunk:
            break
        total += len(chunk)
        digest.update(chunk)
    return digest.hexdigest(), total


def write_all_and_sync(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` and flush it to the disk."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def write_atomic(root_fd: int, name: str, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``name`` in the directory ``root_fd`` with ``data`` atomically and durably."""
    tmp = f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=root_fd)
    try:
        try:
            write_all_and_sync(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=root_fd, dst_dir_fd=root_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=root_fd)
        raise
    os.fsync(root_fd)
