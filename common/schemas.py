"""Wire schemas: one pydantic model per MQTT payload, each carrying its kind and schema version.

A payload is either JSON (no content type, or ``application/json``) or, when it carries
tensors, a safetensors file (content type :data:`TENSORS_CONTENT_TYPE`, always set by edgefed)
whose metadata key ``envelope`` holds the same JSON. Every JSON object has ``"kind"`` (e.g.
``"inference-request"``) and ``"v"`` (the schema version of that kind). A receiver rejects a
kind it does not expect with :class:`UnknownKindError` and a version it does not speak with
:class:`UnsupportedSchemaVersion`, before looking at any other field.

Additive, optional fields do not change ``v``; anything else does. Unknown fields are ignored so
that an older receiver can read a newer sender's additive changes.
"""

from __future__ import annotations

import enum
import functools
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar, Union

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from edgefed.common.errors import (
    ErrorCode,
    PayloadError,
    UnknownKindError,
    UnsupportedSchemaVersion,
)
from edgefed.common.tensors import Compression, decode_tensors, encode_tensors
from edgefed.common.topics import ID_PATTERN

SCHEMA_VERSION = 1
JSON_CONTENT_TYPE = "application/json"
TENSORS_CONTENT_TYPE = "application/vnd.edgefed.tensors+safetensors"
ENVELOPE_KEY = "envelope"

Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
NonNegative = Annotated[float, Field(ge=0)]


def now() -> float:
    """Wall-clock time as carried on the wire: Unix seconds."""
    return time.time()


def new_id() -> str:
    """A fresh request / command id."""
    return uuid.uuid4().hex


