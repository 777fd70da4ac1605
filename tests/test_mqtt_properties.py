"""edgefed packs PUBLISH properties itself (paho's Properties is slow to build); the bytes must
be exactly what paho would send."""

from __future__ import annotations

import hashlib
import itertools

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefed.common.errors import ConfigError
from edgefed.common.mqtt import PublishProperties

CASES = {
    "content_type": [None, "application/json", "ü/ñ"],
    "correlation_data": [None, b"", bytes(range(16))],
    "response_topic": [None, "edgefed/v1/f/clients/c/replies"],
    "expiry_s": [None, 1, 2**32 - 1],
    "user_properties": [(), (("a", "b"),), (("k", "v1"), ("k", "v2"))],
}


def paho_pack(**kw: object) -> bytes:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if kw["content_type"] is not None:
        props.ContentType = kw["content_type"]
    if kw["correlation_data"] is not None:
        props.CorrelationData = kw["correlation_data"]
    if kw["response_topic"] is not None:
        props.ResponseTopic = kw["response_topic"]
    if kw["expiry_s"] is not None:
        props.MessageExpiryInterval = kw["expiry_s"]
    if kw["user_properties"]:
        props.UserProperty = list(kw["user_properties"])  # type: ignore[call-overload]
    return bytes(props.pack())  # type: ignore[no-untyped-call]


def _case_id(combo: tuple[object, ...]) -> str:
    """Stable across processes (pytest-xdist workers must collect the same ids)."""
    return hashlib.sha256(repr(combo).encode()).hexdigest()[:6]


@pytest.mark.parametrize("combo", list(itertools.product(*CASES.values())), ids=_case_id)
def test_publish_properties_pack_exactly_like_paho(combo: tuple[object, ...]) -> None:
    kw = dict(zip(CASES, combo, strict=True))
    assert PublishProperties(**kw).pack() == paho_pack(**kw)  # type: ignore[arg-type]


def test_a_long_property_block_uses_a_multi_byte_length() -> None:
    topic = "t/" + "x" * 300
    ours = PublishProperties(response_topic=topic).pack()
    assert ours == paho_pack(
        content_type=None,
        correlation_data=None,
        response_topic=topic,
        expiry_s=None,
        user_properties=(),
    )
    assert ours[0] & 0x80  # variable byte integer continues


def test_oversized_correlation_data_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="65535"):
        PublishProperties(correlation_data=b"x" * 70_000)
