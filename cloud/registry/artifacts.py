"""Registering published artifacts: the artifact store (``NAME/vN/TARGET``, see
``cloud/compress/publish.py``) is the truth about files; the registry records which versions
and targets exist, the SHA-256 of each ``manifest.json`` (what a desired state names) and the
validation report (the manifest's ``metrics``).

The job service calls :func:`register_artifacts` after a compression published its artifacts;
``POST /api/v1/models/{name}/versions`` calls it for artifacts published out of band (e.g. by
``edgefed compress --out STORE``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefed.cloud.registry.models import Artifact, Model, ModelVersion
from edgefed.common.artifact import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    VerifyKey,
    parse_manifest,
    verify_manifest,
)
from edgefed.common.errors import ArtifactError, PermanentError
from edgefed.common.topics import ID_PATTERN

_ID = re.compile(ID_PATTERN)


class RegistryError(PermanentError):
    """A registry operation was refused; the message says why (retrying will not help)."""

    exit_code = 65  # EX_DATAERR


class UnknownModelError(RegistryError):
    """The model is not registered."""


class ArtifactMissingError(RegistryError):
    """The artifact store holds no published artifact where one was expected."""


class ArtifactConflictError(RegistryError):
    """A different artifact is already registered for the same model, version and target."""


def artifact_relpath(name: str, version: int, target: str) -> str:
    """Where an artifact lives, relative to the store: ``NAME/vN/TARGET``."""
    return f"{name}/v{version}/{target}"


def artifact_url(public_url: str, name: str, version: int, target: str) -> str:
    """The base URL an agent downloads an artifact from (``{url}/manifest.json`` etc.)."""
    path = "/".join(quote(part, safe="") for part in (name, f"v{version}", target))
    return f"{public_url.rstrip('/')}/api/v1/artifacts/{path}"


def published_targets(store_root: Path, name: str, version: int) -> list[str]:
    """Targets of ``name`` v``version`` that have a ``manifest.json`` in the store, sorted."""
    folder = store_root / name / f"v{version}"
    if not _ID.match(name) or not folder.is_dir() or folder.is_symlink():
        return []
    return sorted(
        child.name
        for child in folder.iterdir()
        if child.is_dir()
        and not child.is_symlink()
        and _ID.match(child.name)
        and (child / MANIFEST_NAME).is_file()
    )


@dataclass(frozen=True)
class _Published:
    target: str
    manifest_sha256: str
    size_bytes: int
    metrics: dict[str, float]
    parent_version: int | None


def _read_published(
    store_root: Path,
    name: str,
    version: int,
    target: str,
    trusted_keys: Iterable[VerifyKey] | None,
) -> _Published:
    if not _ID.match(target):
        raise RegistryError(f"target {target!r} is not a valid target name")
    folder = store_root / artifact_relpath(name, version, target)
    manifest_file = folder / MANIFEST_NAME
    try:
        if manifest_file.is_symlink() or not manifest_file.is_file():
            raise ArtifactMissingError(
                f"{name} v{version} has no published artifact for target {target!r} "
                f"(no {manifest_file})"
            )
        if manifest_file.stat().st_size > MAX_MANIFEST_BYTES:
            raise RegistryError(f"{manifest_file} is larger than {MAX_MANIFEST_BYTES} bytes")
        manifest_bytes = manifest_file.read_bytes()
        signature_file = folder / SIGNATURE_NAME
        signature_bytes = signature_file.read_bytes() if signature_file.is_file() else b""
    except OSError as exc:
        raise ArtifactMissingError(f"cannot read {manifest_file}: {exc}") from exc
    try:
        if trusted_keys is not None:
            manifest = verify_manifest(manifest_bytes, signature_bytes, list(trusted_keys))
        else:
            manifest = parse_manifest(manifest_bytes)
    except ArtifactError as exc:
        raise RegistryError(f"{manifest_file}: {exc.message}") from exc
    if (manifest.name, manifest.version, manifest.target) != (name, version, target):
        raise RegistryError(
            f"{manifest_file} describes {manifest.name} v{manifest.version} for "
            f"{manifest.target!r}, not {name} v{version} for {target!r}"
        )
    return _Published(
        target=target,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
        size_bytes=manifest.total_size + len(manifest_bytes) + len(signature_bytes),
        metrics=dict(manifest.metrics),
        parent_version=manifest.parent_version,
    )


def register_artifacts(
    session: Session,
    model_name: str,
    version: int,
    store_root: Path,
    targets: Iterable[str],
    job_id: int | None,
    *,
    trusted_keys: Iterable[VerifyKey] | None = None,
    note: str | None = None,
) -> ModelVersion:
    """Record ``model_name`` v``version`` and its artifacts for ``targets`` (published in
    ``store_root``), idempotently: rows already there with the same manifest are kept.

    Reads each artifact's ``manifest.json``; with ``trusted_keys`` its signature is checked
    too. ``size_bytes`` is what an agent downloads (the listed files, the manifest and its
    signature); ``metrics`` is the validation report. Everything is checked before anything is
    added, and nothing is committed: the caller owns the transaction.

    Raises :class:`UnknownModelError`, :class:`ArtifactMissingError`,
    :class:`ArtifactConflictError` (another manifest already registered for a target) or
    :class:`RegistryError` (a manifest that is malformed, untrusted or for something else).
    """
    model = session.scalars(select(Model).where(Model.name == model_name)).one_or_none()
    if model is None:
        raise UnknownModelError(f"no model named {model_name!r} is registered")
    wanted = sorted(set(targets))
    if not wanted:
        raise ArtifactMissingError(f"{model_name} v{version}: no targets to register")
    published = [_read_published(store_root, model_name, version, t, trusted_keys) for t in wanted]
    row = session.scalars(
        select(ModelVersion).where(
            ModelVersion.model_id == model.id, ModelVersion.version == version
        )
    ).one_or_none()
    existing: dict[str, Artifact] = {}
    if row is not None:
        existing = {a.target: a for a in row.artifacts}
        for item in published:
            old = existing.get(item.target)
            if old is not None and old.manifest_sha256 != item.manifest_sha256:
                raise ArtifactConflictError(
                    f"{model_name} v{version} for {item.target!r} is already registered with "
                    f"manifest sha256 {old.manifest_sha256}; the store now holds "
                    f"{item.manifest_sha256} (versions are never overwritten)"
                )
    else:
        parents = {p.parent_version for p in published}
        row = ModelVersion(
            model_id=model.id,
            version=version,
            parent_version=parents.pop() if len(parents) == 1 else None,
            job_id=job_id,
            note=note,
        )
        session.add(row)
        session.flush()
    for item in published:
        if item.target in existing:
            continue
        # Appended through the relationship only (cascade adds it to the session): adding it
        # to the session first would let the collection's lazy load autoflush it, and the
        # append would then list it twice.
        row.artifacts.append(
            Artifact(
                target=item.target,
                path=artifact_relpath(model_name, version, item.target),
                manifest_sha256=item.manifest_sha256,
                size_bytes=item.size_bytes,
                metrics=item.metrics,
            )
        )
    session.flush()
    return row
