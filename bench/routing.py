"""Latency-aware routing against the baselines, side by side in one run (issue 6).

Four agents serve ``InferenceRequest`` over a real mosquitto with the project's ``rpc.serve``
(ReplyCache and all), in a process of their own. Compute is SIMULATED: each agent runs one
request at a time for ``--compute-ms`` (a sleep), so a queue forms like on a device with one
accelerator. For the middle half of each policy's phase agent a1 is slowed 10x. Load is
open-loop Poisson at ``--rate`` requests/s; latency counts from each request's scheduled
arrival (no coordinated omission). A request is lost when the router raises (timeout, no
route) instead of answering within its 5 s deadline.

Router overhead: ``Router.request`` through a one-target router against a raw
``Requester.request`` round trip to the same agent (compute 0), alternating, medians compared.

Targets: latency-aware p99 <= 0.5x round robin's, 0 lost; router overhead <= 1 ms median.

    python bench/routing.py [--quick] [--json] [--broker-url mqtt://host:port]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

from edgefed.common.broker import PrivateBroker
from edgefed.common.mqtt import Message, MqttClient
from edgefed.common.routing import POLICY_NAMES, Router, RouterConfig, Target
from edgefed.common.rpc import ReplyCache, Requester, serve
from edgefed.common.schemas import Decoded, InferenceReply, InferenceRequest
from edgefed.common.settings import load_settings
from edgefed.common.topics import Topics

FLEET = "benchrouting"
AGENTS = ("a0", "a1", "a2", "a3")
SLOW = "a1"
SLOWDOWN = 10.0


# --------------------------------------------------------------------------- agents process


async def _serve_agents(url: str, compute_ms: float) -> None:
    settings = load_settings(broker_url=url, fleet=FLEET)
    topics = Topics(FLEET)
    factor = dict.fromkeys(AGENTS, 1.0)
    base = {"ms": compute_ms}
    loop = asyncio.get_running_loop()

    def control() -> None:  # stdin lines: "slow a1 10" | "normal" | "compute 0"
        for line in sys.stdin:
            parts = line.split()
            if parts[:1] == ["slow"]:
                loop.call_soon_threadsafe(factor.__setitem__, parts[1], float(parts[2]))
            elif parts[:1] == ["normal"]:
                for a in AGENTS:
                    loop.call_soon_threadsafe(factor.__setitem__, a, 1.0)
            elif parts[:1] == ["compute"]:
                loop.call_soon_threadsafe(base.__setitem__, "ms", float(parts[1]))

    clients = []
    for agent in AGENTS:
        client = MqttClient.from_settings(settings, client_id=f"bench-agent-{agent}")
        await client.__aenter__()
        clients.append(client)
        lock = asyncio.Lock()

        async def handle(
            req: Decoded[InferenceRequest], msg: Message, agent: str = agent, lock: Any = lock
        ) -> InferenceReply:
            async with lock:  # one request at a time: a queue forms when slow
                delay = base["ms"] * factor[agent] / 1000
                if delay > 0:
                    await asyncio.sleep(delay)
            return InferenceReply(
                request_id=req.message.request_id, model="tiny", version=1, served_by=agent
            )

        await serve(
            client,
            topics.agent_infer(agent),
            handle,
            expected=InferenceRequest,
            dedup=ReplyCache(),
        )
    threading.Thread(target=control, daemon=True).start()
    print("READY", flush=True)
    await asyncio.Event().wait()


# --------------------------------------------------------------------------- measurement


def _pct(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples), q)) if samples else float("nan")


async def _phase(
    router: Router, rate: float, duration: float, control: Any, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    latencies: list[float] = []
    lost = 0
    served: dict[str, int] = dict.fromkeys(AGENTS, 0)
    start = time.perf_counter() + 0.05
    arrivals = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        arrivals.append(t)

    async def one(at: float) -> None:
        nonlocal lost
        try:
            routed = await router.request(InferenceRequest(model="tiny", texts=["x"]), timeout=5.0)
        except Exception:  # noqa: BLE001 - every failure is a lost request here
            lost += 1
            return
        latencies.append((time.perf_counter() - (start + at)) * 1000)
        served[routed.target.id] += 1

    tasks = []
    slowed = restored = False
    for at in arrivals:
        if not slowed and at >= duration / 4:
            control(f"slow {SLOW} {SLOWDOWN}")
            slowed = True
        if not restored and at >= 3 * duration / 4:
            control("normal")
            restored = True
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(at)))
    await asyncio.gather(*tasks)
    control("normal")
    return {
        "requests": len(arrivals),
        "p50_ms": _pct(latencies, 50),
        "p99_ms": _pct(latencies, 99),
        "p999_ms": _pct(latencies, 99.9),
        "lost": lost,
        "share_of_slow_agent": served[SLOW] / max(1, sum(served.values())),
    }


async def _overhead(requester: Requester, topics: Topics, n: int) -> dict[str, float]:
    router = Router(requester, [Target.agent(topics, "a0")], rng=random.Random(0))
    raw: list[float] = []
    routed: list[float] = []
    for i in range(n + 20):
        for which in ("raw", "router") if i % 2 == 0 else ("router", "raw"):
            req = InferenceRequest(model="tiny", texts=["x"])
            t0 = time.perf_counter()
            if which == "raw":
                await requester.request(topics.agent_infer("a0"), req, InferenceReply, timeout=5)
            else:
                await router.request(req, timeout=5.0)
            dt = (time.perf_counter() - t0) * 1000
            if i >= 20:
                (raw if which == "raw" else routed).append(dt)
    raw_median = statistics.median(raw)
    router_median = statistics.median(routed)
    return {
        "raw_rtt_median_ms": raw_median,
        "router_rtt_median_ms": router_median,
        "router_overhead_ms": router_median - raw_median,
    }


def _start_agents(url: str, compute_ms: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-agents", url, "--compute-ms", str(compute_ms)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        proc.kill()
        raise RuntimeError("agents process did not start")
    return proc


async def measure(
    url: str, proc: subprocess.Popen[str], quick: bool, rate: float, duration: float
) -> Any:
    stdin = proc.stdin
    assert stdin is not None

    def control(line: str) -> None:
        stdin.write(line + "\n")
        stdin.flush()

    settings = load_settings(broker_url=url, fleet=FLEET)
    topics = Topics(FLEET)
    async with MqttClient.from_settings(settings, client_id="bench-router") as client:
        requester = Requester(client, topics)
        await requester.start()
        phases: dict[str, Any] = {}
        for seed, policy in enumerate(POLICY_NAMES):
            router = Router(
                requester,
                [Target.agent(topics, a) for a in AGENTS],
                config=RouterConfig(policy=policy),
                rng=random.Random(seed),
            )
            phases[policy] = await _phase(router, rate, duration, control, seed=100)
            await asyncio.sleep(0.3)  # queues drain between phases
        control("compute 0")
        overhead = await _overhead(requester, topics, 300 if quick else 1000)
    return phases, overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter phases (< 30 s)")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--broker-url", help="use this broker instead of a private mosquitto")
    parser.add_argument("--rate", type=float, default=None, help="requests/s (Poisson)")
    parser.add_argument("--duration", type=float, default=None, help="seconds per policy")
    parser.add_argument("--compute-ms", type=float, default=3.0, help="simulated compute")
    parser.add_argument("--serve-agents", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_agents:
        asyncio.run(_serve_agents(args.serve_agents, args.compute_ms))
        return
    rate = args.rate or (100.0 if args.quick else 120.0)
    duration = args.duration or (5.0 if args.quick else 20.0)

    def run(url: str) -> Any:
        proc = _start_agents(url, args.compute_ms)
        try:
            return asyncio.run(measure(url, proc, args.quick, rate, duration))
        finally:
            proc.kill()
            proc.wait()

    if args.broker_url:
        phases, overhead = run(args.broker_url)
    else:
        with PrivateBroker() as broker:
            phases, overhead = run(broker.url)

    rr_p99 = phases["round-robin"]["p99_ms"]
    ratio = phases["latency"]["p99_ms"] / rr_p99 if rr_p99 else float("nan")
    figures: dict[str, Any] = {
        "policies": phases,
        "latency_p99_over_round_robin": ratio,
        "lost_latency_aware": phases["latency"]["lost"],
        "lost_total": sum(p["lost"] for p in phases.values()),
        **overhead,
        "setup": {
            "agents": len(AGENTS),
            "compute": f"SIMULATED: {args.compute_ms:g} ms sleep, one request at a time",
            "slowdown": f"{SLOW} x{SLOWDOWN:g} for the middle half of each phase",
            "rate_per_s": rate,
            "phase_s": duration,
        },
    }
    targets = {
        "latency_p99_over_round_robin": "<= 0.5",
        "lost_latency_aware": "== 0",
        "router_overhead_ms": "<= 1.0",
    }
    met = ratio <= 0.5 and phases["latency"]["lost"] == 0 and overhead["router_overhead_ms"] <= 1.0
    print(
        f"routing: 4 agents, SIMULATED compute {args.compute_ms:g} ms (sleep, serial), "
        f"{SLOW} x{SLOWDOWN:g} slower for the middle half; Poisson {rate:g} req/s, "
        f"{duration:g} s per policy"
    )
    print(
        f"{'policy':<18} {'reqs':>5} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} "
        f"{'lost':>5} {'to slow':>8}"
    )
    for name, p in phases.items():
        print(
            f"{name:<18} {p['requests']:>5} {p['p50_ms']:>8.2f} {p['p99_ms']:>8.2f} "
            f"{p['p999_ms']:>9.2f} {p['lost']:>5} {p['share_of_slow_agent']:>7.1%}"
        )
    print(f"latency-aware p99 / round-robin p99 = {ratio:.2f} (target <= 0.5)")
    print(
        f"router overhead: median {overhead['router_rtt_median_ms']:.3f} ms vs raw Requester "
        f"{overhead['raw_rtt_median_ms']:.3f} ms = +{overhead['router_overhead_ms']:.3f} ms "
        "(target <= 1 ms)"
    )
    print("targets " + ("met" if met else "NOT met"))
    if args.json:
        print(json.dumps({"bench": "routing", "figures": figures, "targets": targets, "met": met}))


if __name__ == "__main__":
    main()
