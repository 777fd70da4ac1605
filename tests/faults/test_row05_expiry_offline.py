"""Row 5 of the fault suite: requests that expire while their agent is offline are never run
when it comes back, and their caller gets a timeout (real mosquitto, a real agent process
whose uplink is cut by the simulation's link proxy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .drills import row05_expiry_offline as row

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_requests_that_expire_while_the_agent_is_offline_never_run(tmp_path: Path) -> None:
    result = row.run(tmp_path)
    f = result.figures
    assert f["expired_executed"] == 0, result.notes
    assert f["caller_timeouts"] == f"{f['expiring_sent']}/{f['expiring_sent']}", result.notes
    # queued requests do reach the agent when it is back: the drill can see an execution
    assert f["live_served"] == "4/4", result.notes
    assert result.held
