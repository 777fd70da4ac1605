"""The figures of a run, computed from its :class:`~edgefed.simulation.results.RunResults`:
latency quantiles per target, policy and priority, throughput and errors over time, per-agent
load, and the request count that must add up (sent = answered + explicit errors + lost).

Quantiles are of answered requests only (an error has no service latency worth ranking);
p99.9 of fewer than 1,000 samples is an interpolation near the maximum, and ``count`` says how
many samples each figure rests on.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict

from edgefed.simulation.results import RequestOutcome, RunResults

__all__ = ["AgentLoad", "Bucket", "GroupStats", "LatencyStats", "Summary", "Totals", "summarize"]


class _Figures(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LatencyStats(_Figures):
    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float

    @classmethod
    def of(cls, latencies_ms: Iterable[float]) -> LatencyStats | None:
        values = np.asarray(list(latencies_ms), dtype=float)
        if values.size == 0:
            return None
        q = np.quantile(values, [0.5, 0.9, 0.99, 0.999])
        return cls(
            count=int(values.size),
            mean_ms=float(values.mean()),
            p50_ms=float(q[0]),
            p90_ms=float(q[1]),
            p99_ms=float(q[2]),
            p999_ms=float(q[3]),
            max_ms=float(values.max()),
        )


class GroupStats(_Figures):
    """Requests of one target, policy or priority."""

    requests: int
    ok: int
    errors: int
    lost: int
    latency: LatencyStats | None


class Totals(_Figures):
    sent: int
    ok: int
    errors: int
    lost: int
    """Sent, neither answered nor failed with an explicit error: ``sent - ok - errors``."""
    error_codes: dict[str, int]
    deadline_missed: int
    """Answered, but later than the request's deadline."""

    @property
    def ok_share(self) -> float:
        return self.ok / self.sent if self.sent else math.nan


class Bucket(_Figures):
    """One time bucket ``[t_s, t_s + width)``: requests sent in it, and answers and errors
    that arrived in it."""

    t_s: float
    sent: int
    ok: int
    errors: int
    lost: int
    throughput_per_s: float
    """Answers per second in this bucket."""
    p50_ms: float | None


class AgentLoad(_Figures):
    samples: int
    mean_load: float
    max_load: float
    peak_memory_bytes: int | None
    mean_cpu_percent: float | None
    served: int
    """Requests it answered (from the outcomes)."""
    offline_samples: int


class Summary(_Figures):
    scenario: str
    duration_s: float
    bucket_s: float
    totals: Totals
    overall: LatencyStats | None
    by_target: dict[str, GroupStats]
    by_policy: dict[str, GroupStats]
    by_priority: dict[str, GroupStats]
    by_placement: dict[str, GroupStats]
    timeline: list[Bucket]
    agents: dict[str, AgentLoad]
    memory_per_agent_bytes: float | None


def default_bucket_s(duration_s: float) -> float:
    """About 60 buckets over the run, in a round number of seconds (at least 1)."""
    raw = max(duration_s / 60, 1.0)
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600):
        if raw <= step:
            return float(step)
    return float(math.ceil(raw / 3600) * 3600)


def summarize(results: RunResults, bucket_s: float | None = None) -> Summary:
    """All figures of a run."""
    reqs = results.requests
    duration = results.meta.duration_s
    width = bucket_s or default_bucket_s(duration)
    if not width > 0:
        raise ValueError(f"bucket width must be > 0 s (got {width})")
    answered = [r for r in reqs if r.status == "ok"]
    errors = [r for r in reqs if r.status == "error"]
    totals = Totals(
        sent=len(reqs),
        ok=len(answered),
        errors=len(errors),
        lost=len(reqs) - len(answered) - len(errors),
        error_codes=dict(Counter(r.error or "" for r in errors).most_common()),
        deadline_missed=sum(
            1
            for r in answered
            if r.deadline_ms is not None and (r.latency_ms or 0.0) > r.deadline_ms
        ),
    )
    return Summary(
        scenario=results.meta.scenario,
        duration_s=duration,
        bucket_s=width,
        totals=totals,
        overall=LatencyStats.of(r.latency_ms or 0.0 for r in answered),
        by_target=_group(reqs, lambda r: r.target or "(none)"),
        by_policy=_group(reqs, lambda r: r.policy),
        by_priority=_group(reqs, lambda r: str(r.priority)),
        by_placement=_group(reqs, lambda r: r.placement or "(none)"),
        timeline=_timeline(reqs, width, duration),
        agents=_agents(results),
        memory_per_agent_bytes=results.meta.memory_per_agent_bytes,
    )


def _group(
    reqs: list[RequestOutcome], key: Callable[[RequestOutcome], str]
) -> dict[str, GroupStats]:
    groups: dict[str, list[RequestOutcome]] = defaultdict(list)
    for r in reqs:
        groups[key(r)].append(r)
    out = {}
    for name in sorted(groups):
        members = groups[name]
        ok = [r.latency_ms or 0.0 for r in members if r.status == "ok"]
        errors = sum(1 for r in members if r.status == "error")
        out[name] = GroupStats(
            requests=len(members),
            ok=len(ok),
            errors=errors,
            lost=len(members) - len(ok) - errors,
            latency=LatencyStats.of(ok),
        )
    return out


def _timeline(reqs: list[RequestOutcome], width: float, duration: float) -> list[Bucket]:
    last_t = max([duration, *(r.t_done_s for r in reqs)])
    n = max(1, math.ceil(last_t / width - 1e-9))
    sent, ok, err, lost = (np.zeros(n, dtype=int) for _ in range(4))
    latencies: list[list[float]] = [[] for _ in range(n)]

    def index(t: float) -> int:
        return min(max(int(t // width), 0), n - 1)

    for r in reqs:
        sent[index(r.t_sent_s)] += 1
        if r.status == "ok":
            i = index(r.t_done_s)
            ok[i] += 1
            latencies[i].append(r.latency_ms or 0.0)
        elif r.status == "error":
            err[index(r.t_done_s)] += 1
        else:
            lost[index(r.t_sent_s)] += 1
    return [
        Bucket(
            t_s=i * width,
            sent=int(sent[i]),
            ok=int(ok[i]),
            errors=int(err[i]),
            lost=int(lost[i]),
            throughput_per_s=float(ok[i]) / width,
            p50_ms=float(np.median(latencies[i])) if latencies[i] else None,
        )
        for i in range(n)
    ]


def _agents(results: RunResults) -> dict[str, AgentLoad]:
    samples = defaultdict(list)
    for s in results.telemetry:
        samples[s.agent].append(s)
    served = Counter(r.target for r in results.requests if r.status == "ok" and r.target)
    out = {}
    for agent in sorted(samples):
        rows = samples[agent]
        memory = [s.memory_bytes for s in rows if s.memory_bytes is not None]
        cpu = [s.cpu_percent for s in rows if s.cpu_percent is not None]
        out[agent] = AgentLoad(
            samples=len(rows),
            mean_load=float(np.mean([s.load for s in rows])),
            max_load=float(max(s.load for s in rows)),
            peak_memory_bytes=max(memory) if memory else None,
            mean_cpu_percent=float(np.mean(cpu)) if cpu else None,
            served=served.get(agent, 0),
            offline_samples=sum(1 for s in rows if not s.online),
        )
    return out
