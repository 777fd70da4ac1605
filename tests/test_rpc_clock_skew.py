"""An absolute deadline in a request is judged on the requester's clock, whatever the
responder's clock says: a device an hour off neither refuses requests that are on time nor
runs requests that are late (row 15 of the fault suite runs the same with libfaketime)."""

from __future__ import annotations

import time

import pytest

from edgefed.common.errors import ErrorCode
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.rpc import SENT_AT, Requester, serve
from edgefed.common.schemas import (
    Decoded,
    ErrorReply,
    InferenceReply,
    InferenceRequest,
    decode,
    encode,
)
from edgefed.common.settings import Settings
from edgefed.common.topics import Topics

pytestmark = pytest.mark.integration

HOUR = 3600.0


async def _ask(
    settings: Settings, topics: Topics, request: InferenceRequest, sent_at: float
) -> tuple[list[float | None], Message]:
    """Send ``request`` as a requester whose clock read ``sent_at`` when it sent it; returns
    the deadlines the handler saw and the reply."""
    seen: list[float | None] = []

    async def handler(req: Decoded[InferenceRequest], msg: Message) -> InferenceReply:
        seen.append(req.message.deadline)
        return InferenceReply(
            request_id=req.message.request_id, model="m", version=1, served_by="s"
        )

    target = topics.agent_infer("a1")
    async with (
        MqttClient.from_settings(settings, client_id="skewed-server") as srv,
        MqttClient.from_settings(settings, client_id="skewed-caller") as cli,
    ):
        await serve(srv, target, handler, expected=InferenceRequest)
        encoded = encode(request)
        reply = await Requester(cli, topics).request_raw(
            target,
            encoded.payload,
            content_type=encoded.content_type,
            timeout=5,
            user_properties=[(SENT_AT, repr(sent_at))],
        )
    return seen, reply


async def test_a_requester_an_hour_behind_is_served_before_its_deadline(
    settings: Settings, topics: Topics
) -> None:
    their_now = time.time() - HOUR
    request = InferenceRequest(model="m", texts=["on time"], deadline=their_now + 5)
    seen, reply = await _ask(settings, topics, request, their_now)
    assert decode(reply.payload, reply.content_type, InferenceReply).message.version == 1
    assert len(seen) == 1
    assert seen[0] is not None
    assert seen[0] == pytest.approx(time.time() + 5, abs=2)  # re-based onto this clock


async def test_a_late_request_from_a_requester_an_hour_ahead_is_refused_and_not_run(
    settings: Settings, topics: Topics
) -> None:
    their_now = time.time() + HOUR
    request = InferenceRequest(model="m", texts=["late"], deadline=their_now - 1)
    seen, reply = await _ask(settings, topics, request, their_now)
    error = decode(reply.payload, reply.content_type, ErrorReply).message
    assert error.code is ErrorCode.EXPIRED
    assert seen == []
