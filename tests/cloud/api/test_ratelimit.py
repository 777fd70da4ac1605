"""The token bucket behind the API's 429s, on a clock the test moves: the burst, the refill
and the Retry-After it computes."""

from __future__ import annotations

import pytest
from fastapi import HTTPException

from edgefed.cloud.api.ratelimit import RateLimiter
from edgefed.cloud.settings import load_cloud_settings
from edgefed.common.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_the_sustained_rate_with_retry_after_from_the_bucket() -> None:
    clock = Clock()
    limiter = RateLimiter(60, burst=5, clock=clock)  # one a second, five at once
    assert [limiter.acquire("token:1") for _ in range(5)] == [0.0] * 5
    assert limiter.acquire("token:1") == pytest.approx(1.0)
    with pytest.raises(HTTPException) as refused:
        limiter.check("token:1")
    assert refused.value.status_code == 429
    assert refused.value.headers == {"Retry-After": "1"}
    assert "60 requests per minute (bursts of 5)" in str(refused.value.detail)
    # Another caller has its own bucket.
    assert limiter.acquire("token:2") == 0.0
    clock.now += 0.5
    assert limiter.acquire("token:1") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.acquire("token:1") == 0.0
    # Idle for long: the bucket refills to the burst, no further.
    clock.now += 3600
    assert [limiter.acquire("token:1") for _ in range(6)][-2:] == [0.0, pytest.approx(1.0)]


def test_retry_after_rounds_up_to_whole_seconds() -> None:
    clock = Clock()
    limiter = RateLimiter(6, burst=1, clock=clock)  # one every 10 s
    limiter.check("addr:10.0.0.5")
    clock.now += 0.5
    with pytest.raises(HTTPException) as refused:
        limiter.check("addr:10.0.0.5")
    assert refused.value.headers == {"Retry-After": "10"}


def test_burst_defaults_to_a_minute_and_bad_settings_are_refused() -> None:
    assert RateLimiter(120).capacity == 120
    ctl = load_cloud_settings(controller={"rate_limit_per_minute": 30, "rate_limit_burst": 4})
    assert ctl.controller.rate_limit_burst == 4
    with pytest.raises(ConfigError, match="rate_limit_burst"):
        load_cloud_settings(controller={"rate_limit_burst": 0})
    with pytest.raises(ValueError, match="burst must be at least 1"):
        RateLimiter(10, burst=0)
