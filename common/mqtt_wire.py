"""Reading MQTT v5 PUBLISH packets without paho's generic property machinery.

paho-mqtt decodes the properties of every incoming message into a ``Properties`` object whose
constructor builds two dictionaries and whose attribute assignments scan its name table: about
40 us per message here, more than the rest of receiving it. A request/reply message carries at
most five properties, so :func:`parse_publish` reads them straight from the bytes (MQTT v5
section 3.3.2). It knows every property a PUBLISH may carry and refuses any other, like paho.

Pure Python, no paho: :mod:`edgefed.common.mqtt` calls it from its paho client and turns
:class:`MalformedPublish` into paho's ``MalformedPacket`` (the connection is then dropped, as
the specification asks for a malformed packet).
"""

from __future__ import annotations

from dataclasses import dataclass


class MalformedPublish(ValueError):
    """The PUBLISH packet does not follow MQTT v5 (the message says how)."""


@dataclass(frozen=True, slots=True)
class PublishFields:
    """What a v5 PUBLISH carries, with the properties edgefed reads."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    mid: int
    content_type: str | None = None
    correlation_data: bytes | None = None
    response_topic: str | None = None
    expiry_s: int | None = None
    user_properties: tuple[tuple[str, str], ...] = ()


# Property identifiers (MQTT v5 section 2.2.2.2) a PUBLISH may carry.
_PAYLOAD_FORMAT = 0x01
_MESSAGE_EXPIRY = 0x02
_CONTENT_TYPE = 0x03
_RESPONSE_TOPIC = 0x08
_CORRELATION_DATA = 0x09
_SUBSCRIPTION_ID = 0x0B
_TOPIC_ALIAS = 0x23
_USER_PROPERTY = 0x26


def parse_publish(header: int, packet: bytes | bytearray) -> PublishFields:
    """Decode a v5 PUBLISH: ``header`` is its first byte, ``packet`` what follows the fixed
    header (the remaining length). Raises :class:`MalformedPublish`."""
    try:
        return _parse(header, packet)
    except (IndexError, UnicodeDecodeError) as exc:
        raise MalformedPublish(f"malformed PUBLISH: {exc}") from exc


def _parse(header: int, packet: bytes | bytearray) -> PublishFields:
    qos = (header >> 1) & 0x03
    if qos == 3:
        raise MalformedPublish("PUBLISH with QoS 3")
    topic, pos = _string(packet, 0)
    mid = 0
    if qos:
        mid = (packet[pos] << 8) | packet[pos + 1]
        pos += 2
    length, pos = _varint(packet, pos)
    end = pos + length
    if end > len(packet):
        raise MalformedPublish("PUBLISH properties run past the end of the packet")
    content_type: str | None = None
    correlation: bytes | None = None
    response_topic: str | None = None
    expiry: int | None = None
    user: list[tuple[str, str]] = []
    while pos < end:
        ident = packet[pos]
        pos += 1
        if ident == _CORRELATION_DATA:
            size = (packet[pos] << 8) | packet[pos + 1]
            correlation = bytes(packet[pos + 2 : pos + 2 + size])
            pos += 2 + size
        elif ident == _RESPONSE_TOPIC:
            response_topic, pos = _string(packet, pos)
        elif ident == _MESSAGE_EXPIRY:
            expiry = int.from_bytes(packet[pos : pos + 4], "big")
            pos += 4
        elif ident == _CONTENT_TYPE:
            content_type, pos = _string(packet, pos)
        elif ident == _USER_PROPERTY:
            key, pos = _string(packet, pos)
            value, pos = _string(packet, pos)
            user.append((key, value))
        elif ident == _PAYLOAD_FORMAT:
            pos += 1
        elif ident == _TOPIC_ALIAS:
            pos += 2
        elif ident == _SUBSCRIPTION_ID:
            _, pos = _varint(packet, pos)
        else:
            raise MalformedPublish(f"property {ident:#04x} is not allowed in a PUBLISH")
    if pos != end:
        raise MalformedPublish("PUBLISH properties do not match their length")
    return PublishFields(
        topic=topic,
        payload=bytes(packet[end:]),
        qos=qos,
        retain=bool(header & 0x01),
        dup=bool(header & 0x08),
        mid=mid,
        content_type=content_type,
        correlation_data=correlation,
        response_topic=response_topic,
        expiry_s=expiry,
        user_properties=tuple(user),
    )


def _string(packet: bytes | bytearray, pos: int) -> tuple[str, int]:
    size = (packet[pos] << 8) | packet[pos + 1]
    start = pos + 2
    stop = start + size
    if stop > len(packet):
        raise MalformedPublish("a string runs past the end of the PUBLISH packet")
    return packet[start:stop].decode("utf-8"), stop


def _varint(packet: bytes | bytearray, pos: int) -> tuple[int, int]:
    value = 0
    for shift in (0, 7, 14, 21):
        byte = packet[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise MalformedPublish("a variable byte integer is longer than 4 bytes")
