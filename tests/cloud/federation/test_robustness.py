"""15 clients, 3 of them Byzantine (sign-flipped ×10 updates): the robust strategies end within 2
accuracy points of the clean FedAvg run, FedAvg itself does not.

The validator's relative norm check alone would drop these ×10 updates (see the last test), so
it is switched off here to test the aggregation rules themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefed.cloud.federation.strategies import build_strategy
from edgefed.cloud.federation.validation import ValidationLimits
from tests.cloud.federation import toy
from tests.cloud.federation.conftest import run_toy

CLIENTS = 15
ATTACKERS = {13, 14, 15}
ROUNDS = 6
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "fltrust")


@pytest.fixture(scope="module")
def task() -> toy.Task:
    return toy.make_task(CLIENTS, seed=0)


def _final_accuracy(
    name: str, task: toy.Task, out: Path, *, attack: bool, **options: object
) -> float:
    seen: dict[str, dict[str, np.ndarray]] = {}
    root = task.root

    def root_update(server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return toy.train(arrays, *root, lr=1.0, steps=10)[0]

    strategy = build_strategy(
        name,
        min_train_nodes=CLIENTS,
        fraction_evaluate=0.0,
        num_malicious_nodes=len(ATTACKERS),
        root_update=root_update,
        limits=options.pop("limits", ValidationLimits(norm_ratio=0)),  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )
    hook = toy.sign_flip_hook(ATTACKERS, seen) if attack else None
    result = run_toy(strategy, task, out, rounds=ROUNDS, reply_hook=hook, seen=seen)
    accuracy = result.progress["rounds"][-1]["eval_accuracy"]
    assert isinstance(accuracy, float)
    return accuracy


@pytest.fixture(scope="module")
def clean_fedavg(task: toy.Task, tmp_path_factory: pytest.TempPathFactory) -> float:
    return _final_accuracy("fedavg", task, tmp_path_factory.mktemp("clean"), attack=False)


def test_fedavg_breaks_under_the_attack(
    task: toy.Task, clean_fedavg: float, tmp_path: Path
) -> None:
    attacked = _final_accuracy("fedavg", task, tmp_path, attack=True)
    assert clean_fedavg > 0.8
    assert attacked < clean_fedavg - 0.02


@pytest.mark.parametrize("name", ROBUST)
def test_robust_strategies_stay_within_two_points_of_clean_fedavg(
    name: str, task: toy.Task, clean_fedavg: float, tmp_path: Path
) -> None:
    attacked = _final_accuracy(name, task, tmp_path, attack=True)
    assert attacked >= clean_fedavg - 0.02, f"{name}: {attacked:.4f} vs clean {clean_fedavg:.4f}"


def test_fltrust_gives_the_attackers_no_trust(task: toy.Task, tmp_path: Path) -> None:
    seen: dict[str, dict[str, np.ndarray]] = {}

    def root_update(server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return toy.train(arrays, *task.root, lr=1.0, steps=10)[0]

    strategy = build_strategy(
        "fltrust", min_train_nodes=CLIENTS, fraction_evaluate=0.0, root_update=root_update,
        limits=ValidationLimits(norm_ratio=0),
    )  # fmt: skip
    run_toy(
        strategy,
        task,
        tmp_path,
        rounds=2,
        reply_hook=toy.sign_flip_hook(ATTACKERS, seen),
        seen=seen,
    )
    fltrust = strategy.innermost
    scores = fltrust.trust_scores[2]  # type: ignore[attr-defined]
    assert all(scores[node] == 0.0 for node in ATTACKERS)
    assert all(scores[node] > 0.0 for node in range(1, CLIENTS + 1) if node not in ATTACKERS)


def test_default_validation_alone_drops_the_x10_updates(
    task: toy.Task, clean_fedavg: float, tmp_path: Path
) -> None:
    seen: dict[str, dict[str, np.ndarray]] = {}
    strategy = build_strategy("fedavg", min_train_nodes=CLIENTS, fraction_evaluate=0.0)
    result = run_toy(
        strategy,
        task,
        tmp_path,
        rounds=2,
        reply_hook=toy.sign_flip_hook(ATTACKERS, seen),
        seen=seen,
    )
    assert {r.node_id for r in strategy.rejections[2]} == ATTACKERS
    assert result.progress["rounds"][-1]["eval_accuracy"] > 0.8
