"""The manifest of a model artifact: what ``manifest.json`` holds and how it is parsed.

An artifact is a directory of model files (ONNX graphs, tokenizer files, configs) with a
``manifest.json`` that lists every file with its size and SHA-256, and a detached signature
``manifest.sig`` over the exact bytes of ``manifest.json`` (see :mod:`.signing`).

The manifest is written canonically (:meth:`Manifest.to_json_bytes`): UTF-8 JSON with sorted
keys, two-space indent, files sorted by path, a trailing newline. Building the same directory
twice with the same ``created_at`` gives the same bytes.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from edgefed.common.errors import ArtifactRejected, RejectReason
from edgefed.common.topics import ID_PATTERN

FORMAT_VERSION: Literal[1] = 1
"""The artifact format this module writes and reads."""
MANIFEST_NAME = "manifest.json"
"""File name of the manifest inside an artifact directory."""
SIGNATURE_NAME = "manifest.sig"
"""File name of the detached signature inside an artifact directory."""
RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
"""Top-level names that are part of the artifact format, never listed as files."""
MAX_MANIFEST_BYTES = 1024 * 1024
"""Largest ``manifest.json`` accepted; larger ones are rejected before they are parsed."""
MAX_PATH_BYTES = 4096
"""Longest file path (UTF-8 bytes) a manifest may list."""
MAX_SEGMENT_BYTES = 255
"""Longest path segment (UTF-8 bytes) a manifest may list."""

UNSAFE_PATH_ERROR = "unsafe_path"
"""Pydantic error type raised for an unsafe file path (mapped to ``RejectReason.UNSAFE_PATH``)."""

_NAME = re.compile(ID_PATTERN)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Task = Literal["feature-extraction", "text-classification", "text-generation"]
KeyId = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Dim = Annotated[int, Field(ge=0)] | Annotated[str, Field(min_length=1, max_length=64)]


def unsafe_path_problem(path: str) -> str | None:
    """Say what makes ``path`` unsafe as an artifact file path, or ``None`` when it is safe.

    A safe path is relative, POSIX (``/`` separators, no backslash), has no empty, ``.`` or
    ``..`` segments, no control characters (NUL included), is valid UTF-8 within
    :data:`MAX_PATH_BYTES` / :data:`MAX_SEGMENT_BYTES`, and is not ``manifest.json`` or
    ``manifest.sig``.
    """
    if not path:
        return "empty path"
    if "\x00" in path:
        return "contains a NUL byte"
    if _CONTROL.search(path):
        return "contains a control character"
    if "\\" in path:
        return "contains a backslash"
    if path.startswith("/"):
        return "is absolute"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if len(encoded) > MAX_PATH_BYTES:
        return f"is longer than {MAX_PATH_BYTES} bytes"
    for segment in path.split("/"):
        if segment == "":
            return "has an empty segment"
        if segment == "..":
            return "has a '..' segment"
        if segment == ".":
            return "has a '.' segment"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"has a segment longer than {MAX_SEGMENT_BYTES} bytes"
    if path in RESERVED_NAMES:
        return "is a reserved name of the artifact format"
    return None


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class FileEntry(_Frozen):
    """One file of an artifact: relative POSIX path, SHA-256 (lowercase hex) and size."""

    path: str
    sha256: Sha256Hex
    size: int = Field(ge=0)

    @field_validator("path")
    @classmethod
    def _path_is_safe(cls, v: str) -> str:
        problem = unsafe_path_problem(v)
        if problem is not None:
            raise PydanticCustomError(
                UNSAFE_PATH_ERROR,
                "file path {path} {problem}",
                {"path": repr(v), "problem": problem},
            )
        return v


class TensorSpec(_Frozen):
    """A graph input or output: name, ONNX element type, shape (str = symbolic dim)."""

    name: str = Field(min_length=1, max_length=256)
    dtype: str = Field(min_length=1, max_length=32)
    """ONNX element type name, e.g. ``int64``, ``float32``, ``float16``."""
    shape: list[Dim]
    """Dimensions; a string is a symbolic dimension such as ``"batch"`` or ``"sequence"``."""


class Quantization(_Frozen):
    """How the graph weights were quantized."""

    scheme: Literal["none", "dynamic-int8", "static-int8", "fp16"]
    per_channel: bool = False
    reduce_range: bool = False


class SplitInfo(_Frozen):
    """Which side of a split model this artifact is: head runs layers[0:k], tail layers[k:]."""

    role: Literal["head", "tail"]
    split_point: int = Field(ge=0)
    """The layer index k at which the model is cut."""


class Manifest(_Frozen):
    """Contents of ``manifest.json``."""

    format: Literal[1] = FORMAT_VERSION
    """Artifact format version."""
    name: str
    """Model name (a topic segment: letters, digits, ``_.-``, at most 64 characters)."""
    version: int = Field(ge=1)
    """Model version; only goes up (agents refuse older versions: rollback protection)."""
    task: Task
    files: list[FileEntry]
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    quantization: Quantization | None = None
    target: str = Field(min_length=1, max_length=64)
    """Device target profile, e.g. ``x86-avx2``, ``arm64``, ``jetson-fp16``."""
    split: SplitInfo | None = None
    parent_version: int | None = Field(default=None, ge=1)
    """Version this one was derived from (e.g. by a federated round); lower than ``version``."""
    metrics: dict[str, FiniteFloat] = Field(default_factory=dict)
    """Validation figures measured when the artifact was built (finite numbers)."""
    created_at: AwareDatetime
    """When the artifact was built (timezone-aware; stored as UTC)."""
    opset: int | None = Field(default=None, ge=1)
    """ONNX opset of the graphs."""
    key_id: KeyId
    """Id of the key that signs this manifest (see :func:`.signing.key_id`)."""

    @field_validator("name")
    @classmethod
    def _name_is_a_topic_segment(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                "name must be 1-64 characters of letters, digits, '_', '.', '-' "
                "and start with a letter or digit"
            )
        return v

    @field_validator("created_at")
    @classmethod
    def _in_utc(cls, v: datetime) -> datetime:
        return v.astimezone(UTC)

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        seen: set[str] = set()
        for entry in self.files:
            if entry.path in seen:
                raise ValueError(f"file {entry.path!r} is listed twice")
            seen.add(entry.path)
        if self.parent_version is not None and self.parent_version >= self.version:
            raise ValueError(
                f"parent_version {self.parent_version} must be lower than version {self.version}"
            )
        return self

    @property
    def total_size(self) -> int:
        """Sum of the sizes of all listed files."""
        return sum(entry.size for entry in self.files)

    def file(self, path: str) -> FileEntry:
        """The entry for ``path``; ``KeyError`` when it is not listed."""
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def to_json_bytes(self) -> bytes:
        """Canonical ``manifest.json`` bytes: sorted keys, files sorted by path."""
        data: dict[str, Any] = self.model_dump(mode="json")
        data["files"] = sorted(data["files"], key=lambda f: f["path"])
        text = json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
        return (text + "\n").encode("utf-8")


def parse_manifest(data: bytes) -> Manifest:
    """Parse ``manifest.json`` bytes.

    Raises :class:`ArtifactRejected` with ``OVERSIZED`` (more than :data:`MAX_MANIFEST_BYTES`),
    ``UNSAFE_PATH`` (a listed path is unsafe, see :func:`unsafe_path_problem`) or
    ``MALFORMED_MANIFEST`` (not JSON, or not the schema). Parsing authenticates nothing: check
    the signature over the same bytes first (:func:`.verify.verify` does).
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise ArtifactRejected(
            RejectReason.OVERSIZED,
            f"{MANIFEST_NAME} is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}",
        )
    try:
        return Manifest.model_validate_json(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        for err in errors:
            if err["type"] == UNSAFE_PATH_ERROR:
                raise ArtifactRejected(RejectReason.UNSAFE_PATH, err["msg"]) from exc
        raise ArtifactRejected(
            RejectReason.MALFORMED_MANIFEST, f"{MANIFEST_NAME}: {_describe(errors)}"
        ) from exc


def _describe(errors: list[Any]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return "; ".join(parts)
