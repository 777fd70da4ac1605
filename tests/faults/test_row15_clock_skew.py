"""Row 15 of the fault suite: agents whose clocks are an hour ahead and an hour behind (real
processes under libfaketime, the real controller and mosquitto on the host's clock) join,
download with their tokens, stay online on the controller, show a last_seen on its clock, go
offline when stopped, serve requests that are on time and refuse the late ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from .drills import row15_clock_skew as row

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_an_hour_of_clock_skew_either_way_breaks_no_token_heartbeat_or_deadline(
    tmp_path: Path,
) -> None:
    result = row.run(tmp_path)
    assert result.figures["errors"] == 0, result.notes
    assert result.held, (result.figures, result.notes)
