"""A token bucket per caller: ``rate_limit_per_minute`` requests a minute on average, bursts up
to ``rate_limit_burst`` (one minute's worth when unset); beyond it 429 with ``Retry-After``
(whole seconds until the bucket holds a request again).

Callers are keyed by API token id (``token:7``); calls without a valid bearer token (none,
unknown, expired, revoked, and agent enrolment) are keyed by client address
(``addr:10.0.0.5``), so rotating made-up tokens buys no fresh budget. Health probes and
``/metrics`` never reach the limiter (it is applied by the routes' dependencies, not a
middleware). State is in memory and per process: a restart forgets it, which only ever lets
requests through; several processes behind one address would each allow the full rate.

Hand-written rather than the ``limits`` package: that offers fixed and moving windows, not a
bucket that refills continuously, and the Retry-After a bucket gives is exact.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException, status


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets keyed by caller; thread-safe (sync routes run in a thread pool)."""

    MAX_KEYS = 10_000
    """Buckets kept before full (= idle) ones are dropped."""

    def __init__(
        self,
        per_minute: int,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        if burst is not None and burst < 1:
            raise ValueError("burst must be at least 1")
        self.per_minute = per_minute
        self.capacity = float(burst if burst is not None else per_minute)
        self.rate = per_minute / 60.0
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Take one request from ``key``'s bucket: 0.0 when allowed, else seconds to wait."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self.MAX_KEYS:
                    self._drop_full(now)
                bucket = self._buckets[key] = _Bucket(self.capacity, now)
            bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate

    def check(self, key: str) -> None:
        """Raise 429 with ``Retry-After`` when ``key`` is over its rate."""
        wait = self.acquire(key)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise HTTPException(
                status_code=status.HTTP_429_TOO_MANY_REQUESTS,
                detail=(
                    f"rate limit of {self.per_minute} requests per minute (bursts of "
                    f"{int(self.capacity)}) exceeded; retry in {seconds} s"
                ),
                headers={"Retry-After": str(seconds)},
            )

    def _drop_full(self, now: float) -> None:
        full = [
            k
            for k, b in self._buckets.items()
            if b.tokens + (now - b.updated) * self.rate >= self.capacity
        ]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.MAX_KEYS:  # everyone is busy: forget the oldest
            oldest = sorted(self._buckets, key=lambda k: self._buckets[k].updated)
            for k in oldest[: len(oldest) // 2]:
                del self._buckets[k]
