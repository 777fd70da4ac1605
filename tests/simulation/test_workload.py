"""Workload schedules: seeded, open-loop Poisson arrivals whose counts match the configured
rate, diurnal curve and bursts within bounds derived from the distribution (five standard
deviations; the schedules are deterministic, so a pass never flips), with priorities,
deadlines, texts and entry agents attached."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefed.common.errors import ConfigError
from edgefed.common.schemas import Priority
from edgefed.simulation.scenario import (
    Scenario,
    TextsSpec,
    builtin_scenario,
    load_scenario,
    parse_scenario,
)
from edgefed.simulation.workload import arrival_times, build_schedule, load_texts, rate_at

Z = 5.0
"""Tolerance in standard deviations."""


def scenario(duration_s: float = 500, seed: int = 1, **workload: Any) -> Scenario:
    return parse_scenario(
        {
            "name": "w",
            "duration_s": duration_s,
            "seed": seed,
            "sites": {"lab": {}},
            "fleet": [{"name": "a", "count": 4, "device": "x86-nuc", "site": "lab"}],
            "models": [{"name": "m", "builtin": "tiny"}],
            "workload": {"rate_per_s": 20, "texts": {"source": "inline", "items": ["x"]}}
            | workload,
        }
    )


def within_poisson(count: int, expected: float) -> bool:
    return abs(count - expected) <= Z * math.sqrt(expected)


def test_constant_rate_counts_and_dispersion_are_poisson() -> None:
    s = scenario()
    times = arrival_times(s.workload, s.duration_s, s.seed)
    assert within_poisson(len(times), 20 * 500)
    assert np.all(np.diff(times) >= 0)
    assert times.min() >= 0
    assert times.max() < 500
    # Counts per second: a Poisson process has variance = mean (index of dispersion 1);
    # (n - 1) * D follows chi-square(n - 1), so D's standard deviation is sqrt(2 / (n - 1)).
    counts = np.bincount(times.astype(int), minlength=500)
    dispersion = counts.var(ddof=1) / counts.mean()
    assert abs(dispersion - 1) <= Z * math.sqrt(2 / 499)
    # Gaps are exponential with mean 1 / rate (the sample mean's sd is mean / sqrt(n)).
    gaps = np.diff(times)
    assert abs(gaps.mean() - 1 / 20) <= Z * (1 / 20) / math.sqrt(len(gaps))


def test_the_diurnal_curve_puts_more_arrivals_in_the_rising_half() -> None:
    s = scenario(diurnal={"amplitude": 0.8})
    times = arrival_times(s.workload, s.duration_s, s.seed)
    half = s.duration_s / 2
    # Integral of 20 * (1 + 0.8 sin(2 pi t / T)) over each half of one period.
    swing = 20 * 0.8 * s.duration_s / math.pi
    first, second = int((times < half).sum()), int((times >= half).sum())
    assert within_poisson(first, 20 * half + swing)
    assert within_poisson(second, 20 * half - swing)
    quarter = int(((times >= 100) & (times < 150)).sum())  # around the peak (t = T / 4 = 125)
    peak_rate = rate_at(s.workload, s.duration_s, np.array([125.0]))[0]
    assert peak_rate == pytest.approx(20 * 1.8)
    assert quarter > 50 * 20  # well above the mean rate


def test_bursts_multiply_the_rate_inside_their_window_only() -> None:
    s = scenario(bursts=[{"at_s": 100, "factor": 4, "duration_s": 10}])
    times = arrival_times(s.workload, s.duration_s, s.seed)
    inside = int(((times >= 100) & (times < 110)).sum())
    outside = len(times) - inside
    assert within_poisson(inside, 20 * 4 * 10)
    assert within_poisson(outside, 20 * 490)


def test_overlapping_bursts_multiply() -> None:
    s = scenario(
        bursts=[
            {"at_s": 10, "factor": 2, "duration_s": 10},
            {"at_s": 15, "factor": 3, "duration_s": 10},
        ]
    )
    rates = rate_at(s.workload, s.duration_s, np.array([5.0, 12.0, 17.0, 22.0, 30.0]))
    assert rates.tolist() == [20, 40, 120, 60, 20]
    times = arrival_times(s.workload, s.duration_s, s.seed)
    assert within_poisson(int(((times >= 15) & (times < 20)).sum()), 120 * 5)


def test_priorities_follow_the_mix_and_carry_their_deadlines() -> None:
    s = scenario(
        priorities={"high": 1, "normal": 3, "low": 1},
        deadline_ms=800,
        priority_deadline_ms={"high": 200},
    )
    schedule = build_schedule(s)
    n = len(schedule)
    for priority, share in ((Priority.HIGH, 0.2), (Priority.NORMAL, 0.6), (Priority.LOW, 0.2)):
        count = sum(1 for r in schedule if r.priority == priority)
        assert abs(count - n * share) <= Z * math.sqrt(n * share * (1 - share))
    deadlines = {r.priority: r.deadline_ms for r in schedule}
    assert deadlines == {Priority.HIGH: 200, Priority.NORMAL: 800, Priority.LOW: 800}


def test_entry_agents_are_uniform_and_the_gateway_has_none() -> None:
    s = scenario()
    schedule = build_schedule(s)
    n = len(schedule)
    for agent in s.agent_ids():
        count = sum(1 for r in schedule if r.entry_agent == agent)
        assert abs(count - n / 4) <= Z * math.sqrt(n * 0.25 * 0.75)
    gateway = build_schedule(scenario(entry="gateway"))
    assert {r.entry_agent for r in gateway} == {None}


def test_the_schedule_is_seeded_and_streams_are_independent() -> None:
    a = build_schedule(scenario(duration_s=60))
    b = build_schedule(scenario(duration_s=60))
    assert a == b
    other = build_schedule(scenario(duration_s=60, seed=2))
    assert [r.t_offset_s for r in other] != [r.t_offset_s for r in a]
    # A different priority mix keeps every arrival time (separate random streams).
    mixed = build_schedule(scenario(duration_s=60, priorities={"high": 1, "low": 1}))
    assert [r.t_offset_s for r in mixed] == [r.t_offset_s for r in a]
    assert {r.priority for r in mixed} == {Priority.HIGH, Priority.LOW}
    ids = [r.request_id for r in a]
    assert len(set(ids)) == len(ids)
    assert all(r.model == "m" for r in a)


def test_texts_come_from_each_source_cut_to_max_words(tmp_path: Path) -> None:
    pydoc = load_texts(TextsSpec(source="pydoc", max_words=12))
    assert len(pydoc) > 300
    assert max(len(t.split()) for t in pydoc) <= 12
    inline = load_texts(TextsSpec(source="inline", items=["one two three four"], max_words=2))
    assert inline == ["one two"]
    path = tmp_path / "t.txt"
    path.write_text("first line\n\n  second line  \n")
    assert load_texts(TextsSpec(source="file", path=path)) == ["first line", "second line"]
    schedule = build_schedule(scenario(duration_s=20, texts={"source": "file", "path": path}))
    assert {r.text for r in schedule} == {"first line", "second line"}


def test_bad_text_sources_fail_clearly(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no text"):
        load_texts(TextsSpec(source="file", path=empty))
    with pytest.raises(ConfigError, match="cannot read workload texts"):
        load_texts(TextsSpec(source="file", path=tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="source inline needs items"):
        TextsSpec(source="inline")


@pytest.mark.parametrize("name", ["demo", "split-and-links", "faults"])
def test_the_shipped_scenarios_make_a_schedule_inside_their_run(name: str) -> None:
    s = load_scenario(builtin_scenario(name))
    schedule = build_schedule(s)
    assert schedule
    assert all(0 <= r.t_offset_s < s.duration_s for r in schedule)
    assert {r.entry_agent for r in schedule} <= set(s.agent_ids())
    assert all(r.text for r in schedule)
