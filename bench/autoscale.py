"""Autoscaling of cloud workers: static, reactive and predictive side by side (issue 9).

One diurnal + burst trace per seed (``simulation.autoscale_sim.make_trace``: a compressed day of
1 h, 100 req/s mean swinging 40-160 req/s, 3x bursts of 4 min at 30 % and 75 % of every day
that a seasonal forecast can learn, one 3 min 3x burst a day at a random time that it cannot,
8 % slow noise, Poisson arrivals) is replayed against the simulated worker pool (a FIFO
queueing model: 50 ms mean service time, i.e. 20 req/s per worker, gamma-distributed; 60 s
cold start, paid from the request; removal at once). Every policy sees exactly the same
requests and service times.

Policies:
- ``static-mean`` / ``static-peak``: a fixed pool sized for the trace's mean rate / its highest
  60 s rate (bursts included), at 70 % utilisation of a worker's known capacity;
- ``reactive``: the HPA rule on utilisation (arrivals over what the ready workers serve, target
  70 %, a worker's capacity learnt from samples), queue depth per worker (target 4) and p95
  latency (target the SLO, 200 ms), HPA defaults (15 s interval, tolerance 0.1, no scale-up
  window, 300 s scale-down window), 1-40 workers;
- ``predictive``: the same settings plus Holt-Winters on the request rate (season = the
  compressed day, 2 days of history, 96 points a day, horizon 120 s, refit every 8 samples),
  worker capacity *learnt* from samples (not told), 70 % target utilisation.

An SLO violation is a 60 s window (by arrival) whose p95 latency is above 200 ms;
replica-minutes count every worker from the moment it is asked for. The comparison is over the
days after the first two (the forecast needs two days of history before it knows the season;
all policies run through those days too); whole-trace figures are printed beside it.

Target: predictive <= 0.5x reactive's violations at <= 1.1x its replica-minutes.

    python bench/autoscale.py [--quick] [--json] [--seeds N] [--days N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Literal

from edgefed.cloud.orchestration.autoscaler import Autoscaler, PredictiveAutoscaler
from edgefed.cloud.orchestration.reactive import ReactiveAutoscaler
from edgefed.cloud.orchestration.signals import AutoscalerSettings
from edgefed.simulation.autoscale_sim import (
    PoolSpec,
    StaticPolicy,
    TraceSpec,
    make_trace,
    replay,
    static_replicas,
)

DAY_S = 3600
WARMUP_DAYS = 2
POLICIES = ("static-mean", "static-peak", "reactive", "predictive")
SUMMED = ("slo_violations", "windows", "replica_minutes", "requests", "resizes")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_settings(mode: Literal["reactive", "predictive"]) -> AutoscalerSettings:
    """The one set of settings both autoscalers use (HPA defaults where they apply)."""
    return AutoscalerSettings(
        mode=mode,
        min_replicas=1,
        max_replicas=40,
        interval_s=15,
        target_queue_per_replica=4,
        slo_p95_ms=200,
        tolerance=0.1,
        scale_up_stabilization_s=0,
        scale_down_stabilization_s=300,
        capacity_rps_per_replica=None,
        target_utilisation=0.7,
        forecast_horizon_s=120,
        season_s=DAY_S,
        history_s=2 * DAY_S,
        season_points=96,
        refit_every_samples=8,
    )


def run_seed(seed: int, days: int, pool: PoolSpec) -> dict[str, Any]:
    trace = make_trace(TraceSpec(seasons=days, season_s=DAY_S, seed=seed))
    initial = static_replicas(trace[:60], pool.capacity_rps, 0.7, "mean")
    out: dict[str, Any] = {}
    for name in POLICIES:
        policy: Autoscaler
        if name.startswith("static"):
            replicas = static_replicas(trace, pool.capacity_rps, 0.7, name.split("-")[1])
            policy = StaticPolicy(bench_settings("reactive"), replicas)
        elif name == "reactive":
            policy = ReactiveAutoscaler(bench_settings("reactive"))
        else:
            policy = PredictiveAutoscaler(bench_settings("predictive"))
        started = time.perf_counter()
        result = replay(trace, policy, pool, initial_replicas=initial, seed=seed + 100)
        wall = time.perf_counter() - started
        out[name] = {
            "evaluated": result.summary(WARMUP_DAYS * DAY_S),
            "whole": result.summary(),
            "wall_s": wall,
            "fits": getattr(policy, "fits", 0),
            "static_replicas": getattr(policy, "replicas", None),
        }
        ev = out[name]["evaluated"]
        _log(f"seed {seed} {name:12s} {wall:5.1f} s: {ev['slo_violations']} violations, "
             f"{ev['replica_minutes']:.0f} replica-min (evaluated days)")  # fmt: skip
    return out


def _total(runs: list[dict[str, Any]], policy: str, part: str) -> dict[str, float]:
    total = {k: float(sum(r[policy][part][k] for r in runs)) for k in SUMMED}
    over = sum(r[policy][part]["requests_over_slo_pct"] * r[policy][part]["requests"] for r in runs)
    total["requests_over_slo_pct"] = over / total["requests"] if total["requests"] else 0.0
    return total


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return 0.0 if a == 0 else float("inf")
    return a / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed, 3 days (under a minute)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seeds", type=int, default=None, help="traces (3; quick 1)")
    parser.add_argument("--days", type=int, default=None, help="compressed days (6; quick 3)")
    args = parser.parse_args()
    seeds = args.seeds or (1 if args.quick else 3)
    days = args.days or (3 if args.quick else 6)
    if days <= WARMUP_DAYS:
        parser.error(f"--days must be above the {WARMUP_DAYS} days of forecast warm-up")
    pool = PoolSpec()
    started = time.monotonic()
    runs = [run_seed(seed, days, pool) for seed in range(seeds)]
    evaluated = {p: _total(runs, p, "evaluated") for p in POLICIES}
    whole = {p: _total(runs, p, "whole") for p in POLICIES}
    re, pr = evaluated["reactive"], evaluated["predictive"]
    violations_ratio = _ratio(pr["slo_violations"], re["slo_violations"])
    minutes_ratio = _ratio(pr["replica_minutes"], re["replica_minutes"])
    whole_v = _ratio(whole["predictive"]["slo_violations"], whole["reactive"]["slo_violations"])
    whole_m = _ratio(whole["predictive"]["replica_minutes"], whole["reactive"]["replica_minutes"])
    targets = {
        "predictive_violations_le_0.5x_reactive": violations_ratio <= 0.5,
        "predictive_replica_minutes_le_1.1x_reactive": minutes_ratio <= 1.1,
    }
    met = all(targets.values())
    fits = sum(r["predictive"]["fits"] for r in runs)
    figures = {
        "mode": "quick" if args.quick else "full",
        "seeds": seeds,
        "days": days,
        "day_s": DAY_S,
        "evaluated_days": days - WARMUP_DAYS,
        "slo_violation": "a 60 s window whose p95 latency (by arrival) exceeds 200 ms",
        "slo_violations": {p: evaluated[p]["slo_violations"] for p in POLICIES},
        "replica_minutes": {p: round(evaluated[p]["replica_minutes"], 1) for p in POLICIES},
        "violations_ratio_predictive_vs_reactive": round(violations_ratio, 3),
        "replica_minutes_ratio_predictive_vs_reactive": round(minutes_ratio, 3),
        "evaluated": evaluated,
        "whole_trace": whole,
        "whole_trace_violations_ratio": round(whole_v, 3),
        "whole_trace_replica_minutes_ratio": round(whole_m, 3),
        "static_replicas": {
            p: [r[p]["static_replicas"] for r in runs] for p in ("static-mean", "static-peak")
        },
        "predictive_fits": fits,
        "replay_wall_s": {p: round(sum(r[p]["wall_s"] for r in runs), 1) for p in POLICIES},
        "settings": bench_settings("predictive").model_dump(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print(f"autoscale bench ({figures['mode']}): {seeds} trace(s) x {days} days of {DAY_S} s, "
          f"figures over days {WARMUP_DAYS + 1}-{days}; whole trace in brackets")  # fmt: skip
    print(f"  {'policy':12s} {'violations':>16s} {'replica-min':>20s} {'req > SLO':>16s} "
          f"{'resizes':>8s}")  # fmt: skip
    for p in POLICIES:
        e, w = evaluated[p], whole[p]
        print(f"  {p:12s} {e['slo_violations']:6.0f} ({w['slo_violations']:5.0f}) "
              f"{e['replica_minutes']:9.0f} ({w['replica_minutes']:7.0f}) "
              f"{e['requests_over_slo_pct']:6.2f}% ({w['requests_over_slo_pct']:5.2f}%) "
              f"{e['resizes']:8.0f}")  # fmt: skip
    print(f"  predictive / reactive: violations {violations_ratio:.2f}x (target <= 0.5), "
          f"replica-minutes {minutes_ratio:.2f}x (target <= 1.1); whole trace {whole_v:.2f}x, "
          f"{whole_m:.2f}x")  # fmt: skip
    peak_cost = _ratio(evaluated["static-peak"]["replica_minutes"], re["replica_minutes"])
    peak_violations = evaluated["static-peak"]["slo_violations"]
    print(f"  static-peak pays {peak_cost:.2f}x reactive's replica-minutes for its "
          f"{peak_violations:.0f} violations; {fits} forecast fits")  # fmt: skip
    print(f"  targets: {targets} -> met: {met}")
    if args.json:
        print(json.dumps({"bench": "autoscale", "figures": figures, "targets": targets,
                          "met": met}, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
