"""Row 10: 3 of 15 federated clients are Byzantine; the robust strategies must end near the clean
baseline (within :data:`TOLERANCE` of clean FedAvg's accuracy), whatever the attack.

Attacks (the same 3 nodes, every round):

* ``sign_flip``: the update sign-flipped and scaled x10 (``w_g - 10 (w_i - w_g)``);
* ``noise``: ``w_g`` plus Gaussian noise (sigma :data:`NOISE_SIGMA`, larger than the weights);
* ``label_flip``: honest training on poisoned data (labels ``y -> C-1-y``).

Real Flower strategies and the real round loop over the toy softmax task through LocalGrid.
The validator's relative norm check is switched off (``norm_ratio=0``) so that the aggregation
rules themselves are measured: with the default limits the x10 and noise updates are dropped
before any rule sees them (row 11 and ``tests/cloud/federation/test_robustness.py``). FedAvg is
run too as the unprotected reference; it is not expected to hold.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgefed.cloud.federation.strategies import build_strategy
from edgefed.cloud.federation.validation import ValidationLimits
from tests.cloud.federation import toy
from tests.cloud.federation.conftest import run_toy
from tests.faults.drills import DrillResult, Figure
from tests.faults.drills.fl_attacks import Hook, gaussian_noise, label_flipped, tampering

ROW = 10
INJECT = "3 of 15 FL clients Byzantine: sign flip x10, Gaussian noise, label flip"
MUST_HOLD = "robust strategies end within 2 points of the clean FedAvg baseline"

CLIENTS = 15
ATTACKERS = {13, 14, 15}
"""Node ids (1-based); partitions 12, 13, 14."""
TOLERANCE = 0.02
NOISE_SIGMA = 5.0
ATTACKS = ("sign_flip", "noise", "label_flip")
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "fltrust")
QUICK_ROBUST = ("fedmedian", "krum", "fltrust")


def _accuracy(name: str, task: toy.Task, attack: str | None, rounds: int, workdir: Path) -> float:
    seen: dict[str, toy.Arrays] = {}
    hook: Hook | None = None
    if attack == "sign_flip":
        hook = toy.sign_flip_hook(ATTACKERS, seen)
    elif attack == "noise":
        hook = tampering(ATTACKERS, seen, gaussian_noise(NOISE_SIGMA))
    elif attack == "label_flip":
        task = label_flipped(task, {node - 1 for node in ATTACKERS})

    def root_update(server_round: int, arrays: toy.Arrays) -> toy.Arrays:
        return toy.train(arrays, *task.root, lr=1.0, steps=10)[0]

    strategy = build_strategy(
        name,
        min_train_nodes=CLIENTS,
        fraction_evaluate=0.0,
        num_malicious_nodes=len(ATTACKERS),
        root_update=root_update,
        limits=ValidationLimits(norm_ratio=0),
    )
    out = Path(tempfile.mkdtemp(prefix=f"{name}-{attack}-", dir=workdir))
    result = run_toy(strategy, task, out, rounds=rounds, reply_hook=hook, seen=seen)
    accuracy = result.progress["rounds"][-1]["eval_accuracy"]
    return float(accuracy)


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    robust = ROBUST if full else QUICK_ROBUST
    rounds = 6 if full else 4
    task = toy.make_task(CLIENTS, seed=0)
    figures: dict[str, Figure] = {}
    notes = [
        f"{CLIENTS} clients, nodes {sorted(ATTACKERS)} Byzantine, {rounds} rounds; "
        f"figures are final test accuracy; noise sigma {NOISE_SIGMA}; norm check off"
    ]
    held = True
    clean_fedavg = _accuracy("fedavg", task, None, rounds, workdir)
    for name in ("fedavg", *robust):
        clean = clean_fedavg if name == "fedavg" else _accuracy(name, task, None, rounds, workdir)
        figures[f"{name}_clean"] = round(clean, 4)
        for attack in ATTACKS:
            try:
                attacked = _accuracy(name, task, attack, rounds, workdir)
            except Exception as exc:  # noqa: BLE001 - a failed run is reported, not raised
                notes.append(f"{name} under {attack}: the run failed: {type(exc).__name__}: {exc}")
                figures[f"{name}_{attack}"] = "failed"
                held = held and name == "fedavg"
                continue
            figures[f"{name}_{attack}"] = round(attacked, 4)
            if name != "fedavg" and attacked < clean_fedavg - TOLERANCE:
                held = False
                notes.append(
                    f"{name} under {attack}: {attacked:.4f}, more than {TOLERANCE:g} below "
                    f"clean FedAvg {clean_fedavg:.4f}"
                )
    return DrillResult(ROW, figures, held, notes)
