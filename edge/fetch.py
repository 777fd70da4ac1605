"""Downloading a signed model artifact from the controller, resumably and within limits.

The download contract (``tests/edge/controller_stub.py`` speaks it until the controller lands):
an artifact lives at a base URL; ``GET {url}/manifest.json``, ``GET {url}/manifest.sig`` and
``GET {url}/{file path}`` for every file the manifest lists, each with
``Authorization: Bearer <agent token>``; a server that supports ``Range: bytes=N-`` answers 206
and a download cut part-way resumes where it stopped.

Order of checks (:func:`fetch_artifact`): the manifest and its signature are fetched first
(each capped in size), the manifest's SHA-256 is compared with the one the desired state
names, and :func:`~edgefed.common.artifact.verify_manifest` checks signer, signature, version
and declared sizes -- an untrusted, replayed or oversized artifact costs two small requests and
no model byte. Then each file is streamed to disk, never past its declared size, and
:func:`~edgefed.common.artifact.verify` checks the finished folder.

Errors: :class:`~edgefed.common.errors.ArtifactRejected` (permanent, with its reason) for
anything wrong with the artifact; :class:`ArtifactAccessDenied` (401/403) and
:class:`ArtifactNotFound` (404), permanent; :class:`~edgefed.edge.errors.FetchError`
(temporary) for network failures and server errors after a few retries -- the partial files
stay, so the next call resumes; :class:`StagingWriteError` (temporary) when the disk refuses
a write (full, read-only).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import logging
import os
import random
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx

from edgefed.common.artifact import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    VerifyKey,
    unsafe_path_problem,
    verify,
    verify_manifest,
)
from edgefed.common.artifact.signing import MAX_SIGNATURE_FILE_BYTES
from edgefed.common.errors import ArtifactRejected, RejectReason, TemporaryError
from edgefed.common.settings import ArtifactSettings
from edgefed.edge.errors import AgentError, FetchError

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""``on_progress(bytes_done, bytes_total)`` over all files of an artifact."""

DEFAULT_RETRIES = 4
DEFAULT_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY


class ArtifactDownloadError(AgentError):
    """The controller answered an artifact download in a way a retry will not change."""


class ArtifactAccessDenied(ArtifactDownloadError):
    """The controller refused the agent token (HTTP 401/403)."""

    exit_code = 77  # EX_NOPERM


class ArtifactNotFound(ArtifactDownloadError):
    """The controller has no such artifact or file (HTTP 404)."""


class StagingWriteError(TemporaryError):
    """The download could not be written to the state directory (disk full, read-only)."""


