"""Row 4: a controller SIGKILLed mid-rollout resumes the rollout after a restart; the agents
answer every request meanwhile; nothing is deployed, published or loaded twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.drills import row04_controller_killed

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_a_controller_killed_mid_rollout_resumes_it_and_agents_keep_serving(
    tmp_path: Path,
) -> None:
    result = row04_controller_killed.run(tmp_path)

    figures = result.figures
    down = figures["requests_while_down"]
    assert isinstance(down, int)
    assert down > 0, result.notes  # the agents were asked while the controller was down
    assert figures["failed_requests"] == 0, result.notes
    assert figures["duplicate_deployments"] == 0, result.notes
    assert figures["completed"] == figures["kills"], result.notes  # resumed and finished
    assert result.held, result.notes
