"""Federated learning on chatterbot-corpus (issue 8): convergence, robustness, overhead, scale.

The task: which chatterbot-corpus category does a question belong to (~550 train questions,
18 categories), a tiny BERT trained from scratch by edgefed's real ClientApp handlers, with
the server's held-out questions scored after every round by edgefed's ServerApp. Clients hold
Dirichlet(alpha) label-skewed partitions (``simulation.federation_data``).

Figures (and which path runs them):

1. ``rounds_to_target``: rounds until held-out accuracy reaches ``--target`` for FedAvg and
   FedProx (mu 0.1) on alpha = 0.3 (in-process grid, same seed and data for both).
2. ``final_accuracy``: every strategy (fedavg, fedprox, fedtrimmedavg, fedmedian, krum,
   multikrum, bulyan, fltrust) on 15 clients, clean vs 3 of 15 (20 %) Byzantine clients whose
   update is sign-flipped and scaled x10 (injected around the ClientApp's replies, not in it).
   Update validation's norm-ratio check is OFF here (``norm-ratio 0``): with it on it rejects
   x10 updates before any aggregator sees them, which would hide the aggregators' own
   robustness; the row ``fedavg+validation`` shows what validation alone does. Target: each
   robust strategy within 2 accuracy points of its clean run while FedAvg is not.
3. ``overhead_ratio``: seconds per round of edgefed's ServerApp (validation, progress file,
   wrappers) / a plain Flower FedAvg loop (``FedAvg.start``) with the same ClientApp, model,
   data, server-side evaluation and in-process grid, interleaved run by run (target <= 1.2).
4. ``scale``: one round with ``--scale-clients`` (1,000) simulated clients in Flower's
   simulation engine (SuperLink + Ray): wall time and peak RSS of the whole process tree.
   Clients without data (1,000 clients over ~550 examples) refuse with an error reply and are
   counted as rejected.

``--quick`` shrinks every part (fewer rounds and steps, 4 strategies, 100 clients for scale)
and still takes a few minutes on 2 cores: training, not the framework, dominates.

    python bench/federation.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from edgefed.simulation.federation_data import FederationData, prepare_federation_data
from edgefed.simulation.federation_sim import (
    FederationOutcome,
    federation_run_config,
    run_engine,
    run_in_process,
)

ROBUST = ("fedtrimmedavg", "fedmedian", "krum", "multikrum", "bulyan", "fltrust")
ALL = ("fedavg", "fedprox", *ROBUST)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(
    data: FederationData, out: Path, strategy: str, *, byzantine: int = 0, **kw: Any
) -> FederationOutcome:
    n = data.num_clients
    config = federation_run_config(
        data,
        out,
        strategy=strategy,
        min_train_nodes=n,
        min_valid_updates=1,
        krum_byzantine=byzantine if strategy in ("krum", "multikrum", "bulyan") else 0,
        **kw,
    )
    return run_in_process(config, num_clients=n, byzantine=range(byzantine))


def convergence(data: FederationData, work: Path, rounds: int, steps: int, target: float) -> Any:
    out: dict[str, Any] = {}
    for strategy in ("fedavg", "fedprox"):
        o = _run(data, work / f"conv-{strategy}", strategy, rounds=rounds, local_steps=steps)
        out[strategy] = {
            "rounds_to_target": o.rounds_to(target),
            "accuracy_per_round": o.accuracies,
            "status": o.status,
        }
        _log(f"convergence {strategy}: {o.accuracies}")
    return out


def robustness(
    data: FederationData, work: Path, strategies: tuple[str, ...], rounds: int, steps: int
) -> dict[str, dict[str, Any]]:
    f = round(0.2 * data.num_clients)
    table: dict[str, dict[str, Any]] = {}
    rows = [(s, 0.0) for s in strategies] + [("fedavg+validation", 5.0)]
    for name, ratio in rows:
        strategy = name.split("+")[0]
        row: dict[str, Any] = {}
        for label, byz in (("clean", 0), ("byzantine", f)):
            o = _run(
                data,
                work / f"rob-{name}-{label}",
                strategy,
                byzantine=byz,
                rounds=rounds,
                local_steps=steps,
                norm_ratio=ratio,
            )
            row[label] = o.final_accuracy if o.status == "succeeded" else None
            row[f"{label}_status"] = o.status if o.status == "succeeded" else o.error
            rejected = sum(len(r.rejected) for r in o.rounds)
            row[f"{label}_rejected"] = rejected
        if row["clean"] is not None and row["byzantine"] is not None:
            row["drop_points"] = 100 * (row["clean"] - row["byzantine"])
        else:
            row["drop_points"] = None
        table[name] = row
        _log(f"robustness {name}: {row}")
    return table


def overhead(data: FederationData, work: Path, reps: int, rounds: int, steps: int) -> Any:
    """Ours vs a plain Flower FedAvg loop over the same in-process grid, interleaved."""
    ours: list[float] = []
    plain: list[float] = []
    for rep in range(reps):
        o = _run(data, work / f"ovh-ours-{rep}", "fedavg", rounds=rounds, local_steps=steps)
        ours.append(o.wall_s / rounds)
        plain.append(_plain_fedavg(data, rounds, steps) / rounds)
        _log(f"overhead rep {rep}: ours {ours[-1]:.2f} s/round, plain {plain[-1]:.2f} s/round")
    return {
        "ours_s_per_round": statistics.median(ours),
        "plain_flower_s_per_round": statistics.median(plain),
        "ratio": statistics.median(ours) / statistics.median(plain),
    }


def _plain_fedavg(data: FederationData, rounds: int, steps: int) -> float:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg

    from edgefed.cloud.federation.local_grid import LocalGrid, by_message_type
    from edgefed.cloud.federation.records import to_numpy, to_record
    from edgefed.common.learning import read_local_dataset
    from edgefed.common.training import FederatedModel, TrainSettings, evaluate
    from edgefed.edge.training.client_app import handle_evaluate, handle_train

    run_config = federation_run_config(data, Path("/nonexistent"), local_steps=steps)
    started = time.monotonic()
    fm = FederatedModel.from_dir(data.model_dir)
    settings = TrainSettings(local_steps=steps, lr=float(run_config["lr"]), batch_size=16,
                             max_seq_len=32)  # fmt: skip
    examples = read_local_dataset(data.eval_path, fm.task, fm.label2id)
    grid = LocalGrid(
        by_message_type(train=handle_train, evaluate=handle_evaluate),
        data.num_clients,
        run_config=dict(run_config),
    )
    config = ConfigRecord(
        {
            **settings.to_config(),
            "task": fm.task,
            "model-config": fm.config_json,
            "tokenizer": fm.tokenizer_json,
            "model-digest": fm.digest,
        }
    )

    def server_eval(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        fm.load_arrays(to_numpy(arrays))
        o = evaluate(fm, examples, settings)
        return MetricRecord({"eval-loss": o.loss, "eval-accuracy": o.accuracy})

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=data.num_clients,
        min_available_nodes=data.num_clients,
    )
    strategy.start(
        grid=grid,
        initial_arrays=to_record(fm.arrays()),
        num_rounds=rounds,
        train_config=config,
        evaluate_fn=server_eval,
    )
    return time.monotonic() - started


def scale(clients: int, work: Path, cache: Path) -> dict[str, Any]:
    data = prepare_federation_data(clients=clients, alpha=0.3, seed=0, cache_dir=cache)
    config = federation_run_config(
        data,
        work / "scale",
        rounds=1,
        local_steps=1,
        min_train_nodes=clients,
        min_valid_updates=1,
        max_seq_len=16,
    )
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += p.memory_info().rss
            peak[0] = max(peak[0], total)
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        o = run_engine(config, num_supernodes=clients, work_dir=work / "scale-work", timeout_s=3000)
    finally:
        done.set()
        sampler.join()
    r = o.rounds[0] if o.rounds else None
    return {
        "clients": clients,
        "clients_with_data": clients - len(data.empty_clients),
        "status": o.status,
        "wall_s": o.wall_s,
        "round_s": r.seconds if r else None,
        "accepted": r.accepted if r else 0,
        "rejected": len(r.rejected) if r else 0,
        "peak_rss_bytes": peak[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a reduced run (minutes)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--target", type=float, default=0.5, help="accuracy target (0.5)")
    parser.add_argument("--scale-clients", type=int, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args()
    quick = args.quick
    rounds = 3 if quick else 10
    steps = 3 if quick else 10
    strategies = ("fedavg", "fedmedian", "krum", "fltrust") if quick else ALL
    scale_clients = args.scale_clients or (100 if quick else 1000)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-fl-") as tmp:
        work = Path(tmp)
        data = prepare_federation_data(clients=15, alpha=0.3, seed=0, cache_dir=args.cache_dir)
        conv = convergence(data, work, rounds, steps, args.target)
        rob = robustness(data, work, strategies, max(2, rounds - 1), steps)
        ovh = overhead(data, work, 2 if quick else 3, 2, steps)
        sc = scale(scale_clients, work, args.cache_dir or work / "cache")
    fedavg = rob["fedavg"]
    robust_ok = all(
        rob[s]["drop_points"] is not None and rob[s]["drop_points"] <= 2.0
        for s in strategies
        if s in ROBUST
    )
    fedavg_hurt = fedavg["drop_points"] is None or fedavg["drop_points"] > 2.0
    targets = {
        "robust_within_2_points": robust_ok,
        "fedavg_drops_more_than_2_points": fedavg_hurt,
        "overhead_ratio_le_1.2": ovh["ratio"] <= 1.2,
    }
    figures = {
        "mode": "quick" if quick else "full",
        "paths": {
            "rounds_to_target": "in-process grid",
            "final_accuracy": "in-process grid",
            "overhead": "in-process grid (both sides)",
            "scale": "Flower simulation engine",
        },
        "clients": data.num_clients,
        "alpha": 0.3,
        "target_accuracy": args.target,
        "rounds_to_target": {k: v["rounds_to_target"] for k, v in conv.items()},
        "convergence": conv,
        "final_accuracy": rob,
        "overhead": ovh,
        "scale": sc,
        "wall_s": time.monotonic() - started,
    }
    print(f"federation bench ({figures['mode']}), {data.num_clients} clients, alpha 0.3")
    for k, v in conv.items():
        accs = [None if a is None else round(a, 3) for a in v["accuracy_per_round"]]
        print(f"  {k:10s} rounds to {args.target:.0%}: {v['rounds_to_target']}  acc/round {accs}")
    print(f"  {'strategy':20s} {'clean':>7s} {'20% byz':>8s} {'drop pts':>9s}")
    for name, row in rob.items():

        def pct(v: Any) -> str:
            return "failed" if v is None else f"{100 * v:.1f}"

        drop = "–" if row["drop_points"] is None else f"{row['drop_points']:.1f}"
        print(f"  {name:20s} {pct(row['clean']):>7s} {pct(row['byzantine']):>8s} {drop:>9s}")
    print(f"  overhead: ours {ovh['ours_s_per_round']:.2f} s/round, plain Flower FedAvg "
          f"{ovh['plain_flower_s_per_round']:.2f} s/round, ratio {ovh['ratio']:.3f}")  # fmt: skip
    print(f"  scale: {sc['clients']} clients, simulation engine, 1 round: {sc['wall_s']:.1f} s "
          f"wall, peak RSS {sc['peak_rss_bytes'] / 2**20:.0f} MiB, {sc['accepted']} accepted, "
          f"{sc['rejected']} rejected")  # fmt: skip
    met = all(targets.values())
    print(f"  targets: {targets} -> met: {met}")
    if args.json:
        print(json.dumps({"bench": "federation", "figures": figures, "targets": targets,
                          "met": met}, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
