"""Which re-delivered requests the agent refuses (:mod:`edgefed.edge.backlog`); the whole
story against real processes is fault row 1's stalled-link drill."""

from __future__ import annotations

import time

from edgefed.common.mqtt import Message
from edgefed.common.rpc import FAILS_OVER, SENT_AT
from edgefed.edge.backlog import refuse_failed_over


def _message(*, dup: bool, routed: bool) -> Message:
    props = [(SENT_AT, repr(time.time()))] + ([FAILS_OVER] if routed else [])
    return Message(
        topic="edgefed/v1/f/agents/a1/infer",
        payload=b"{}",
        qos=1,
        dup=dup,
        response_topic="edgefed/v1/f/clients/r/replies",
        user_properties=tuple(props),
    )


def test_a_routed_request_delivered_again_is_refused_with_a_reason() -> None:
    reason = refuse_failed_over(_message(dup=True, routed=True))
    assert reason is not None
    assert "sent it elsewhere" in reason


def test_first_deliveries_and_other_senders_re_deliveries_are_served() -> None:
    assert refuse_failed_over(_message(dup=False, routed=True)) is None
    assert refuse_failed_over(_message(dup=True, routed=False)) is None
