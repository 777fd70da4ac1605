"""edgefed reads incoming PUBLISH packets itself (paho's Properties is slow to build); it must
read exactly what paho reads, and refuse what paho refuses."""

from __future__ import annotations

import hashlib
import itertools
import struct

import pytest
from paho.mqtt import _packet
from paho.mqtt.enums import MQTTProtocolVersion
from paho.mqtt.exception import MalformedPacket

from edgefed.common.mqtt import PublishProperties
from edgefed.common.mqtt_wire import MalformedPublish, parse_publish

PROPERTIES = {
    "content_type": [None, "application/vnd.edgefed.tensors+safetensors", "ü/ñ"],
    "correlation_data": [None, b"", bytes(range(16))],
    "response_topic": [None, "edgefed/v1/f/clients/c/replies"],
    "expiry_s": [None, 1, 2**32 - 1],
    "user_properties": [(), (("k", "v1"), ("k", "v2"))],
}


def publish_packet(
    topic: str, payload: bytes, *, qos: int, mid: int = 7, props: bytes = b"\x00"
) -> tuple[int, bytes]:
    """(first header byte, the bytes after the fixed header) of a v5 PUBLISH."""
    header = 0x30 | (qos << 1) | 0x01  # retain
    body = struct.pack("!H", len(topic.encode())) + topic.encode()
    if qos:
        body += struct.pack("!H", mid)
    return header, body + props + payload


def _case_id(combo: tuple[object, ...]) -> str:
    """Stable across processes (pytest-xdist workers must collect the same ids)."""
    return hashlib.sha256(repr(combo).encode()).hexdigest()[:6]


@pytest.mark.parametrize("combo", list(itertools.product(*PROPERTIES.values())), ids=_case_id)
@pytest.mark.parametrize("qos", [0, 1])
def test_a_publish_reads_exactly_as_paho_reads_it(combo: tuple[object, ...], qos: int) -> None:
    kw = dict(zip(PROPERTIES, combo, strict=True))
    props = PublishProperties(**kw).pack()  # type: ignore[arg-type]
    header, packet = publish_packet(
        "edgefed/v1/f/agents/a/infer", b'{"x": 1}', qos=qos, props=props
    )

    ours = parse_publish(header, bytearray(packet))
    theirs = _packet.decode_publish(header, bytearray(packet), MQTTProtocolVersion.MQTTv5)

    assert ours.topic == theirs.topic.decode()
    assert ours.payload == bytes(theirs.payload)
    assert (ours.qos, ours.retain, ours.dup) == (theirs.qos, theirs.retain, theirs.dup)
    assert ours.mid == theirs.mid
    p = theirs.properties
    assert ours.content_type == getattr(p, "ContentType", None)
    assert ours.correlation_data == getattr(p, "CorrelationData", None)
    assert ours.response_topic == getattr(p, "ResponseTopic", None)
    assert ours.expiry_s == getattr(p, "MessageExpiryInterval", None)
    assert list(ours.user_properties) == list(getattr(p, "UserProperty", []))


def test_properties_edgefed_does_not_use_are_skipped() -> None:
    # payload format indicator, topic alias, subscription identifier (multi-byte), content type
    props_body = b"\x01\x01" + b"\x23\x00\x05" + b"\x0b\xc8\x01" + b"\x03\x00\x01j"
    header, packet = publish_packet("t", b"p", qos=1, props=bytes([len(props_body)]) + props_body)

    fields = parse_publish(header, packet)

    assert (fields.topic, fields.payload, fields.content_type) == ("t", b"p", "j")


MALFORMED = {
    "property not allowed in PUBLISH": b"\x02\x11\x00",  # session expiry interval
    "properties longer than the packet": b"\x7f\x03\x00",
    "string longer than the properties": b"\x04\x03\x00\x09a",
    "length does not match": b"\x03\x02\x00\x00",
}


@pytest.mark.parametrize("props", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_publish_is_refused_as_paho_refuses_it(props: bytes) -> None:
    header, packet = publish_packet("t", b"", qos=1, props=props)

    with pytest.raises(MalformedPacket):
        _packet.decode_publish(header, packet, MQTTProtocolVersion.MQTTv5)
    with pytest.raises(MalformedPublish):
        parse_publish(header, packet)


def test_a_truncated_publish_is_refused_with_a_clear_error() -> None:
    header, packet = publish_packet("edgefed/topic", b"", qos=1)

    with pytest.raises(MalformedPublish, match=r"malformed PUBLISH|past the end"):
        parse_publish(header, packet[:5])


def test_a_topic_that_is_not_utf8_is_refused() -> None:
    header = 0x32
    packet = b"\x00\x02\xff\xfe" + b"\x00\x01" + b"\x00"

    with pytest.raises(MalformedPublish):
        parse_publish(header, packet)