class _Dropped(Exception):
    """One attempt failed in a way a retry may fix (network, 5xx, 429)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class ArtifactFetcher:
    """:func:`fetch_artifact` with the client, token, trusted keys and limits bound: what the
    reconciler calls."""

    client: httpx.AsyncClient
    token: str | None
    trusted_keys: Sequence[VerifyKey]
    limits: ArtifactSettings
    retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S

    async def __call__(
        self,
        url: str,
        dest: Path,
        *,
        min_version: int,
        expected_manifest_sha256: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Manifest:
        return await fetch_artifact(
            url,
            dest,
            client=self.client,
            token=self.token,
            trusted_keys=self.trusted_keys,
            min_version=min_version,
            limits=self.limits,
            expected_manifest_sha256=expected_manifest_sha256,
            on_progress=on_progress,
            retries=self.retries,
            backoff_s=self.backoff_s,
        )


async def fetch_artifact(
    url: str,
    dest: Path,
    *,
    client: httpx.AsyncClient,
    token: str | None,
    trusted_keys: Sequence[VerifyKey],
    min_version: int,
    limits: ArtifactSettings,
    expected_manifest_sha256: str | None = None,
    on_progress: ProgressCallback | None = None,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
) -> Manifest:
    """Download the artifact at ``url`` into the folder ``dest`` and return its verified manifest.

    ``dest`` is created if needed and may hold a partial earlier attempt at the same artifact:
    complete files are not fetched again, partial ones resume with ``Range: bytes=N-``, files
    the manifest does not list are removed (a folder holding another artifact's partial
    download is emptied first). Nothing is written outside ``dest`` and no symbolic link in it
    is followed. A dropped connection or a server error is retried ``retries`` times with
    exponential backoff starting at ``backoff_s`` (the count starts again whenever bytes
    arrive), then :class:`FetchError` is raised. See the module docstring for the errors.
    """
    base = url.rstrip("/")
    fetch = _Download(client, token, retries=retries, backoff_s=backoff_s)
    manifest_bytes = await fetch.small(
        f"{base}/{MANIFEST_NAME}", MAX_MANIFEST_BYTES, too_big=RejectReason.OVERSIZED
    )
    try:
        signature_bytes = await fetch.small(
            f"{base}/{SIGNATURE_NAME}", MAX_SIGNATURE_FILE_BYTES, too_big=RejectReason.BAD_SIGNATURE
        )
    except ArtifactNotFound as exc:
        raise ArtifactRejected(
            RejectReason.MISSING_SIGNATURE, f"{base} has no {SIGNATURE_NAME}: it is not signed"
        ) from exc
    if expected_manifest_sha256 is not None:
        actual = hashlib.sha256(manifest_bytes).hexdigest()
        if not hmac.compare_digest(actual, expected_manifest_sha256.lower()):
            raise ArtifactRejected(
                RejectReason.HASH_MISMATCH,
                f"{MANIFEST_NAME} at {base} has sha256 {actual}, the desired state says "
                f"{expected_manifest_sha256}",
            )
    manifest = verify_manifest(
        manifest_bytes, signature_bytes, trusted_keys, min_version=min_version, limits=limits
    )
    log.info(
        "fetching %s v%d (%d files, %d bytes) from %s",
        manifest.name,
        manifest.version,
        len(manifest.files),
        manifest.total_size,
        base,
    )
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True, mode=0o700)
        root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise _write_error(dest, exc) from exc
    try:
        _prepare(root_fd, dest, manifest, manifest_bytes, signature_bytes)
        total = manifest.total_size
        done = sum(_present_bytes(root_fd, entry) for entry in manifest.files)
        progress = _Progress(done, total, on_progress)
        progress.report()
        for entry in sorted(manifest.files, key=lambda e: e.path):
            await fetch.file(
                f"{base}/{quote(entry.path, safe='/')}", root_fd, dest, entry, progress
            )
        _remove_unlisted(root_fd, dest, {entry.path for entry in manifest.files})
    finally:
        os.close(root_fd)
    verified = await asyncio.to_thread(
        verify, dest, trusted_keys, min_version=min_version, limits=limits
    )
    if verified != manifest:  # cannot happen: we wrote the bytes we checked
        raise ArtifactRejected(
            RejectReason.MALFORMED_MANIFEST, f"{MANIFEST_NAME} in {dest} changed while fetching"
        )
    log.info("fetched and verified %s v%d into %s", manifest.name, manifest.version, dest)
    return verified


# --------------------------------------------------------------------------- HTTP


class _Download:
    def __init__(
        self, client: httpx.AsyncClient, token: str | None, *, retries: int, backoff_s: float
    ) -> None:
        self.client = client
        self.headers = {"Accept-Encoding": "identity"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.retries = max(0, retries)
        self.backoff_s = max(0.0, backoff_s)

    async def small(self, url: str, limit: int, *, too_big: RejectReason) -> bytes:
        """The body of ``url``, at most ``limit`` bytes (more: :class:`ArtifactRejected`)."""
        failures = 0
        while True:
            try:
                return await self._small_once(url, limit, too_big)
            except _Dropped as exc:
                failures += 1
                await self._backoff(url, exc, failures)

    async def _small_once(self, url: str, limit: int, too_big: RejectReason) -> bytes:
        try:
            async with self.client.stream("GET", url, headers=self.headers) as response:
                _check_status(response, url)
                declared = _content_length(response)
                if declared is not None and declared > limit:
                    raise ArtifactRejected(too_big, f"{url} is {declared} bytes, more than {limit}")
                chunks: list[bytes] = []
                received = 0
                async for chunk in response.aiter_bytes():
                    received += len(chunk)
                    if received > limit:
                        raise ArtifactRejected(too_big, f"{url} is more than {limit} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.TransportError as exc:
            raise _Dropped(f"{url}: {_describe(exc)}") from exc

    async def file(
        self, url: str, root_fd: int, dest: Path, entry: FileEntry, progress: _Progress
    ) -> None:
        """Bring ``entry`` in ``dest`` to its declared size, resuming what is there."""
        fd = _open_for_write(root_fd, dest, entry.path)
        try:
            failures = 0
            while True:
                offset = _size(fd, dest, entry.path)
                if offset > entry.size:
                    log.warning("%s is longer than declared: downloading it again", entry.path)
                    _truncate(fd, dest, entry.path, 0)  # counted as 0 bytes done already
                    offset = 0
                if offset == entry.size:
                    break
                try:
                    await self._file_once(url, fd, dest, entry, offset, progress)
                except _Dropped as exc:
                    if _size(fd, dest, entry.path) > offset:
                        failures = 0  # it made progress: keep going
                    failures += 1
                    await self._backoff(url, exc, failures)
            try:
                await asyncio.to_thread(os.fsync, fd)
            except OSError as exc:
                raise _write_error(dest / entry.path, exc) from exc
        finally:
            os.close(fd)

    async def _file_once(
        self, url: str, fd: int, dest: Path, entry: FileEntry, offset: int, progress: _Progress
    ) -> None:
        headers = dict(self.headers)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            async with self.client.stream("GET", url, headers=headers) as response:
                if response.status_code == httpx.codes.REQUESTED_RANGE_NOT_SATISFIABLE:
                    raise ArtifactRejected(
                        RejectReason.SIZE_MISMATCH,
                        f"{entry.path!r}: the server has {offset} bytes or fewer, "
                        f"the manifest says {entry.size}",
                    )
                _check_status(response, url)
                if offset and response.status_code != httpx.codes.PARTIAL_CONTENT:
                    log.info("%s: the server ignored the range request; starting over", url)
                    _truncate(fd, dest, entry.path, 0)
                    progress.add(-offset)
                    offset = 0
                elif offset:
                    _check_content_range(response, url, offset)
                remaining = entry.size - offset
                declared = _content_length(response)
                if declared is not None and declared > remaining:
                    raise ArtifactRejected(
                        RejectReason.SIZE_MISMATCH,
                        f"{entry.path!r}: the server sends {offset + declared} bytes, "
                        f"the manifest says {entry.size}",
                    )
                os.lseek(fd, offset, os.SEEK_SET)
                async for chunk in response.aiter_bytes():  # as received: nothing buffered is lost
                    if len(chunk) > remaining:
                        raise ArtifactRejected(
                            RejectReason.SIZE_MISMATCH,
                            f"{entry.path!r} is longer than the {entry.size} bytes the manifest "
                            "says",
                        )
                    _write_all(fd, chunk, dest / entry.path)
                    remaining -= len(chunk)
                    progress.add(len(chunk))
                if remaining:
                    raise ArtifactRejected(
                        RejectReason.SIZE_MISMATCH,
                        f"{entry.path!r}: the server sent {entry.size - remaining} bytes, "
                        f"the manifest says {entry.size}",
                    )
        except httpx.TransportError as exc:
            raise _Dropped(f"{url}: {_describe(exc)}") from exc

    async def _backoff(self, url: str, exc: _Dropped, failures: int) -> None:
        if failures > self.retries:
            raise FetchError(
                f"downloading {url} failed {failures} times, last: {exc}",
                retry_after=exc.retry_after,
            ) from exc
        delay = min(MAX_BACKOFF_S, self.backoff_s * 2 ** (failures - 1))
        delay *= random.uniform(0.5, 1.0)  # noqa: S311 (jitter, not crypto)
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, MAX_BACKOFF_S))
        log.warning("%s; retrying in %.2f s (%d/%d)", exc, delay, failures, self.retries)
        await asyncio.sleep(delay)


def _check_status(response: httpx.Response, url: str) -> None:
    code = response.status_code
    if code in (httpx.codes.OK, httpx.codes.PARTIAL_CONTENT):
        return
    if code in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
        raise ArtifactAccessDenied(
            f"the controller refused the agent token (HTTP {code}) for {url}; "
            "re-join the agent if its credentials were revoked"
        )
    if code == httpx.codes.NOT_FOUND:
        raise ArtifactNotFound(f"artifact not found: {url} (HTTP 404)")
    if code == httpx.codes.TOO_MANY_REQUESTS or code >= 500:
        raise _Dropped(f"{url}: HTTP {code}", retry_after=_retry_after(response))
    raise ArtifactDownloadError(f"unexpected answer HTTP {code} for {url}")


def _check_content_range(response: httpx.Response, url: str, offset: int) -> None:
    match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
    if match is None or int(match.group(1)) != offset:
        raise _Dropped(
            f"{url}: asked for bytes from {offset}, got Content-Range "
            f"{response.headers.get('Content-Range')!r}"
        )


def _content_length(response: httpx.Response) -> int | None:
    try:
        value = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("Retry-After", "")))
    except ValueError:
        return None


def _describe(exc: httpx.TransportError) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --------------------------------------------------------------------------- progress


class _Progress:
    def __init__(self, done: int, total: int, callback: ProgressCallback | None) -> None:
        self.done = done
        self.total = total
        self.callback = callback

    def add(self, count: int) -> None:
        self.done = max(0, min(self.total, self.done + count))
        self.report()

    def report(self) -> None:
        if self.callback is not None:
            try:
                self.callback(self.done, self.total)
            except Exception:  # a progress display must not break a download
                log.exception("progress callback failed")


# --------------------------------------------------------------------------- disk


def _prepare(
    root_fd: int, dest: Path, manifest: Manifest, manifest_bytes: bytes, signature_bytes: bytes
) -> None:
    """Make ``dest`` hold this artifact's manifest and signature; drop another artifact's
    partial download and files not listed."""
    try:
        previous = _read_regular(root_fd, MANIFEST_NAME)
    except OSError as exc:
        raise _write_error(dest / MANIFEST_NAME, exc) from exc
    if previous != manifest_bytes:
        if previous is not None:
            log.info("%s holds another artifact's partial download: starting afresh", dest)
        _remove_unlisted(root_fd, dest, set())
    else:
        _remove_unlisted(root_fd, dest, {entry.path for entry in manifest.files})
    try:
        _write_atomic(root_fd, MANIFEST_NAME, manifest_bytes)
        _write_atomic(root_fd, SIGNATURE_NAME, signature_bytes)
    except OSError as exc:
        raise _write_error(dest, exc) from exc


def _read_regular(root_fd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=root_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks: list[bytes] = []
        total = 0
        while total <= MAX_MANIFEST_BYTES:
            chunk = os.read(fd, 1024 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _write_atomic(root_fd: int, name: str, data: bytes) -> None:
    tmp = f".{name}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=root_fd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=root_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=root_fd, dst_dir_fd=root_fd)


def _remove_unlisted(root_fd: int, dest: Path, keep: set[str]) -> None:
    """Delete every file, link or special file below ``root_fd`` that is not in ``keep`` (nor
    the manifest or signature at the top); empty folders left behind are removed too."""

    def walk(fd: int, prefix: str) -> bool:
        """Clean one folder; True when it ends up empty."""
        empty = True
        with os.scandir(fd) as entries:
            items = list(entries)
        for item in items:
            rel = prefix + item.name
            top_level_reserved = not prefix and item.name in (MANIFEST_NAME, SIGNATURE_NAME)
            if top_level_reserved and item.is_file(follow_symlinks=False):
                empty = False
                continue
            if item.is_dir(follow_symlinks=False):
                child = os.open(item.name, _DIR_FLAGS, dir_fd=fd)
                try:
                    child_empty = walk(child, rel + "/")
                finally:
                    os.close(child)
                if child_empty and not any(p.startswith(rel + "/") for p in keep):
                    os.rmdir(item.name, dir_fd=fd)
                else:
                    empty = False
            elif rel in keep and item.is_file(follow_symlinks=False):
                empty = False
            else:
                log.info("removing %s from %s: not part of the artifact", rel, dest)
                os.unlink(item.name, dir_fd=fd)
        return empty

    try:
        walk(root_fd, "")
    except OSError as exc:
        raise _write_error(dest, exc) from exc


def _present_bytes(root_fd: int, entry: FileEntry) -> int:
    """Bytes of ``entry`` already on disk that count as downloaded (0 when too long)."""
    try:
        st = os.stat(entry.path, dir_fd=root_fd, follow_symlinks=False)
    except OSError:
        return 0
    if not stat.S_ISREG(st.st_mode) or st.st_size > entry.size:
        return 0
    return st.st_size


def _open_for_write(root_fd: int, dest: Path, rel: str) -> int:
    """Open (creating) ``rel`` below ``root_fd`` for writing without following any link,
    creating the folders on the way; a link or special file in the way is replaced."""
    problem = unsafe_path_problem(rel)
    if problem is not None:  # verify_manifest already refused it; never write such a path
        raise ArtifactRejected(RejectReason.UNSAFE_PATH, f"file path {rel!r} {problem}")
    parts = rel.split("/")
    opened: list[int] = []
    fd = root_fd
    try:
        for part in parts[:-1]:
            fd = _open_dir_creating(fd, part, dest / rel)
            opened.append(fd)
        return _open_file_replacing(fd, parts[-1], dest / rel)
    except OSError as exc:
        raise _write_error(dest / rel, exc) from exc
    finally:
        for d in opened:
            os.close(d)


def _open_dir_creating(parent: int, name: str, path: Path) -> int:
    for _ in range(2):
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            log.warning("replacing %s on the way to %s: not a folder", name, path)
            os.unlink(name, dir_fd=parent)
    return os.open(name, _DIR_FLAGS, dir_fd=parent)


def _open_file_replacing(parent: int, name: str, path: Path) -> int:
    for _ in range(2):
        try:
            fd = os.open(name, _WRITE_FLAGS, 0o600, dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                raise
            log.warning("replacing %s: not a regular file", path)
            _remove_at(parent, name)
            continue
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return fd
        os.close(fd)
        log.warning("replacing %s: not a regular file", path)
        _remove_at(parent, name)
    return os.open(name, _WRITE_FLAGS | os.O_EXCL, 0o600, dir_fd=parent)


def _remove_at(parent: int, name: str) -> None:
    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent)
        try:
            _remove_unlisted(fd, Path(name), set())
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=parent)
    else:
        os.unlink(name, dir_fd=parent)


def _size(fd: int, dest: Path, rel: str) -> int:
    try:
        return os.fstat(fd).st_size
    except OSError as exc:
        raise _write_error(dest / rel, exc) from exc


def _truncate(fd: int, dest: Path, rel: str, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise _write_error(dest / rel, exc) from exc


def _write_all(fd: int, data: bytes, path: Path) -> None:
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise _write_error(path, exc) from exc


def _write_error(path: Path, exc: OSError) -> StagingWriteError:
    return StagingWriteError(f"cannot write {path}: {exc.strerror or exc}")
