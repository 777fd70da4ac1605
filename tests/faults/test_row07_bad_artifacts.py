"""Row 7: a real agent process refuses every bad artifact the desired state names, each with its
specific reason, keeps serving the old model throughout, writes nothing outside its download
folder, and loads the good artifacts (no false rejects)."""

from __future__ import annotations

from pathlib import Path

from tests.faults.drills import row07_bad_artifacts as row07


def test_every_bad_artifact_is_refused_with_its_reason_and_the_old_model_keeps_serving(
    tmp_path: Path,
) -> None:
    result = row07.run(tmp_path)

    figures = result.figures
    assert figures["bad_artifacts"] == len(row07.BAD)
    assert figures["rejected_pct"] == 100.0, "\n".join(result.notes)
    assert figures["specific_reason_pct"] == 100.0, "\n".join(result.notes)
    assert figures["old_model_served_pct"] == 100.0, "\n".join(result.notes)
    assert figures["false_rejects"] == 0, "\n".join(result.notes)
    assert figures["escaped_files"] == 0, "\n".join(result.notes)
    assert result.held, "\n".join(result.notes)
