"""Reconnect backoff: full jitter, exponential growth, hard cap."""

from __future__ import annotations

import random

import pytest

from edgefed.common.mqtt import backoff_delay


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8])
def test_delay_stays_within_the_exponential_ceiling(attempt: int) -> None:
    rng = random.Random(attempt)
    ceiling = min(30.0, 0.2 * 2 ** (attempt - 1))

    delays = [backoff_delay(attempt, 0.2, 30.0, rng) for _ in range(500)]

    assert all(0 <= d <= ceiling for d in delays)


def test_delay_of_a_late_attempt_reaches_up_to_the_cap() -> None:
    rng = random.Random(1)

    delays = [backoff_delay(20, 0.2, 5.0, rng) for _ in range(500)]

    assert max(delays) > 4.5
    assert max(delays) <= 5.0


def test_delay_never_exceeds_the_cap_for_a_huge_attempt() -> None:
    rng = random.Random(2)

    delays = [backoff_delay(10_000, 0.2, 5.0, rng) for _ in range(500)]

    assert all(0 <= d <= 5.0 for d in delays)


def test_delays_are_jittered() -> None:
    rng = random.Random(3)

    delays = [backoff_delay(4, 0.2, 30.0, rng) for _ in range(100)]

    assert len(set(delays)) > 90


def test_ceiling_doubles_with_each_attempt() -> None:
    rng = random.Random(4)

    largest = [max(backoff_delay(a, 1.0, 1000.0, rng) for _ in range(300)) for a in (1, 2, 3, 4)]

    assert [round(x) for x in largest] == [1, 2, 4, 8]
