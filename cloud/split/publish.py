"""Publishing split pairs: head and tail artifacts of chosen split points, registered like any
other artifact, and the model's reference profile beside the model's version in the store.

The placement service (:mod:`edgefed.cloud.split.placements`) plans only with what this wrote:
the profile at ``<store>/<name>/v<version>/split-profile.json`` (the figures the planner scales
per device) and the split points whose head *and* tail are registered as
``<name>.k<k>.head`` / ``<name>.k<k>.tail`` v``version`` (the same version as the model they
split, so a head always matches the model the agent runs).

The profile is the controller's own data, written by the controller's operator into the
controller's store; it is not signed (agents never read it).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from edgefed.cloud.compress.config import Task, target_profile
from edgefed.cloud.compress.publish import artifact_dir
from edgefed.cloud.registry.artifacts import RegistryError, register_artifacts
from edgefed.cloud.registry.models import Artifact, Model, ModelVersion
from edgefed.cloud.split.errors import SplitError, SplitPointError
from edgefed.cloud.split.partition import Role, SplitPair, export_split, inspect_model
from edgefed.cloud.split.partition_sign import SplitArtifacts, sign_split, split_artifact_name
from edgefed.cloud.split.profile import ModelProfile, infer_task, profile_model
from edgefed.common.artifact import MANIFEST_NAME, SigningKey
from edgefed.common.topics import ID_PATTERN

log = logging.getLogger(__name__)

__all__ = [
    "PROFILE_FILE",
    "ProfileMissing",
    "SplitPublication",
    "SplitPublishError",
    "parse_split_points",
    "profile_path",
    "publish_pairs",
    "publish_split",
    "read_profile",
    "registered_split_points",
    "write_profile",
]

PROFILE_FILE = "split-profile.json"
"""The reference profile of a model version, in the store beside its targets."""

_MAX_NAME = 64
"""Longest model name the registry holds (``models.name``)."""


class SplitPublishError(SplitError):
    """A split pair or profile cannot be published (the message says which and why)."""


class ProfileMissing(SplitPublishError):
    """No split profile was published for a model version."""


@dataclass(frozen=True, slots=True)
class SplitPublication:
    """What :func:`publish_pairs` put into the store and the registry."""

    name: str
    version: int
    target: str
    split_points: tuple[int, ...]
    artifacts: dict[int, SplitArtifacts]
    profile_file: Path


def profile_path(store: Path, name: str, version: int) -> Path:
    """Where the reference profile of ``name`` v``version`` lives in the store."""
    return store / name / f"v{version}" / PROFILE_FILE


def write_profile(store: Path, name: str, version: int, profile: ModelProfile) -> Path:
    """Store ``profile`` for ``name`` v``version`` (atomically: a reader never sees half)."""
    if profile.device != "reference":
        raise SplitPublishError(
            f"the profile to publish for {name} v{version} must be the reference-host profile, "
            f"not one scaled to {profile.device!r}"
        )
    dest = profile_path(store, name, version)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".split-profile-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(profile.model_dump_json(indent=2))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def read_profile(store: Path, name: str, version: int) -> ModelProfile:
    """The published reference profile of ``name`` v``version``.

    Raises :class:`ProfileMissing` when there is none, :class:`SplitPublishError` when the file
    is not a profile."""
    path = profile_path(store, name, version)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileMissing(
            f"{name} v{version} has no split profile ({path}); publish one with "
            f"`edgefed split publish MODEL_DIR --name {name} --version {version} ...`"
        ) from None
    except OSError as exc:
        raise SplitPublishError(f"cannot read the split profile {path}: {exc}") from exc
    try:
        return ModelProfile.model_validate_json(text)
    except ValidationError as exc:
        raise SplitPublishError(f"{path} is not a valid split profile: {exc}") from exc


def parse_split_points(text: str) -> list[int]:
    """``"2,4"`` as ``[2, 4]``; :class:`SplitPointError` naming what is wrong otherwise."""
    points: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise SplitPointError(
                f"split points must be positive integers separated by commas, e.g. 2,4 "
                f"(got {text!r})"
            )
        points.append(int(part))
    return points


def _check_name(name: str, points: Iterable[int]) -> None:
    if not re.fullmatch(ID_PATTERN, name):
        raise SplitPublishError(f"{name!r} is not a valid model name")
    for k in points:
        longest = split_artifact_name(name, k, "head")
        if len(longest) > _MAX_NAME:
            raise SplitPublishError(
                f"artifact name {longest!r} is longer than {_MAX_NAME} characters: "
                "use a shorter model name"
            )


def _checked_points(split_points: Sequence[int], num_layers: int) -> tuple[int, ...]:
    if not split_points:
        raise SplitPointError("name at least one split point to publish")
    for k in split_points:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < num_layers:
            raise SplitPointError(
                f"split point {k!r} is out of range for a model with {num_layers} layers: "
                f"a split keeps 1 to {num_layers - 1} layers on the edge"
            )
    return tuple(sorted(set(split_points)))


def _ensure_model(session: Session, name: str, task: str) -> None:
    """The registry row of one side's artifact name (created on first publication)."""
    row = session.scalars(select(Model).where(Model.name == name)).one_or_none()
    if row is None:
        session.add(Model(name=name, task=task, teacher_dir=None, created_by="split publish"))
        session.flush()
    elif row.task != task:
        raise SplitPublishError(
            f"a model named {name!r} is registered for task {row.task!r}, not {task!r}"
        )


