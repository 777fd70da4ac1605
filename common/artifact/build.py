"""Building a signed artifact from a directory of model files."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from edgefed.common.artifact import _files
from edgefed.common.artifact.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    FileEntry,
    Manifest,
    Quantization,
    SplitInfo,
    Task,
    TensorSpec,
    unsafe_path_problem,
)
from edgefed.common.artifact.signing import SignatureFile, SigningKey, sign_bytes
from edgefed.common.errors import ArtifactError, ArtifactRejected


def write_artifact(
    directory: Path | str,
    *,
    name: str,
    version: int,
    task: Task,
    target: str,
    signing_key: SigningKey,
    inputs: Iterable[TensorSpec] = (),
    outputs: Iterable[TensorSpec] = (),
    quantization: Quantization | None = None,
    split: SplitInfo | None = None,
    parent_version: int | None = None,
    metrics: Mapping[str, float] | None = None,
    opset: int | None = None,
    created_at: datetime | None = None,
) -> Manifest:
    """Turn ``directory`` into a signed artifact and return its manifest.

    Every regular file below ``directory`` (recursively, hidden ones included; not
    ``manifest.json`` / ``manifest.sig`` at the top) is listed with its size and SHA-256. Writes
    ``manifest.json`` (canonical bytes, see :meth:`Manifest.to_json_bytes`) and ``manifest.sig``,
    each atomically. ``created_at`` defaults to now (UTC, whole seconds). Raises
    :class:`ArtifactError` for a symbolic link, special file or unsafe file name in the
    directory, or for field values the manifest does not accept.
    """
    when = created_at if created_at is not None else datetime.now(UTC).replace(microsecond=0)
    root_fd = _open_root(Path(directory))
    try:
        files = [_hash_entry(root_fd, path, size) for path, size in sorted(_scan(root_fd).items())]
        try:
            manifest = Manifest(
                name=name,
                version=version,
                task=task,
                files=files,
                inputs=list(inputs),
                outputs=list(outputs),
                quantization=quantization,
                target=target,
                split=split,
                parent_version=parent_version,
                metrics=dict(metrics or {}),
                created_at=when,
                opset=opset,
                key_id=signing_key.key_id,
            )
        except ValidationError as exc:
            raise ArtifactError(f"cannot build the manifest of {directory}: {exc}") from exc
        data = manifest.to_json_bytes()
        if len(data) > MAX_MANIFEST_BYTES:
            raise ArtifactError(
                f"the manifest of {directory} would be {len(data)} bytes, "
                f"more than {MAX_MANIFEST_BYTES}"
            )
        try:
            _files.write_atomic(root_fd, MANIFEST_NAME, data)
            _files.write_atomic(
                root_fd, SIGNATURE_NAME, sign_bytes(data, signing_key).to_json_bytes()
            )
        except OSError as exc:
            raise ArtifactError(f"cannot write the manifest of {directory}: {exc}") from exc
        return manifest
    finally:
        os.close(root_fd)


def sign_manifest(directory: Path | str, signing_key: SigningKey) -> SignatureFile:
    """(Re)write ``manifest.sig`` over the exact bytes of ``directory/manifest.json``.

    The manifest is signed as it is, without being parsed; its ``key_id`` must name
    ``signing_key`` for :func:`.verify.verify` to accept it.
    """
    root_fd = _open_root(Path(directory))
    try:
        try:
            fd = _files.open_file(root_fd, MANIFEST_NAME)
        except ArtifactRejected as exc:
            raise ArtifactError(f"cannot sign {directory}: {exc.detail}") from exc
        try:
            data = _files.read_limited(fd, MAX_MANIFEST_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_MANIFEST_BYTES:
            raise ArtifactError(
                f"{MANIFEST_NAME} in {directory} is more than {MAX_MANIFEST_BYTES} bytes"
            )
        signature = sign_bytes(data, signing_key)
        _files.write_atomic(root_fd, SIGNATURE_NAME, signature.to_json_bytes())
        return signature
    except OSError as exc:
        raise ArtifactError(f"cannot sign {directory}: {exc}") from exc
    finally:
        os.close(root_fd)


def _open_root(directory: Path) -> int:
    try:
        return _files.open_root(directory)
    except ArtifactRejected as exc:
        raise ArtifactError(exc.detail) from exc


def _scan(root_fd: int) -> dict[str, int]:
    try:
        found = _files.scan(root_fd)
    except ArtifactRejected as exc:
        raise ArtifactError(f"cannot build an artifact: {exc.detail}") from exc
    for path in found.files:
        problem = unsafe_path_problem(path)
        if problem is not None:
            raise ArtifactError(f"cannot build an artifact: file {path!r} {problem}")
    return found.files


def _hash_entry(root_fd: int, path: str, size: int) -> FileEntry:
    try:
        fd = _files.open_file(root_fd, path)
    except ArtifactRejected as exc:
        raise ArtifactError(f"cannot build an artifact: {exc.detail}") from exc
    try:
        size = os.fstat(fd).st_size
        digest, read = _files.hash_fd(fd, size)
    except OSError as exc:
        raise ArtifactError(f"cannot read {path!r}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    if read != size:
        raise ArtifactError(f"{path!r} changed while being hashed")
    return FileEntry(path=path, sha256=digest, size=size)
