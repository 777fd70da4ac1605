"""Verification of a model artifact directory before anything in it is loaded."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from edgefed.common.artifact import _files
from edgefed.common.artifact.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    Manifest,
    parse_manifest,
)
from edgefed.common.artifact.signing import MAX_SIGNATURE_FILE_BYTES, SignatureFile, VerifyKey
from edgefed.common.errors import ArtifactRejected, RejectReason
from edgefed.common.settings import ArtifactSettings


def verify(
    directory: Path | str,
    trusted_keys: VerifyKey | Iterable[VerifyKey],
    *,
    min_version: int = 0,
    limits: ArtifactSettings | None = None,
) -> Manifest:
    """Check an artifact directory and return its manifest, or raise :class:`ArtifactRejected`.

    The checks run in this order, each with its own :class:`RejectReason`:

    1. ``directory`` is a directory (a symbolic link *to* it is followed; none inside it is);
    2. ``manifest.json`` exists and is at most 1 MiB, ``manifest.sig`` exists and is well formed;
    3. the signature's key id is one of ``trusted_keys`` (several may be trusted while keys
       rotate) and the signature over the exact bytes of ``manifest.json`` is valid -- nothing in
       the manifest is parsed before this;
    4. the manifest parses (``MALFORMED_MANIFEST``; an unsafe path is ``UNSAFE_PATH``) and names
       the same key id as the signature (``UNTRUSTED_SIGNER``);
    5. ``manifest.version >= min_version`` (``VERSION_TOO_LOW``). Versions only go up: pass the
       running version plus one to demand a strictly newer artifact, or the running version to
       re-verify the one installed;
    6. the declared sizes respect ``limits`` (``OVERSIZED``): file count, each file, the total;
    7. the directory holds no symbolic link or special file anywhere (``UNSAFE_PATH``), every
       listed file exists (``MISSING_FILE``), nothing else does, hidden files included
       (``EXTRA_FILE``), and every size on disk matches (``SIZE_MISMATCH``) -- all from ``stat``,
       before any file is read;
    8. every file's SHA-256 matches (``HASH_MISMATCH``); no file is read beyond its declared size
       plus one byte (to notice growth).

    The returned manifest describes the directory as it was checked; whoever loads the files
    should own the directory so they cannot change afterwards.
    """
    limits = limits if limits is not None else ArtifactSettings()
    keys = _key_table(trusted_keys)
    root_fd = _files.open_root(Path(directory))
    try:
        manifest_bytes = _read_small(
            root_fd,
            MANIFEST_NAME,
            MAX_MANIFEST_BYTES,
            missing=RejectReason.MISSING_MANIFEST,
            too_big=RejectReason.OVERSIZED,
        )
        signature_bytes = _read_small(
            root_fd,
            SIGNATURE_NAME,
            MAX_SIGNATURE_FILE_BYTES,
            missing=RejectReason.MISSING_SIGNATURE,
            too_big=RejectReason.BAD_SIGNATURE,
        )
        manifest = verify_manifest(
            manifest_bytes, signature_bytes, keys.values(), min_version=min_version, limits=limits
        )
        _check_tree(root_fd, manifest)
        for entry in sorted(manifest.files, key=lambda e: e.path):
            _check_content(root_fd, entry.path, entry.size, entry.sha256)
        return manifest
    finally:
        os.close(root_fd)


def verify_manifest(
    manifest_bytes: bytes,
    signature_bytes: bytes,
    trusted_keys: VerifyKey | Iterable[VerifyKey],
    *,
    min_version: int = 0,
    limits: ArtifactSettings | None = None,
) -> Manifest:
    """Steps 2-6 of :func:`verify` on the bytes of ``manifest.json`` and ``manifest.sig``:
    signature by a trusted key, manifest well formed, version, declared sizes.

    A downloader calls this before fetching any model file, so an untrusted, replayed or
    oversized artifact costs two small requests; :func:`verify` on the finished directory
    then checks the files themselves.
    """
    limits = limits if limits is not None else ArtifactSettings()
    keys = _key_table(trusted_keys)
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise ArtifactRejected(
            RejectReason.OVERSIZED,
            f"{MANIFEST_NAME} is {len(manifest_bytes)} bytes, more than {MAX_MANIFEST_BYTES}",
        )
    if len(signature_bytes) > MAX_SIGNATURE_FILE_BYTES:
        raise ArtifactRejected(
            RejectReason.BAD_SIGNATURE,
            f"{SIGNATURE_NAME} is {len(signature_bytes)} bytes, more than "
            f"{MAX_SIGNATURE_FILE_BYTES}",
        )
    signature = SignatureFile.parse(signature_bytes)
    key = keys.get(signature.key_id)
    if key is None:
        trusted = ", ".join(sorted(keys)) or "none"
        raise ArtifactRejected(
            RejectReason.UNTRUSTED_SIGNER,
            f"signed by key {signature.key_id}, which is not trusted (trusted: {trusted})",
        )
    if not key.verify(signature.signature_bytes, manifest_bytes):
        raise ArtifactRejected(
            RejectReason.BAD_SIGNATURE,
            f"signature of {MANIFEST_NAME} by key {signature.key_id} does not verify",
        )
    manifest = parse_manifest(manifest_bytes)
    if manifest.key_id != signature.key_id:
        raise ArtifactRejected(
            RejectReason.UNTRUSTED_SIGNER,
            f"manifest names key {manifest.key_id} but is signed by key {signature.key_id}",
        )
    if manifest.version < min_version:
        raise ArtifactRejected(
            RejectReason.VERSION_TOO_LOW,
            f"{manifest.name} version {manifest.version} is lower than {min_version}",
        )
    _check_limits(manifest, limits)
    return manifest


def _key_table(trusted_keys: VerifyKey | Iterable[VerifyKey]) -> dict[str, VerifyKey]:
    keys = [trusted_keys] if isinstance(trusted_keys, VerifyKey) else list(trusted_keys)
    for key in keys:
        if not isinstance(key, VerifyKey):
            raise TypeError(f"trusted keys must be VerifyKey objects, got {type(key).__name__}")
    return {key.key_id: key for key in keys}


def _read_small(
    root_fd: int, name: str, limit: int, *, missing: RejectReason, too_big: RejectReason
) -> bytes:
    fd = _files.open_file(root_fd, name, missing=missing)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise ArtifactRejected(too_big, f"{name} is {size} bytes, more than {limit}")
        data = _files.read_limited(fd, limit + 1)
    except OSError as exc:
        raise ArtifactRejected(missing, f"{name} cannot be read ({exc.strerror})") from exc
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ArtifactRejected(too_big, f"{name} is more than {limit} bytes")
    return data


def _check_limits(manifest: Manifest, limits: ArtifactSettings) -> None:
    if len(manifest.files) > limits.max_files:
        raise ArtifactRejected(
            RejectReason.OVERSIZED,
            f"manifest lists {len(manifest.files)} files, more than max_files={limits.max_files}",
        )
    for entry in manifest.files:
        if entry.size > limits.max_file_bytes:
            raise ArtifactRejected(
                RejectReason.OVERSIZED,
                f"{entry.path!r} is {entry.size} bytes, "
                f"more than max_file_bytes={limits.max_file_bytes}",
            )
    if manifest.total_size > limits.max_total_bytes:
        raise ArtifactRejected(
            RejectReason.OVERSIZED,
            f"files total {manifest.total_size} bytes, "
            f"more than max_total_bytes={limits.max_total_bytes}",
        )


def _check_tree(root_fd: int, manifest: Manifest) -> None:
    listed = {entry.path: entry.size for entry in manifest.files}
    found = _files.scan(root_fd, stop_after=len(listed))
    extra = sorted(set(found.files) - set(listed))
    if not found.complete:
        raise ArtifactRejected(
            RejectReason.EXTRA_FILE,
            f"directory holds more files than the {len(listed)} listed, e.g. {extra[0]!r}",
        )
    for path in sorted(listed):
        if path not in found.files:
            raise ArtifactRejected(RejectReason.MISSING_FILE, f"{path!r} is listed but missing")
    if extra:
        raise ArtifactRejected(RejectReason.EXTRA_FILE, f"{extra[0]!r} is not listed")
    for path, size in sorted(listed.items()):
        if found.files[path] != size:
            raise ArtifactRejected(
                RejectReason.SIZE_MISMATCH,
                f"{path!r} is {found.files[path]} bytes, the manifest says {size}",
            )


def _check_content(root_fd: int, path: str, size: int, sha256: str) -> None:
    fd = _files.open_file(root_fd, path)
    try:
        actual_size = os.fstat(fd).st_size
        if actual_size != size:
            raise ArtifactRejected(
                RejectReason.SIZE_MISMATCH,
                f"{path!r} is {actual_size} bytes, the manifest says {size}",
            )
        digest, read = _files.hash_fd(fd, size)
    except OSError as exc:
        raise ArtifactRejected(
            RejectReason.MISSING_FILE, f"{path!r} cannot be read ({exc.strerror})"
        ) from exc
    finally:
        os.close(fd)
    if read != size:
        raise ArtifactRejected(
            RejectReason.SIZE_MISMATCH,
            f"{path!r} changed size while being read (expected {size} bytes)",
        )
    if not hmac.compare_digest(digest, sha256):
        raise ArtifactRejected(
            RejectReason.HASH_MISMATCH, f"{path!r} has sha256 {digest}, the manifest says {sha256}"
        )
