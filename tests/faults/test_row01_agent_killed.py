"""Row 1 of the fault suite: an agent SIGKILLed at request 300 of 1,000 and restarted 5 s
later loses no request and runs none twice (real mosquitto, real agent processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .drills import row01_agent_killed as row

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_an_agent_killed_under_load_loses_no_request_and_runs_none_twice(tmp_path: Path) -> None:
    result = row.run(tmp_path)
    f = result.figures
    assert f["lost"] == 0, result.notes
    assert f["duplicated"] == 0, result.notes
    assert f["requests"] == 1000
    assert f["answered"] == 1000 - int(f["failed"])  # each answered once or failed explicitly
    assert int(f["failed_over"]) > 0, "the kill hit no request in flight: it proved nothing"
    assert result.held, (f, result.notes)
