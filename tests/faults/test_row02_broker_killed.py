"""Row 2 of the fault suite: the broker (persistence on) SIGKILLed under load and restarted on
the same port loses no request and no control message (real mosquitto, real agent processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .drills import row02_broker_killed as row

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_a_broker_crash_under_load_loses_no_request_and_no_control_message(
    tmp_path: Path,
) -> None:
    result = row.run(tmp_path)
    f = result.figures
    assert f["control_lost"] == "0/2", result.notes
    assert f["lost"] == 0, result.notes
    assert f["failed"] == 0, result.notes
    assert f["answered"] == f["requests"] >= 400
    assert int(f["reissued"]) + int(f["retried"]) > 0, "the crash hit no request in flight"
    assert result.held, (f, result.notes)
