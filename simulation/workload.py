"""Open-loop workloads: when each request of a run is sent, and what it asks.

Arrivals form a non-homogeneous Poisson process whose rate is the scenario's base rate times a
diurnal sinusoid times any bursts in force, drawn by thinning (Lewis and Shedler): candidates
of a homogeneous process at the peak rate, each kept with probability ``rate(t) / peak``. The
schedule is fixed before the run and does not wait for answers, as real users do not.

Everything is seeded by the scenario's seed. Arrival times, priorities, texts and entry agents
come from separate random streams, so changing the priority mix does not move any arrival.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from edgefed.common.errors import ConfigError
from edgefed.common.schemas import Priority
from edgefed.simulation.scenario import Scenario, TextsSpec, WorkloadSpec

__all__ = ["RequestSpec", "arrival_times", "build_schedule", "load_texts", "rate_at"]

_ARRIVALS, _PRIORITIES, _TEXTS, _ENTRIES = range(4)
"""Random stream numbers (each stream is seeded with ``[seed, stream]``)."""

_SENTENCE = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()\-]+[.!?]$")


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request of the schedule."""

    request_id: str
    t_offset_s: float
    """When to send it, in seconds from the start of the run."""
    model: str
    priority: Priority
    deadline_ms: float | None
    """Deadline relative to the send time (``None``: none)."""
    text: str
    entry_agent: str | None
    """The agent the request enters at (``None``: the cloud gateway)."""


def rate_at(workload: WorkloadSpec, duration_s: float, t: np.ndarray) -> np.ndarray:
    """The arrival rate (requests per second) at times ``t`` (seconds from the start)."""
    t = np.asarray(t, dtype=float)
    rate = np.full_like(t, workload.rate_per_s)
    diurnal = workload.diurnal
    if diurnal is not None:
        period = diurnal.period_s or duration_s
        rate = rate * (1 + diurnal.amplitude * np.sin(2 * np.pi * (t - diurnal.phase_s) / period))
    for burst in workload.bursts:
        inside = (t >= burst.at_s) & (t < burst.at_s + burst.duration_s)
        rate = np.where(inside, rate * burst.factor, rate)
    return rate


def _peak_rate(workload: WorkloadSpec) -> float:
    """An upper bound of :func:`rate_at` over the run (thinning needs one)."""
    peak = workload.rate_per_s
    if workload.diurnal is not None:
        peak *= 1 + workload.diurnal.amplitude
    # Overlapping bursts multiply: the product of all factors above 1 bounds any overlap.
    return peak * math.prod(max(b.factor, 1.0) for b in workload.bursts)


def arrival_times(workload: WorkloadSpec, duration_s: float, seed: int) -> np.ndarray:
    """Sorted send times in ``[0, duration_s)`` (seconds), deterministic for a seed."""
    rng = np.random.default_rng([seed, _ARRIVALS])
    peak = _peak_rate(workload)
    n = int(rng.poisson(peak * duration_s))
    candidates = np.sort(rng.uniform(0.0, duration_s, size=n))
    keep = rng.uniform(0.0, peak, size=n) < rate_at(workload, duration_s, candidates)
    return candidates[keep]


def load_texts(spec: TextsSpec) -> list[str]:
    """The texts requests carry, each cut to ``max_words`` words."""
    if spec.source == "inline":
        texts = list(spec.items or [])
    elif spec.source == "file" and spec.path is not None:
        try:
            lines = spec.path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read workload texts {spec.path}: {exc}") from None
        texts = [line.strip() for line in lines if line.strip()]
    else:
        texts = _pydoc_sentences()
    texts = [" ".join(t.split()[: spec.max_words]) for t in texts]
    texts = [t for t in texts if t]
    if not texts:
        where = spec.path if spec.source == "file" else spec.source
        raise ConfigError(f"workload texts: {where} holds no text")
    return texts


def _pydoc_sentences() -> list[str]:
    """Sentences of CPython's own help topics (shipped with every Python)."""
    from pydoc_data.topics import topics

    out: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        for raw in re.split(r"(?<=[.!?])\s+", topics[key]):
            sentence = " ".join(raw.split())
            if len(sentence.split()) >= 5 and _SENTENCE.match(sentence) and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


def build_schedule(scenario: Scenario, texts: list[str] | None = None) -> list[RequestSpec]:
    """Every request of the run, in send order (``texts``: override the scenario's source)."""
    workload = scenario.workload
    times = arrival_times(workload, scenario.duration_s, scenario.seed)
    texts = texts if texts is not None else load_texts(workload.texts)
    if not texts:
        raise ConfigError("the workload needs at least one text")
    priorities = sorted(workload.priorities, key=list(Priority).index)
    weights = np.array([workload.priorities[p] for p in priorities], dtype=float)
    n = len(times)
    chosen = np.random.default_rng([scenario.seed, _PRIORITIES]).choice(
        len(priorities), size=n, p=weights / weights.sum()
    )
    text_ix = np.random.default_rng([scenario.seed, _TEXTS]).integers(0, len(texts), size=n)
    agents = scenario.agent_ids()
    entry_ix = np.random.default_rng([scenario.seed, _ENTRIES]).integers(0, len(agents), size=n)
    model = scenario.model(workload.model).name
    width = max(6, len(str(n)))
    schedule = []
    for i in range(n):
        priority = priorities[int(chosen[i])]
        schedule.append(
            RequestSpec(
                request_id=f"{scenario.name}-{i:0{width}d}",
                t_offset_s=float(times[i]),
                model=model,
                priority=priority,
                deadline_ms=workload.deadline_for(priority),
                text=texts[int(text_ix[i])],
                entry_agent=agents[int(entry_ix[i])] if workload.entry == "agents" else None,
            )
        )
    return schedule
