"""Row 14 of the fault suite: the agent's disk (a tmpfs of its own, shrunk once v1 serves)
fills up during the download of v2; the download fails with a reason that names the full disk,
v1 keeps answering, and the partial download's space is given back (real mosquitto,
controller and agent processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .drills import row14_disk_full as row

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def test_a_disk_full_during_a_download_fails_cleanly_and_keeps_the_old_model(
    tmp_path: Path,
) -> None:
    result = row.run(tmp_path)
    f = result.figures
    assert f["failed_cleanly"], result.notes
    assert f["serving"] == "yes", result.notes
    assert f["requests_failed"] == 0, result.notes
    assert f["reclaimed"] == "yes", (f, result.notes)
    assert result.held, (f, result.notes)