_ROLES: tuple[Role, ...] = ("head", "tail")


def _side_dirs(
    store: Path, name: str, version: int, target: str, points: Iterable[int]
) -> list[Path]:
    """Store folders of both sides of every split point."""
    return [
        artifact_dir(store, split_artifact_name(name, k, role), version, target)
        for k in points
        for role in _ROLES
    ]


def _register(
    session: Session,
    store: Path,
    name: str,
    version: int,
    target: str,
    pair: SplitPair,
    role: Role,
    signing_key: SigningKey,
) -> None:
    side = split_artifact_name(name, pair.k, role)
    _ensure_model(session, side, pair.task)
    try:
        register_artifacts(
            session,
            side,
            version,
            store,
            [target],
            None,
            trusted_keys=[signing_key.verify_key],
            note=f"{role} of {name} v{version} split at k={pair.k}",
        )
    except RegistryError as exc:
        raise SplitPublishError(f"{side} v{version}: {exc.message}") from exc


def publish_pairs(
    pairs: Sequence[SplitPair],
    *,
    store: Path,
    session: Session,
    name: str,
    version: int,
    target: str,
    signing_key: SigningKey,
    profile: ModelProfile,
) -> SplitPublication:
    """Sign exported pairs for ``target`` into ``store``, register both sides of each in
    ``session`` (not committed: the caller owns the transaction) and store ``profile``.

    Every split point must fit the profile's layer count and none may be published already:
    everything is checked before anything is written, and a failure half-way removes what it
    wrote."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SplitPublishError(f"version must be a positive integer, got {version!r}")
    points = _checked_points([p.k for p in pairs], profile.num_layers)
    if len(points) != len(pairs):
        raise SplitPointError(f"split points repeat: {sorted(p.k for p in pairs)}")
    _check_name(name, points)
    target_profile(target)  # UnknownTargetError before anything is written
    tasks = {p.task for p in pairs}
    if tasks != {profile.task}:
        raise SplitPublishError(
            f"the pairs are for {', '.join(sorted(tasks))}, the profile for {profile.task}"
        )
    folders = _side_dirs(store, name, version, target, points)
    taken = [folder for folder in folders if (folder / MANIFEST_NAME).exists()]
    if taken:
        raise SplitPublishError(
            f"{name} v{version} is already published for {target} at "
            f"{', '.join(map(str, taken))}; versions only go up"
        )
    artifacts: dict[int, SplitArtifacts] = {}
    try:
        for pair in sorted(pairs, key=lambda p: p.k):
            artifacts[pair.k] = sign_split(pair, name, version, signing_key, target, store=store)
            for role in _ROLES:
                _register(session, store, name, version, target, pair, role, signing_key)
    except BaseException:
        # Nothing half-published stays behind: the caller rolls the registry back, the
        # folders written here go (a retry can publish the same version again).
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    written = write_profile(store, name, version, profile)
    log.info(
        "published %s v%d split at %s for %s (profile %s)",
        name,
        version,
        ",".join(map(str, points)),
        target,
        written,
    )
    return SplitPublication(name, version, target, points, artifacts, written)


def publish_split(
    model_dir: Path,
    *,
    store: Path,
    session: Session,
    name: str,
    version: int,
    split_points: Sequence[int],
    target: str,
    signing_key: SigningKey,
    task: Task | None = None,
    seq: int = 128,
    profile: ModelProfile | None = None,
) -> SplitPublication:
    """Profile the model in ``model_dir`` on this host (unless ``profile`` is given), export
    head and tail at each of ``split_points``, and publish them (:func:`publish_pairs`).

    Split points and names are checked against the model before the slow work starts."""
    model_dir = Path(model_dir)
    shape = inspect_model(model_dir)
    points = _checked_points(split_points, shape.num_layers)
    _check_name(name, points)
    target_profile(target)
    checked_task: Task = task or infer_task(model_dir)
    if profile is None:
        profile = profile_model(model_dir, task=checked_task, seq=seq)
    with tempfile.TemporaryDirectory(prefix="split-publish-") as work:
        pairs = [
            export_split(model_dir, Path(work) / f"k{k}", k, task=checked_task) for k in points
        ]
        return publish_pairs(
            pairs,
            store=store,
            session=session,
            name=name,
            version=version,
            target=target,
            signing_key=signing_key,
            profile=profile,
        )


_SIDE = re.compile(r"^(?P<name>.+)\.k(?P<k>[0-9]+)\.(?P<role>head|tail)$")


def registered_split_points(
    session: Session, name: str, version: int, head_target: str
) -> set[int]:
    """Split points of ``name`` v``version`` whose head is registered for ``head_target`` (the
    device's target) and whose tail is registered for any target (the cloud workers')."""
    rows = session.execute(
        select(Model.name, Artifact.target)
        .join(ModelVersion, ModelVersion.model_id == Model.id)
        .join(Artifact, Artifact.version_id == ModelVersion.id)
        .where(Model.name.startswith(f"{name}.k", autoescape=True))
        .where(ModelVersion.version == version)
    ).all()
    heads: set[int] = set()
    tails: set[int] = set()
    for side_name, target in rows:
        match = _SIDE.match(side_name)
        if match is None or match["name"] != name:
            continue
        k = int(match["k"])
        if match["role"] == "head" and target == head_target:
            heads.add(k)
        elif match["role"] == "tail":
            tails.add(k)
    return heads & tails
