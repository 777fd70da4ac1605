"""A run's results built by hand, with known counts, for the summary and report tests."""

from __future__ import annotations

import random

from edgefed.common.schemas import Priority
from edgefed.simulation.results import (
    FaultRecord,
    RequestOutcome,
    RolloutEvent,
    RunMeta,
    RunResults,
    SplitPlanRecord,
    TelemetrySample,
)

AGENTS = ("orin-1", "nuc-1", "pi-1", "nano-1")
SENT = 600
ERRORS = 30  # every 20th request
LOST = 12  # every 50th request that is not already an error


def synthetic_results(agents: tuple[str, ...] = AGENTS, seed: int = 1) -> RunResults:
    """600 requests over 60 s: two policies, four agents and a cloud pool, explicit errors on
    every 20th request, 12 lost requests, telemetry every second, faults and a rollout."""
    rng = random.Random(seed)
    requests = []
    for i in range(SENT):
        t = i * 0.1
        target = agents[i % len(agents)] if i % 5 else "worker-default"
        base = {"orin-1": 8.0, "nuc-1": 5.0, "pi-1": 20.0, "nano-1": 60.0}.get(target, 12.0)
        common = {
            "request_id": f"r{i:04d}",
            "t_sent_s": t,
            "model": "minilm",
            "policy": "latency" if i % 2 else "round-robin",
            "priority": Priority.HIGH if i % 10 == 0 else Priority.NORMAL,
            "entry": agents[i % len(agents)],
            "deadline_ms": 500.0,
        }
        if i % 20 == 0:
            requests.append(
                RequestOutcome(**common, target=target, error="timeout", latency_ms=500.0)
            )
        elif i % 50 == 1:
            requests.append(RequestOutcome(**common, target=target))
        else:
            latency = base * rng.lognormvariate(0, 0.4)
            requests.append(
                RequestOutcome(
                    **common,
                    target=target,
                    placement="cloud" if target.startswith("worker") else "edge",
                    version=1 if t < 30 else 2,
                    latency_ms=latency,
                )
            )
    telemetry = [
        TelemetrySample(
            t_s=float(t),
            agent=a,
            online=not (a == "nuc-1" and 20 <= t < 42),
            load=float((t + k) % 4),
            memory_bytes=(100 + k) * 2**20,
            cpu_percent=30.0 + k,
        )
        for t in range(60)
        for k, a in enumerate(agents)
    ]
    return RunResults(
        meta=RunMeta(
            scenario="synthetic",
            seed=seed,
            duration_s=60.0,
            wall_s=75.5,
            peak_memory_bytes=len(agents) * 150 * 2**20,
            agents=len(agents),
            policy="latency",
            host="test-host",
            edgefed_version="0.1.0",
            notes=["model minilm fell back to tiny"],
        ),
        requests=requests,
        telemetry=telemetry,
        rollouts=[
            RolloutEvent(t_s=30.0, model="minilm", version=2, phase="canary", agents=["pi-1"]),
            RolloutEvent(t_s=33.0, model="minilm", version=2, phase="soaking", agents=["pi-1"]),
            RolloutEvent(t_s=43.0, model="minilm", version=2, phase="rolling"),
            RolloutEvent(t_s=47.0, model="minilm", version=2, phase="completed"),
        ],
        splits=[
            SplitPlanRecord(
                t_s=2.0,
                agent="pi-1",
                model="minilm",
                placement="split",
                split_k=2,
                layers=3,
                device="raspberry-pi-5",
                site="home",
                bandwidth_mbps=20,
                rtt_ms=30,
                estimated_ms=18.5,
                reason="head on device, tail in the cloud",
            ),
            SplitPlanRecord(
                t_s=2.0,
                agent="nano-1",
                model="minilm",
                placement="edge",
                layers=3,
                device="jetson-nano",
                site="field",
                bandwidth_mbps=5,
                rtt_ms=80,
                estimated_ms=55.0,
                reason="activations cost more than local compute",
            ),
        ],
        faults=[
            FaultRecord(t_s=20.01, kind="kill_agent", target="agent:nuc-1", planned_at_s=20),
            FaultRecord(t_s=25.02, kind="cut_link", target="site:field", planned_at_s=25),
            FaultRecord(t_s=40.0, kind="restore_link", target="site:field", planned_at_s=40),
        ],
    )
