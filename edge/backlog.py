"""Requests the broker re-delivers to the agent after its cloud link came back: run them only
when their sender still waits for this agent.

When the agent's link dies silently (a dead uplink: no TCP reset), the broker keeps sending it
requests until it notices, 1.5 keepalives later, and publishes the agent's last will; routers
then send every request they had in flight to it elsewhere, with the same request id. The
broker holds those requests unacknowledged in the agent's session and re-delivers them, marked
``dup``, when the agent reconnects. Run here as well, they would run twice: found by fault row
1's stalled-link variant (8 of 600 requests ran on both agents).

A re-delivered request (``dup``) whose sender fails over on the will (the router marks its
requests with :data:`~edgefed.common.rpc.FAILS_OVER`) is therefore refused with a retryable
error instead of run: nobody waits for its answer here. Other senders' re-deliveries (a client
waiting for this very agent) are served as before, within their expiry. A new agent process
needs none of this: it discards its predecessor's session (``clean_start="first"``).
"""

from __future__ import annotations

from edgefed.common.mqtt import Message
from edgefed.common.rpc import FAILS_OVER


def refuse_failed_over(message: Message) -> str | None:
    """The ``gate`` of the agent's cloud inference endpoint (:func:`edgefed.common.rpc.serve`):
    why ``message`` must not run, or ``None``."""
    if message.dup and message.user_property(FAILS_OVER[0]) == FAILS_OVER[1]:
        return "re-delivered after the agent's link came back: its router has sent it elsewhere"
    return None