class WireModel(BaseModel):
    """Base of every payload: ``kind`` + ``v`` and strict, immutable fields."""

    model_config = ConfigDict(extra="ignore", frozen=True, str_max_length=1_000_000)

    KIND: ClassVar[str]
    SUPPORTED_VERSIONS: ClassVar[frozenset[int]] = frozenset({SCHEMA_VERSION})

    v: StrictInt = SCHEMA_VERSION

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class Priority(enum.StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class AgentState(enum.StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    DRAINING = "draining"


class LoadedModel(BaseModel):
    """A model version an agent has loaded."""

    model_config = ConfigDict(frozen=True)

    name: Identifier
    version: int = Field(ge=1)
    role: Literal["full", "head", "tail"] = "full"
    providers: list[str] = Field(default_factory=list)


# --------------------------------------------------------------------------- agent presence


class AgentStatus(WireModel):
    """Retained on ``agents/<agent>/status``; the last will carries ``state=offline``."""

    KIND: ClassVar[str] = "agent-status"
    kind: Literal["agent-status"] = "agent-status"

    agent_id: Identifier
    state: AgentState
    ts: float = Field(default_factory=now)
    reason: str | None = None
    agent_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    device_profile: str | None = None
    models: list[LoadedModel] = Field(default_factory=list)


class GpuFigures(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    utilization_percent: NonNegative | None = None
    memory_used_bytes: int | None = Field(default=None, ge=0)
    memory_total_bytes: int | None = Field(default=None, ge=0)


class ResourceFigures(BaseModel):
    model_config = ConfigDict(frozen=True)

    cpu_percent: NonNegative
    memory_used_bytes: int = Field(ge=0)
    memory_total_bytes: int = Field(ge=0)
    load_average_1m: NonNegative | None = None
    gpus: list[GpuFigures] = Field(default_factory=list)


class LatencyFigures(BaseModel):
    """Recent latency of one model on the agent, in milliseconds."""

    model_config = ConfigDict(frozen=True)

    count: int = Field(ge=0)
    p50_ms: NonNegative
    p99_ms: NonNegative
    ewma_ms: NonNegative | None = None


class LinkFigures(BaseModel):
    """An agent's uplink as it measured it: round trip to the cloud broker and bandwidth."""

    rtt_ms: NonNegative
    bandwidth_mbps: float | None = Field(default=None, gt=0)
    """Estimated from large transfers (artifact downloads, split activations); ``None`` until
    one was big enough to tell."""
    samples: int = Field(default=0, ge=0)
    """How many measurements the figures summarise."""


class Heartbeat(WireModel):
    """Periodic on ``agents/<agent>/heartbeat``."""

    KIND: ClassVar[str] = "heartbeat"
    kind: Literal["heartbeat"] = "heartbeat"

    agent_id: Identifier
    seq: int = Field(ge=0)
    ts: float = Field(default_factory=now)
    resources: ResourceFigures
    queue_depth: dict[Priority, int] = Field(default_factory=dict)
    models: list[LoadedModel] = Field(default_factory=list)
    latency: dict[str, LatencyFigures] = Field(default_factory=dict)
    requests: dict[str, dict[str, int]] = Field(default_factory=dict)
    """Answered requests since the agent started, per model and outcome (``ok`` or an error
    code): rollout gates compute error rates from the difference of two heartbeats."""
    controller_rtt_ms: NonNegative | None = None
    link: LinkFigures | None = None
    """The agent's measured uplink (RTT and bandwidth towards the cloud), when it has one: the
    controller re-plans split placements from it."""


# --------------------------------------------------------------------------- desired state


class DesiredModel(BaseModel):
    """One model an agent should run."""

    model_config = ConfigDict(frozen=True)

    name: Identifier
    version: int = Field(ge=1)
    artifact_url: str
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: Literal["full", "head", "tail"] = "full"
    split_point: int | None = Field(default=None, ge=0)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    """Execution providers in order of preference; the agent uses those it has."""
    max_batch_size: int = Field(default=8, ge=1, le=1024)
    """Micro-batching: requests run together at most."""
    max_batch_wait_ms: float = Field(default=2.0, ge=0, le=1000)
    """Micro-batching: how long the first request of a batch may wait for company."""


class Placement(BaseModel):
    """Where an agent runs the requests its local applications send for one model: the split
    plan in force for this agent's device and link (:mod:`edgefed.cloud.split.plan`).

    ``edge``: the agent's own full model; ``cloud``: the worker pool ``pool``; ``split``: the
    head ``<model>.k<split_point>.head`` on the agent, the tail ``<model>.k<split_point>.tail``
    on the worker pool ``pool``. The agent's router treats the placement as its first choice
    and its expected latency as the prior estimate; measured round trips take over from there.
    ``keep_raw_input_on_device`` forbids sending raw input (texts) off the device at all.
    """

    model_config = ConfigDict(frozen=True)

    mode: Literal["edge", "cloud", "split"]
    split_point: int | None = Field(default=None, ge=0)
    pool: Identifier | None = None
    expected_ms: NonNegative | None = None
    keep_raw_input_on_device: bool = False
    reason: str | None = None
    """Why: e.g. the planner's figures for the link it was made for."""

    @model_validator(mode="after")
    def _consistent(self) -> Placement:
        if self.mode == "split" and self.split_point is None:
            raise ValueError("a split placement needs split_point")
        if self.mode != "split" and self.split_point is not None:
            raise ValueError(f"split_point is only for split placements, not {self.mode!r}")
        if self.mode in ("cloud", "split") and self.pool is None:
            raise ValueError(f"a {self.mode} placement needs the worker pool")
        if self.mode == "cloud" and self.keep_raw_input_on_device:
            raise ValueError("keep_raw_input_on_device forbids a cloud placement")
        return self


class DesiredState(WireModel):
    """Retained on ``agents/<agent>/desired``; ``generation`` only goes up."""

    KIND: ClassVar[str] = "desired-state"
    kind: Literal["desired-state"] = "desired-state"

    agent_id: Identifier
    generation: int = Field(ge=1)
    ts: float = Field(default_factory=now)
    models: list[DesiredModel] = Field(default_factory=list)
    placements: dict[Identifier, Placement] = Field(default_factory=dict)
    """Per model name: where local applications' requests run (absent: on the agent, with
    offload to the cloud as the agent's own routing settings allow)."""


# --------------------------------------------------------------------------- commands


class Command(WireModel):
    """A request on ``agents/<agent>/commands``; answered by a :class:`CommandAck`."""

    KIND: ClassVar[str] = "command"
    kind: Literal["command"] = "command"

    command_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    agent_id: Identifier
    action: Identifier
    args: dict[str, Any] = Field(default_factory=dict)
    ts: float = Field(default_factory=now)


class CommandAck(WireModel):
    KIND: ClassVar[str] = "command-ack"
    kind: Literal["command-ack"] = "command-ack"

    command_id: str = Field(min_length=1, max_length=128)
    agent_id: Identifier
    status: Literal["accepted", "done", "rejected", "failed"]
    detail: str | None = None
    result: dict[str, Any] = Field(default_factory=dict)


# --------------------------------------------------------------------------- inference


class InferenceRequest(WireModel):
    """A request to run a model. Tensor inputs travel in the safetensors payload."""

    KIND: ClassVar[str] = "inference-request"
    kind: Literal["inference-request"] = "inference-request"

    request_id: str = Field(default_factory=new_id, min_length=1, max_length=128)
    model: Identifier
    version: int | None = Field(default=None, ge=1)
    texts: list[str] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    priority: Priority = Priority.NORMAL
    deadline: float | None = None
    """Absolute deadline (Unix seconds) across hops; the MQTT message expiry bounds each hop."""


class InferenceReply(WireModel):
    KIND: ClassVar[str] = "inference-reply"
    kind: Literal["inference-reply"] = "inference-reply"

    request_id: str = Field(min_length=1, max_length=128)
    model: Identifier
    version: int = Field(ge=1)
    served_by: str
    outputs: dict[str, Any] = Field(default_factory=dict)
    timings_ms: dict[str, NonNegative] = Field(default_factory=dict)


class ErrorReply(WireModel):
    """The answer to any request that could not be served: never silence."""

    KIND: ClassVar[str] = "error"
    kind: Literal["error"] = "error"

    code: ErrorCode
    message: str
    request_id: str | None = None
    retryable: bool = False
    retry_after_s: NonNegative | None = None


# --------------------------------------------------------------------------- telemetry


class TelemetryRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1, max_length=128)
    ts: float
    value: float | None = None
    fields: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


class Telemetry(WireModel):
    """A batch of records on ``agents/<agent>/telemetry`` (queued while the uplink is down)."""

    KIND: ClassVar[str] = "telemetry"
    kind: Literal["telemetry"] = "telemetry"

    agent_id: Identifier
    seq: int = Field(ge=0)
    records: list[TelemetryRecord]


# --------------------------------------------------------------------------- worker load


class WorkerLoad(WireModel):
    """What a cloud worker did over the last ``interval_s``, on ``workers/<pool>/load/<worker>``
    (QoS 0, not retained: a lost report costs one interval's figures, a stale retained one
    would be counted as live load). The pool monitor sums a pool's reports into the
    autoscaler's sample. An *empty* message on the same topic (the worker's last will, or the
    goodbye of a worker that stops) says the worker is gone."""

    KIND: ClassVar[str] = "worker-load"
    kind: Literal["worker-load"] = "worker-load"

    worker_id: Identifier
    pool: Identifier
    seq: int = Field(ge=0)
    ts: float = Field(default_factory=now)
    interval_s: float = Field(gt=0)
    """Seconds the counts below cover (since the previous report, or the worker's start)."""
    arrivals: int = Field(ge=0)
    """Requests handed to the worker in the interval."""
    completed: int = Field(ge=0)
    """Requests answered in the interval (any outcome)."""
    failed: int = Field(default=0, ge=0)
    """Of ``completed``, those answered with an error."""
    queue_depth: int = Field(ge=0)
    """Requests waiting for the model at the end of the interval (all priorities)."""
    p95_ms: NonNegative | None = None
    """95th percentile latency (arrival to answer) of the successful requests of the interval;
    ``None`` when none succeeded."""
    cpu_cores: NonNegative
    """CPU cores the worker process used on average over the interval."""
    rss_bytes: int = Field(ge=0)
    ready: bool
    """Models loaded and warmed and the pool's subscription live: it takes requests."""


ALL_KINDS: dict[str, type[WireModel]] = {
    cls.KIND: cls
    for cls in (
        AgentStatus,
        Heartbeat,
        DesiredState,
        Command,
        CommandAck,
        InferenceRequest,
        InferenceReply,
        ErrorReply,
        Telemetry,
        WorkerLoad,
    )
}

# --------------------------------------------------------------------------- codec

M = TypeVar("M", bound=WireModel)


@dataclass(frozen=True, slots=True)
class Encoded:
    payload: bytes
    content_type: str | None
    """``None`` for JSON (the default, saving a property per message); set for tensors."""


@dataclass(frozen=True, slots=True)
class Decoded(Generic[M]):
    message: M
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def encode(
    message: WireModel,
    tensors: Mapping[str, np.ndarray] | None = None,
    *,
    compression: Compression = Compression.NONE,
) -> Encoded:
    """Serialise a message, with tensors when given, and say its content type."""
    if not tensors:
        return Encoded(message.to_json(), None)
    data = encode_tensors(
        tensors,
        compression=compression,
        metadata={ENVELOPE_KEY: message.model_dump_json()},
    )
    return Encoded(data, TENSORS_CONTENT_TYPE)


def decode(
    payload: bytes,
    content_type: str | None,
    expected: type[M] | Sequence[type[M]],
    *,
    max_bytes: int | None = None,
) -> Decoded[M]:
    """Parse ``payload`` as one of the ``expected`` kinds.

    Raises :class:`PayloadError` (malformed), :class:`UnknownKindError` or
    :class:`UnsupportedSchemaVersion`, each with a message naming what was wrong.
    """
    kinds = [expected] if isinstance(expected, type) else list(expected)
    if max_bytes is not None and len(payload) > max_bytes:
        raise PayloadError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    tensors: dict[str, np.ndarray] = {}
    if content_type == TENSORS_CONTENT_TYPE or (
        content_type is None
        and (_looks_like_safetensors(payload) or payload[:1] not in (b"{", b" ", b"\n"))
    ):
        decoded = decode_tensors(payload, max_bytes=max_bytes)
        envelope = decoded.metadata.get(ENVELOPE_KEY)
        if envelope is None:
            raise PayloadError(f"tensor payload has no {ENVELOPE_KEY!r} metadata")
        json_bytes = envelope.encode()
        tensors = decoded.tensors
    elif content_type in (None, JSON_CONTENT_TYPE, "application/json; charset=utf-8"):
        json_bytes = payload
    else:
        raise PayloadError(f"unsupported content type {content_type!r}")

    # Fast path: one pass of pydantic-core over the JSON. Anything it refuses goes through the
    # checks below, which say precisely what is wrong (kind, version, then fields).
    try:
        message = _adapter(tuple(kinds)).validate_json(json_bytes)
    except ValidationError:
        pass
    else:
        if {"kind", "v"} <= message.model_fields_set and message.v in message.SUPPORTED_VERSIONS:
            return Decoded(message, tensors)
    raw: Any = _parse_json(json_bytes)
    if not isinstance(raw, dict):
        raise PayloadError(f"payload must be a JSON object, got {type(raw).__name__}")
    kind = raw.get("kind")
    by_kind = {k.KIND: k for k in kinds}
    cls = by_kind.get(kind) if isinstance(kind, str) else None
    if cls is None:
        names = ", ".join(sorted(by_kind))
        raise UnknownKindError(f"payload kind {kind!r} is not one of: {names}")
    version = raw.get("v")
    if not isinstance(version, int) or isinstance(version, bool):
        raise PayloadError(f"{kind} payload has no integer schema version 'v' (got {version!r})")
    if version not in cls.SUPPORTED_VERSIONS:
        supported = ", ".join(str(x) for x in sorted(cls.SUPPORTED_VERSIONS))
        raise UnsupportedSchemaVersion(
            f"{kind} schema version {version} is not supported (this side speaks {supported})"
        )
    try:
        message = cls.model_validate(raw)
    except ValidationError as exc:
        raise PayloadError(f"invalid {kind} payload: {_describe(exc)}") from exc
    return Decoded(message, tensors)


@functools.lru_cache(maxsize=64)
def _adapter(kinds: tuple[type[M], ...]) -> TypeAdapter[M]:
    if len(kinds) == 1:
        return TypeAdapter(kinds[0])
    union: Any = Annotated[Union[kinds], Field(discriminator="kind")]  # noqa: UP007
    return TypeAdapter(union)


def error_reply_for(exc: PayloadError, request_id: str | None = None) -> ErrorReply:
    """The error reply that answers a payload this side could not accept."""
    return ErrorReply(code=exc.code, message=exc.message, request_id=request_id, retryable=False)


def peek_request_id(payload: bytes) -> str | None:
    """Best-effort request id of a payload that failed to decode (for the error reply)."""
    try:
        raw = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    rid = raw.get("request_id") if isinstance(raw, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None


def _looks_like_safetensors(payload: bytes) -> bool:
    """8-byte little-endian header length that fits the payload, then a JSON header.

    The first byte alone cannot tell: it is the low byte of the header length and may be ``' '``.
    """
    if len(payload) < 10 or payload[8:9] != b"{":
        return False
    header_len = int.from_bytes(payload[:8], "little")
    return 0 < header_len <= len(payload) - 8


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadError(f"payload is not valid JSON: {exc}") from exc


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    more = len(exc.errors()) - 5
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
