"""Row 3 of the fault suite: the agent's uplink to the cloud broker is cut (a link proxy
resets and refuses its connections); a local application keeps being served by the agent's
own model, and every served request the agent reported meanwhile reaches the cloud after the
link is back (real mosquitto, controller and agent processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .drills import row03_uplink_cut as row

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_a_cut_uplink_leaves_local_requests_served_and_loses_no_telemetry(
    tmp_path: Path,
) -> None:
    result = row.run(tmp_path)
    f = result.figures
    assert f["offline_seen"], "the controller never saw the agent offline: the cut cut nothing"
    assert f["served_locally_pct"] == 100.0, result.notes
    assert f["produced"] > 0
    assert f["delivered"] == f["produced"], result.notes
    assert f["telemetry_lost"] == 0, result.notes
    assert f["online_again"], result.notes
    assert result.held, (f, result.notes)
