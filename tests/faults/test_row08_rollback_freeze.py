"""Row 8: an older, properly signed version in a newer desired state, an old desired state
replayed (also to an agent restarting) and the controller asked for an older version are all
refused; the agents' versions only go up, and a newer version still goes everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.drills import row08_rollback_freeze

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_older_versions_and_replayed_desired_states_are_refused(tmp_path: Path) -> None:
    result = row08_rollback_freeze.run(tmp_path)

    figures = result.figures
    assert figures["attempts"] == 3 + 3 + 1 + 1, result.notes
    assert figures["accepted"] == 0, result.notes
    assert figures["version_went_down"] == 0, result.notes
    assert figures["false_rejects"] == 0, result.notes
    assert result.held, result.notes
