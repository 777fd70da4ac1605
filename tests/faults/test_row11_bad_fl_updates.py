"""Row 11: NaN, Inf, wrongly shaped and 1e12-example updates are rejected before aggregation,
each with a reason naming what was wrong; no honest update is rejected; the model stays finite."""

from __future__ import annotations

from pathlib import Path

from tests.faults.drills import row11_bad_fl_updates


def test_bad_updates_are_rejected_before_aggregation_and_the_model_stays_finite(
    tmp_path: Path,
) -> None:
    result = row11_bad_fl_updates.run(tmp_path)

    figures = result.figures
    assert figures["bad_updates"] == 2 * 2 * len(row11_bad_fl_updates.KINDS), "\n".join(
        result.notes
    )
    assert figures["rejected_pct"] == 100.0, "\n".join(result.notes)
    assert figures["wrong_reason"] == 0, "\n".join(result.notes)
    assert figures["false_rejects"] == 0, "\n".join(result.notes)
    assert figures["finite"] == "yes", "\n".join(result.notes)
    assert result.held
