"""Row 9: a canary that crashes on load, one that fails 20 % of its requests and one whose
measured quality regressed are each stopped automatically (load gate, error-rate gate and
rollback; quality gate before anything is published), and no agent outside the canary set is
ever told to run a bad version or answers with one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.drills import row09_bad_canary

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_bad_canaries_are_stopped_and_rolled_back_and_go_no_further(tmp_path: Path) -> None:
    result = row09_bad_canary.run(tmp_path)

    figures = result.figures
    assert figures["rolled_back"] == 3, result.notes  # crash, errors, quality: all stopped
    assert figures["beyond_canary"] == 0, result.notes
    assert figures["failed_beyond_canary"] == 0, result.notes
    assert figures["crash_failed_requests"] == 0, result.notes  # the old version kept serving
    erred, cosine = figures["errors_failed_requests"], figures["regressed_cosine_mean"]
    assert isinstance(erred, int)
    assert isinstance(cosine, float)
    assert erred > 0, result.notes  # the bad version really answered with errors
    assert cosine < row09_bad_canary.MIN_COSINE, result.notes  # and the other really regressed
    assert result.held, result.notes
