"""Row 10: with 3 of 15 clients Byzantine (sign flip x10, Gaussian noise, label flip) the robust
strategies end within two accuracy points of the clean FedAvg baseline, while unprotected FedAvg
is visibly hurt by the update attacks (so the attacks are real)."""

from __future__ import annotations

import pytest

from tests.faults.drills import DrillResult
from tests.faults.drills import row10_byzantine_fl as row10


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> DrillResult:
    return row10.run(tmp_path_factory.mktemp("row10"))


def test_robust_strategies_stay_near_the_clean_baseline_under_every_attack(
    result: DrillResult,
) -> None:
    figures = result.figures
    baseline = figures["fedavg_clean"]
    assert isinstance(baseline, float)
    assert baseline > 0.8
    for name in row10.QUICK_ROBUST:
        for attack in row10.ATTACKS:
            attacked = figures[f"{name}_{attack}"]
            assert isinstance(attacked, float), (name, attack, result.notes)
            assert attacked >= baseline - row10.TOLERANCE, (name, attack, attacked, baseline)
    assert result.held, "\n".join(result.notes)


def test_the_update_attacks_do_hurt_fedavg(result: DrillResult) -> None:
    baseline = result.figures["fedavg_clean"]
    assert isinstance(baseline, float)
    for attack in ("sign_flip", "noise"):
        attacked = result.figures[f"fedavg_{attack}"]
        assert isinstance(attacked, float)
        assert attacked < baseline - row10.TOLERANCE, attack
