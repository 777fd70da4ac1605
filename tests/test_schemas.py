"""Wire schemas: every kind round-trips, and every bad payload gets a precise PayloadError."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgefed.common.errors import (
    ErrorCode,
    PayloadError,
    TensorFormatError,
    UnknownKindError,
    UnsupportedSchemaVersion,
)
from edgefed.common.schemas import (
    ALL_KINDS,
    JSON_CONTENT_TYPE,
    TENSORS_CONTENT_TYPE,
    AgentState,
    AgentStatus,
    Command,
    CommandAck,
    DesiredModel,
    DesiredState,
    ErrorReply,
    Heartbeat,
    InferenceReply,
    InferenceRequest,
    LatencyFigures,
    LinkFigures,
    LoadedModel,
    Placement,
    Priority,
    ResourceFigures,
    Telemetry,
    TelemetryRecord,
    WireModel,
    WorkerLoad,
    decode,
    encode,
    error_reply_for,
    peek_request_id,
)
from edgefed.common.tensors import encode_tensors

EXAMPLES: dict[str, WireModel] = {
    "agent-status": AgentStatus(
        agent_id="a1",
        state=AgentState.ONLINE,
        agent_version="0.1.0",
        labels={"site": "plant-3"},
        models=[LoadedModel(name="minilm", version=2, providers=["CPUExecutionProvider"])],
    ),
    "heartbeat": Heartbeat(
        agent_id="a1",
        seq=7,
        resources=ResourceFigures(
            cpu_percent=12.5, memory_used_bytes=1 << 20, memory_total_bytes=1 << 30
        ),
        queue_depth={Priority.HIGH: 1, Priority.LOW: 3},
        latency={"minilm": LatencyFigures(count=10, p50_ms=3.5, p99_ms=9.0)},
        link=LinkFigures(rtt_ms=21.0, bandwidth_mbps=9.5, samples=4),
    ),
    "desired-state": DesiredState(
        agent_id="a1",
        generation=4,
        models=[
            DesiredModel(
                name="minilm",
                version=3,
                artifact_url="http://controller/api/v1/artifacts/minilm/3",
                manifest_sha256="ab" * 32,
                role="head",
                split_point=2,
            )
        ],
        placements={"minilm": Placement(mode="split", split_point=2, pool="tails")},
    ),
    "command": Command(agent_id="a1", action="reload", args={"force": True}),
    "command-ack": CommandAck(command_id="c1", agent_id="a1", status="done", result={"n": 1}),
    "inference-request": InferenceRequest(
        model="minilm", texts=["hello"], priority=Priority.HIGH, deadline=1e9
    ),
    "inference-reply": InferenceReply(
        request_id="r1",
        model="minilm",
        version=3,
        served_by="a1",
        outputs={"label": "positive"},
        timings_ms={"total": 4.2},
    ),
    "error": ErrorReply(code=ErrorCode.OVERLOADED, message="busy", retryable=True),
    "telemetry": Telemetry(
        agent_id="a1",
        seq=1,
        records=[TelemetryRecord(name="latency", ts=1.0, value=2.0, fields={"ok": True})],
    ),
    "worker-load": WorkerLoad(
        worker_id="worker-gpu-1",
        pool="gpu",
        seq=3,
        interval_s=5.0,
        arrivals=40,
        completed=38,
        failed=1,
        queue_depth=2,
        p95_ms=31.5,
        cpu_cores=1.5,
        rss_bytes=300_000_000,
        ready=True,
    ),
}


def request_json(**changes: object) -> bytes:
    raw = json.loads(InferenceRequest(request_id="r1", model="minilm").to_json())
    raw.update(changes)
    return json.dumps(raw).encode()


# --------------------------------------------------------------------------- round trips


def test_examples_cover_every_kind() -> None:
    assert set(EXAMPLES) == set(ALL_KINDS)


@pytest.mark.parametrize("kind", sorted(ALL_KINDS))
def test_every_kind_round_trips_through_json(kind: str) -> None:
    message = EXAMPLES[kind]

    encoded = encode(message)
    decoded = decode(encoded.payload, encoded.content_type, ALL_KINDS[kind])

    assert encoded.content_type is None  # JSON is the default: no property on the wire
    assert decoded.message == message
    assert decoded.tensors == {}
    assert decode(encoded.payload, JSON_CONTENT_TYPE, ALL_KINDS[kind]).message == message


def test_decode_picks_the_kind_among_several_expected() -> None:
    encoded = encode(EXAMPLES["error"])
    expected: list[type[WireModel]] = [InferenceReply, ErrorReply]

    decoded = decode(encoded.payload, encoded.content_type, expected)

    assert isinstance(decoded.message, ErrorReply)


def test_message_with_tensors_decodes_with_its_content_type() -> None:
    message = InferenceRequest(request_id="r1", model="minilm")
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)

    encoded = encode(message, {"input_ids": ids})
    decoded = decode(encoded.payload, encoded.content_type, InferenceRequest)

    assert encoded.content_type == TENSORS_CONTENT_TYPE
    assert decoded.message == message
    np.testing.assert_array_equal(decoded.tensors["input_ids"], ids)


def test_message_with_tensors_decodes_without_content_type() -> None:
    message = InferenceRequest(request_id="r1", model="minilm")
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)

    encoded = encode(message, {"input_ids": ids})
    decoded = decode(encoded.payload, None, InferenceRequest)

    assert decoded.message == message
    np.testing.assert_array_equal(decoded.tensors["input_ids"], ids)


def test_tensor_payload_whose_first_byte_is_a_space_is_sniffed_as_tensors() -> None:
    # The first byte of a safetensors buffer is the low byte of its (8-byte aligned) header
    # length, so it is a space whenever that length is 32 modulo 256.
    ids = np.zeros((2, 2), dtype=np.int64)
    for n in range(1, 600):
        message = InferenceRequest(request_id="r1", model="minilm", texts=["x" * n])
        payload = encode(message, {"input_ids": ids}).payload
        if payload[:1] == b" ":
            break
    else:
        pytest.fail("no tensor payload starting with a space was produced")

    decoded = decode(payload, None, InferenceRequest)

    assert decoded.message == message


def test_json_without_content_type_is_decoded() -> None:
    decoded = decode(request_json(), None, InferenceRequest)

    assert decoded.message.request_id == "r1"


def test_unknown_extra_fields_are_ignored() -> None:
    payload = request_json(added_in_a_later_release={"x": 1})

    decoded = decode(payload, JSON_CONTENT_TYPE, InferenceRequest)

    assert decoded.message.model == "minilm"


# --------------------------------------------------------------------------- refusals


def test_unsupported_version_is_refused_naming_the_version() -> None:
    with pytest.raises(UnsupportedSchemaVersion, match="version 99"):
        decode(request_json(v=99), JSON_CONTENT_TYPE, InferenceRequest)


def test_unexpected_kind_is_refused() -> None:
    payload = encode(EXAMPLES["heartbeat"]).payload

    with pytest.raises(UnknownKindError, match="heartbeat"):
        decode(payload, JSON_CONTENT_TYPE, InferenceRequest)


def test_payload_without_kind_is_refused_as_unknown_kind() -> None:
    raw = json.loads(request_json())
    del raw["kind"]

    with pytest.raises(UnknownKindError):
        decode(json.dumps(raw).encode(), JSON_CONTENT_TYPE, InferenceRequest)


def test_missing_version_is_malformed() -> None:
    raw = json.loads(request_json())
    del raw["v"]

    with pytest.raises(PayloadError, match="'v'") as info:
        decode(json.dumps(raw).encode(), JSON_CONTENT_TYPE, InferenceRequest)

    assert info.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize("version", ["1", 1.0, True, None])
def test_non_integer_version_is_malformed(version: object) -> None:
    with pytest.raises(PayloadError) as info:
        decode(request_json(v=version), JSON_CONTENT_TYPE, InferenceRequest)

    assert info.value.code is ErrorCode.MALFORMED


def test_non_json_payload_is_malformed() -> None:
    with pytest.raises(PayloadError, match="not valid JSON"):
        decode(b"{not json", JSON_CONTENT_TYPE, InferenceRequest)


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"text"', b"42", b"null"])
def test_json_that_is_not_an_object_is_malformed(payload: bytes) -> None:
    with pytest.raises(PayloadError, match="JSON object"):
        decode(payload, JSON_CONTENT_TYPE, InferenceRequest)


def test_unsupported_content_type_is_refused() -> None:
    with pytest.raises(PayloadError, match="text/plain"):
        decode(request_json(), "text/plain", InferenceRequest)


def test_validation_error_names_the_field_path() -> None:
    raw = json.loads(encode(EXAMPLES["heartbeat"]).payload)
    raw["resources"]["cpu_percent"] = -1

    with pytest.raises(PayloadError, match=r"resources\.cpu_percent"):
        decode(json.dumps(raw).encode(), JSON_CONTENT_TYPE, Heartbeat)


def test_invalid_identifier_is_refused() -> None:
    with pytest.raises(PayloadError, match="model"):
        decode(request_json(model="a/b"), JSON_CONTENT_TYPE, InferenceRequest)


def test_payload_over_the_byte_limit_is_refused() -> None:
    payload = request_json()

    with pytest.raises(PayloadError, match="exceeds"):
        decode(payload, JSON_CONTENT_TYPE, InferenceRequest, max_bytes=len(payload) - 1)


def test_payload_at_the_byte_limit_is_accepted() -> None:
    payload = request_json()

    decoded = decode(payload, JSON_CONTENT_TYPE, InferenceRequest, max_bytes=len(payload))

    assert decoded.message.request_id == "r1"


def test_safetensors_without_envelope_is_malformed() -> None:
    payload = encode_tensors({"x": np.ones(3, dtype=np.float32)})

    with pytest.raises(PayloadError, match="envelope"):
        decode(payload, TENSORS_CONTENT_TYPE, InferenceRequest)


def test_corrupt_tensor_payload_is_malformed() -> None:
    payload = encode(InferenceRequest(model="minilm"), {"x": np.ones(3)}).payload

    with pytest.raises(PayloadError):
        decode(payload[:-5], TENSORS_CONTENT_TYPE, InferenceRequest)


# --------------------------------------------------------------------------- error replies


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PayloadError("bad"), ErrorCode.MALFORMED),
        (TensorFormatError("bad"), ErrorCode.MALFORMED),
        (UnknownKindError("bad"), ErrorCode.UNKNOWN_KIND),
        (UnsupportedSchemaVersion("bad"), ErrorCode.UNSUPPORTED_VERSION),
    ],
)
def test_error_reply_carries_the_code_of_the_payload_error(
    error: PayloadError, code: ErrorCode
) -> None:
    reply = error_reply_for(error, request_id="r1")

    assert reply.code is code
    assert reply.request_id == "r1"
    assert reply.message == "bad"
    assert reply.retryable is False


def test_error_reply_for_a_real_decode_failure_round_trips() -> None:
    with pytest.raises(UnsupportedSchemaVersion) as info:
        decode(request_json(v=2), JSON_CONTENT_TYPE, InferenceRequest)
    reply = error_reply_for(info.value, peek_request_id(request_json(v=2)))

    decoded = decode(encode(reply).payload, JSON_CONTENT_TYPE, ErrorReply)

    assert decoded.message.code is ErrorCode.UNSUPPORTED_VERSION
    assert decoded.message.request_id == "r1"


def test_peek_request_id_finds_the_id_of_an_invalid_payload() -> None:
    payload = request_json(v=99, model="not/valid")

    assert peek_request_id(payload) == "r1"


@pytest.mark.parametrize(
    "payload",
    [b"\x00\xffgarbage", b"[1]", b'{"request_id": 5}', b'{"request_id": ""}', b"{}"],
)
def test_peek_request_id_returns_none_without_a_usable_id(payload: bytes) -> None:
    assert peek_request_id(payload) is None


# --------------------------------------------------------------------------- placements


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"mode": "split", "pool": "tails"}, "needs split_point"),
        ({"mode": "edge", "split_point": 2}, "only for split placements"),
        ({"mode": "cloud"}, "needs the worker pool"),
        ({"mode": "split", "split_point": 1}, "needs the worker pool"),
        ({"mode": "cloud", "pool": "p", "keep_raw_input_on_device": True}, "forbids a cloud"),
        ({"mode": "somewhere"}, "mode"),
    ],
)
def test_an_inconsistent_placement_is_refused_saying_why(
    fields: dict[str, object], complaint: str
) -> None:
    raw = json.loads(DesiredState(agent_id="a1", generation=1).to_json())
    raw["placements"] = {"minilm": fields}
    with pytest.raises(PayloadError, match=complaint):
        decode(json.dumps(raw).encode(), None, DesiredState)


def test_a_desired_state_from_an_older_controller_has_no_placements() -> None:
    raw = json.loads(DesiredState(agent_id="a1", generation=1).to_json())
    del raw["placements"]
    state = decode(json.dumps(raw).encode(), None, DesiredState).message
    assert state.placements == {}
    assert Placement(mode="edge").pool is None
