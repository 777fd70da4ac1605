"""Head and tail graphs become two signed artifacts, prepared for a device target like any other
model (fp32 copy, dynamic int8 or fp16 through :func:`edgefed.cloud.compress.quantize.quantize`),
each with ``split = {role, split_point}`` in its manifest.

Store layout (as :mod:`edgefed.cloud.compress.publish`): ``<store>/<name>.k<k>.<role>/v<version>/
<target>/``; :func:`split_artifact_name` gives the artifact name of each side.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from edgefed.cloud.compress.config import TargetProfile, target_profile
from edgefed.cloud.compress.errors import CompressionError
from edgefed.cloud.compress.publish import artifact_dir, graph_specs
from edgefed.cloud.compress.quantize import MODEL_FILE, quantization_config, quantize
from edgefed.cloud.split.errors import SplitSigningError
from edgefed.cloud.split.partition import Role, SplitPair
from edgefed.common.artifact import (
    MANIFEST_NAME,
    Manifest,
    Quantization,
    SigningKey,
    SplitInfo,
    write_artifact,
)
from edgefed.common.errors import ArtifactError

__all__ = ["SplitArtifacts", "sign_split", "split_artifact_name"]


@dataclass(frozen=True, slots=True)
class SplitArtifacts:
    """The two signed artifacts of a split pair."""

    head_dir: Path
    tail_dir: Path
    head: Manifest
    tail: Manifest


def split_artifact_name(name: str, k: int, role: Role) -> str:
    """Artifact name of one side of ``name`` split at ``k``: ``<name>.k<k>.<role>``."""
    return f"{name}.k{k}.{role}"


def _quantization(target: TargetProfile) -> Quantization:
    if target.scheme != "dynamic-int8":
        return Quantization(scheme=target.scheme)
    reduce_range = bool(quantization_config(target, is_static=False).reduce_range)
    return Quantization(scheme=target.scheme, per_channel=True, reduce_range=reduce_range)


def _sign_side(
    src: Path,
    pair: SplitPair,
    role: Role,
    *,
    name: str,
    version: int,
    key: SigningKey,
    target: TargetProfile,
    store: Path,
) -> tuple[Path, Manifest]:
    art_name = split_artifact_name(name, pair.k, role)
    dest = artifact_dir(store, art_name, version, target.name)
    if (dest / MANIFEST_NAME).exists():
        raise SplitSigningError(
            f"{art_name} v{version} for {target.name} is already published at {dest}; "
            "versions only go up"
        )
    if not (src / MODEL_FILE).is_file():
        raise SplitSigningError(f"the {role} folder {src} has no {MODEL_FILE}")
    if dest.exists():
        shutil.rmtree(dest)  # a half-written earlier attempt: no manifest, never verified
    try:
        quantize(src, dest, target, task=pair.task, whole_model=False)
        inputs, outputs, opset = graph_specs(dest / MODEL_FILE)
        manifest = write_artifact(
            dest,
            name=art_name,
            version=version,
            task=pair.task,
            target=target.name,
            signing_key=key,
            inputs=inputs,
            outputs=outputs,
            quantization=_quantization(target),
            split=SplitInfo(role=role, split_point=pair.k),
            opset=opset,
        )
    except (CompressionError, ArtifactError) as exc:
        raise SplitSigningError(f"{art_name} v{version} for {target.name}: {exc}") from exc
    return dest, manifest


def sign_split(
    pair: SplitPair,
    name: str,
    version: int,
    key: SigningKey,
    target: TargetProfile | str,
    *,
    store: Path,
) -> SplitArtifacts:
    """Prepare head and tail for ``target`` and sign each as an artifact in ``store``.

    Static int8 needs calibration inputs that only a whole text model takes, so it is refused;
    use a dynamic int8 target. Raises :class:`SplitSigningError` (or
    :class:`~edgefed.cloud.compress.errors.UnknownTargetError` for an unknown target name).
    """
    profile = target_profile(target) if isinstance(target, str) else target
    if profile.scheme == "static-int8":
        raise SplitSigningError(
            f"target {profile.name!r} (static int8) cannot prepare split graphs: calibration "
            "feeds whole text models only; use a dynamic int8 target such as x86-avx2"
        )
    roles: tuple[tuple[Role, Path], ...] = (("head", pair.head_dir), ("tail", pair.tail_dir))
    sides = {
        role: _sign_side(
            src, pair, role, name=name, version=version, key=key, target=profile, store=store
        )
        for role, src in roles
    }
    (head_dir, head), (tail_dir, tail) = sides["head"], sides["tail"]
    return SplitArtifacts(head_dir=head_dir, tail_dir=tail_dir, head=head, tail=tail)
