"""A closed-loop load of inference requests through the router, with each request's fate
recorded: answered (by whom), failed with an explicit error (which), or lost (neither an
answer nor an error within its deadline plus a grace period: the caller was left waiting)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from edgefed.common.errors import EdgefedError
from edgefed.common.routing import Router

from .agent_fleet import inference

LOST_GRACE_S = 5.0


@dataclass
class LoadOutcome:
    ids: list[str] = field(default_factory=list)
    sent_at: dict[str, float] = field(default_factory=dict)
    """request id -> when it was sent (``time.monotonic()``)."""
    answered: dict[str, str] = field(default_factory=dict)
    """request id -> the target that answered."""
    failed: dict[str, str] = field(default_factory=dict)
    """request id -> the explicit error (type: message)."""
    lost: set[str] = field(default_factory=set)
    failed_over: int = 0
    """Requests answered after more than one attempt."""

    @property
    def by_target(self) -> Counter[str]:
        return Counter(self.answered.values())

    def summary_of_errors(self) -> Counter[str]:
        return Counter(e.split(":", 1)[0] for e in self.failed.values())


async def run_load(
    router: Router,
    n: int,
    *,
    concurrency: int,
    timeout_s: float,
    prefix: str,
    on_sent: Callable[[int], None] | None = None,
    extend_while: Callable[[], bool] | None = None,
) -> LoadOutcome:
    """Send ``n`` requests, ``concurrency`` at a time; ``on_sent(i)`` is called as request
    ``i`` (1-based) is sent. With ``extend_while``, requests go on past ``n`` while it returns
    true (a fault injected during the load then always meets requests in flight, however
    long it takes to set up)."""
    out = LoadOutcome()
    counter = itertools.count(1)

    async def one(i: int) -> None:
        request = inference(f"{prefix}-{i}")
        out.ids.append(request.request_id)
        out.sent_at[request.request_id] = time.monotonic()
        if on_sent is not None:
            on_sent(i)
        try:
            async with asyncio.timeout(timeout_s + LOST_GRACE_S):
                routed = await router.request(request, timeout=timeout_s)
        except TimeoutError:
            out.lost.add(request.request_id)
            return
        except EdgefedError as exc:
            out.failed[request.request_id] = f"{type(exc).__name__}: {exc}"
            return
        out.answered[request.request_id] = routed.target.id
        if len(routed.attempts) > 1:
            out.failed_over += 1

    async def worker() -> None:
        for i in counter:
            if i > n and (extend_while is None or not extend_while()):
                return
            await one(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out
