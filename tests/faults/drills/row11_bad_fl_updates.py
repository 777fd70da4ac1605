"""Row 11: malformed federated updates (NaN, Inf, a wrongly shaped tensor, a claimed 1e12
examples) must be dropped by the update validation before any strategy aggregates them, the
honest updates must all be kept, and the global model must stay finite.

Real Flower strategies, the real :class:`ValidatingStrategy` and round loop, driven through
:class:`LocalGrid` over the toy softmax task (the clients follow the message contract exactly;
the bad ones tamper with their reply after training, as a compromised device would). Every
round each bad client sends its kind of bad update, so ``rounds × kinds`` bad updates are sent
per strategy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edgefed.cloud.federation.strategies import build_strategy
from tests.cloud.federation import toy
from tests.cloud.federation.conftest import run_toy
from tests.faults.drills import DrillResult, Figure
from tests.faults.drills.fl_attacks import (
    Tamper,
    by_node,
    huge_count,
    inf_bias,
    nan_weight,
    tampering,
    wrong_shape,
)

ROW = 11
INJECT = "FL updates with NaN, Inf, a wrong shape, a claimed 1e12 examples"
MUST_HOLD = "rejected before aggregation (with the reason); honest ones kept; model stays finite"

CLIENTS = 11
KINDS: dict[str, tuple[Tamper, str]] = {
    "nan": (nan_weight, "NaN in 'weight'"),
    "inf": (inf_bias, "Inf in 'bias'"),
    "wrong_shape": (wrong_shape, "wrong shape for 'weight'"),
    "1e12_examples": (huge_count, "num-examples 1000000000000 exceeds the cap"),
}
"""Kind -> (tampering, what the rejection reason must say)."""
BAD_NODES = {kind: CLIENTS - i for i, kind in enumerate(KINDS)}
"""The last nodes are the bad ones, one kind each."""


def _finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(v).all()) for v in arrays.values())


def run(workdir: Path, *, full: bool = False) -> DrillResult:
    strategies = ("fedavg", "fedmedian", "krum", "fltrust") if full else ("fedavg", "krum")
    rounds = 5 if full else 2
    task = toy.make_task(CLIENTS, per_client=100, test_size=500, seed=11)
    sent = rejected = false_rejects = wrong_reason = 0
    finite = True
    notes: list[str] = []
    accuracy: dict[str, Figure] = {}
    for name in strategies:
        seen: dict[str, toy.Arrays] = {}
        hook = by_node(
            {node: tampering({node}, seen, KINDS[kind][0]) for kind, node in BAD_NODES.items()}
        )

        def root_update(server_round: int, arrays: toy.Arrays) -> toy.Arrays:
            return toy.train(arrays, *task.root, lr=1.0, steps=10)[0]

        strategy = build_strategy(
            name,
            min_train_nodes=CLIENTS,
            fraction_evaluate=0.0,
            num_malicious_nodes=1 if name == "krum" else 0,  # f of those that pass validation
            root_update=root_update,
        )
        out = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
        try:
            result = run_toy(strategy, task, out, rounds=rounds, reply_hook=hook, seen=seen)
        except Exception as exc:  # noqa: BLE001 - a crashed run is a broken property, reported
            notes.append(f"{name}: the run failed: {type(exc).__name__}: {exc}")
            finite = False
            continue
        finite = finite and _finite(result.arrays)
        last = result.progress["rounds"][-1].get("eval_accuracy")
        accuracy[f"accuracy_{name}"] = round(float(last), 4) if last is not None else "n/a"
        for server_round in range(1, rounds + 1):
            by_id = {r.node_id: r.reason for r in strategy.rejections.get(server_round, [])}
            for kind, node in BAD_NODES.items():
                sent += 1
                reason = by_id.pop(node, None)
                if reason is not None:
                    rejected += 1
                    if KINDS[kind][1] not in reason:
                        wrong_reason += 1
                        notes.append(f"{name} round {server_round} {kind}: reason {reason!r}")
            false_rejects += len(by_id)
            notes.extend(f"{name}: honest node {n} rejected: {r}" for n, r in by_id.items())
    pct = 100.0 * rejected / sent if sent else 0.0
    figures: dict[str, Figure] = {
        "bad_updates": sent,
        "rejected_pct": round(pct, 1),
        "wrong_reason": wrong_reason,
        "false_rejects": false_rejects,
        "finite": "yes" if finite else "no",
        **accuracy,
    }
    notes.insert(
        0,
        f"{CLIENTS} clients, {len(KINDS)} of them bad (one kind each), {rounds} rounds, "
        f"strategies {', '.join(strategies)}, default validation limits",
    )
    held = sent > 0 and rejected == sent and wrong_reason == 0 and false_rejects == 0 and finite
    return DrillResult(ROW, figures, held, notes)
