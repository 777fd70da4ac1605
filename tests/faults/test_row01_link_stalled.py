"""Row 1, stalled-link variant: requests the router failed over when an agent's silent uplink
ended in its last will are not run again when the broker re-delivers them to the reconnected
agent (real mosquitto, real agent processes, the simulation's link proxy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .drills import stalled_link as row

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_requests_failed_over_on_a_silent_link_do_not_run_again_after_it_returns(
    tmp_path: Path,
) -> None:
    result = row.run(tmp_path)
    f = result.figures
    assert f["lost"] == 0, result.notes
    assert f["rerun_after_reconnect"] == 0, result.notes
    assert f["requests"] == 600
    assert f["answered"] == 600 - int(f["failed"])
    assert int(f["failed_over"]) > 0, "the stall caught no request in flight: it proved nothing"
    assert result.held, (f, result.notes)
