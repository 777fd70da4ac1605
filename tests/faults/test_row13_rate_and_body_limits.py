"""Row 13: a token bursting ten times over its rate limit gets 429 with an honest Retry-After
while other tokens and the probes are still served; a 100 MB body, declared or streamed, gets
413 without the controller reading it."""

from __future__ import annotations

from pathlib import Path

from tests.faults.drills import row13_rate_and_body_limits as row13


def test_burst_is_limited_others_served_and_big_bodies_refused(tmp_path: Path) -> None:
    result = row13.run(tmp_path)
    figures = result.figures
    assert result.held, result.notes
    assert figures["others_refused"] == 0, result.notes
    assert isinstance(figures["pct_429"], float)
    assert 0 < figures["pct_429"] < 100, result.notes
    assert figures["burst_calls"] == 10 * row13.SIZES[False].burst
    assert figures["declared_100mb"] == 413
    assert figures["streamed_100mb"] == 413
