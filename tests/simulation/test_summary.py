"""Run summaries: every sent request is counted once (answered, explicit error or lost),
quantiles are those of the answered requests, time buckets place answers when they arrive,
and results survive a round trip through results.json."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from edgefed.common.errors import ConfigError
from edgefed.simulation.results import RequestOutcome, RunMeta, RunResults, TelemetrySample
from edgefed.simulation.summary import default_bucket_s, summarize
from tests.simulation.synthetic import ERRORS, LOST, SENT, synthetic_results


def outcome(i: int, t: float, **kw: object) -> RequestOutcome:
    fields: dict[str, object] = {"request_id": f"r{i}", "t_sent_s": t, "model": "m"}
    fields.setdefault("policy", "latency")
    fields.update(kw)
    return RequestOutcome.model_validate(fields)


def results(requests: list[RequestOutcome], **meta: object) -> RunResults:
    return RunResults(
        meta=RunMeta.model_validate({"scenario": "t", "seed": 0, "duration_s": 10.0} | meta),
        requests=requests,
    )


def test_sent_is_answered_plus_errors_plus_lost() -> None:
    s = summarize(synthetic_results())
    t = s.totals
    assert (t.sent, t.ok, t.errors, t.lost) == (SENT, SENT - ERRORS - LOST, ERRORS, LOST)
    assert t.error_codes == {"timeout": ERRORS}
    for groups in (s.by_target, s.by_policy, s.by_priority, s.by_placement):
        assert sum(g.requests for g in groups.values()) == SENT
        assert sum(g.lost for g in groups.values()) == LOST
        assert sum(g.errors for g in groups.values()) == ERRORS
    assert sum(b.sent for b in s.timeline) == SENT
    assert sum(b.ok for b in s.timeline) == t.ok
    assert sum(b.errors for b in s.timeline) == ERRORS
    assert sum(b.lost for b in s.timeline) == LOST


def test_status_of_an_outcome() -> None:
    assert outcome(0, 0, latency_ms=3).status == "ok"
    assert outcome(1, 0, error="unavailable", latency_ms=3).status == "error"
    assert outcome(2, 0, error="timeout").status == "error"
    assert outcome(3, 0).status == "lost"


def test_quantiles_are_of_answered_requests_per_target_and_policy() -> None:
    reqs = [outcome(i, 0.0, target="a", latency_ms=float(i)) for i in range(1, 1001)]
    reqs += [outcome(2000 + i, 0.0, target="b", policy="random", latency_ms=50.0) for i in range(9)]
    reqs.append(outcome(3000, 0.0, target="b", policy="random", error="internal", latency_ms=1e6))
    s = summarize(results(reqs))
    a = s.by_target["a"].latency
    assert a is not None
    # Linear interpolation between order statistics (numpy's default).
    assert (a.count, a.p50_ms, a.p99_ms, a.p999_ms, a.max_ms) == pytest.approx(
        (1000, 500.5, 990.01, 999.001, 1000)
    )
    b = s.by_target["b"]
    assert (b.requests, b.ok, b.errors) == (10, 9, 1)
    assert b.latency is not None
    assert b.latency.max_ms == 50.0  # the error's 1e6 ms is not a service latency
    assert set(s.by_policy) == {"latency", "random"}
    assert s.by_policy["random"].latency is not None
    assert s.overall is not None
    assert s.overall.count == 1009


def test_buckets_place_answers_when_they_arrive_and_lost_when_sent() -> None:
    reqs = [
        outcome(0, 0.95, latency_ms=100.0),  # answered at 1.05 s: bucket 1
        outcome(1, 0.10, latency_ms=10.0),  # bucket 0
        outcome(2, 2.50, error="timeout", latency_ms=1000.0),  # failed at 3.5 s: bucket 3
        outcome(3, 4.20),  # lost: bucket 4
    ]
    s = summarize(results(reqs), bucket_s=1.0)
    assert [b.sent for b in s.timeline[:5]] == [2, 0, 1, 0, 1]
    assert [b.ok for b in s.timeline[:5]] == [1, 1, 0, 0, 0]
    assert [b.errors for b in s.timeline[:5]] == [0, 0, 0, 1, 0]
    assert [b.lost for b in s.timeline[:5]] == [0, 0, 0, 0, 1]
    assert s.timeline[1].throughput_per_s == 1.0
    assert len(s.timeline) == 10  # the whole planned duration, even when quiet


def test_deadline_misses_count_late_answers() -> None:
    reqs = [
        outcome(0, 0, latency_ms=90.0, deadline_ms=100.0),
        outcome(1, 0, latency_ms=110.0, deadline_ms=100.0),
        outcome(2, 0, latency_ms=500.0),
        outcome(3, 0, error="expired", deadline_ms=100.0),
    ]
    assert summarize(results(reqs)).totals.deadline_missed == 1


def test_agent_load_and_memory() -> None:
    s = summarize(synthetic_results())
    nuc = s.agents["nuc-1"]
    assert nuc.samples == 60
    assert nuc.offline_samples == 22
    assert nuc.max_load == 3.0
    assert nuc.peak_memory_bytes == 101 * 2**20
    assert nuc.served == s.by_target["nuc-1"].ok
    assert s.memory_per_agent_bytes == 150 * 2**20


def test_default_buckets_and_a_bad_width() -> None:
    assert default_bucket_s(60) == 1.0
    assert default_bucket_s(600) == 10.0
    assert default_bucket_s(86_400) == 1800.0
    with pytest.raises(ValueError, match="bucket width"):
        summarize(results([]), bucket_s=-1)


def test_an_empty_run_summarizes() -> None:
    s = summarize(results([]))
    assert s.totals.sent == 0
    assert s.overall is None
    assert s.by_target == {}


def test_results_round_trip_and_refuse_bad_files(tmp_path: Path) -> None:
    original = synthetic_results()
    path = original.save(tmp_path / "results.json")
    again = RunResults.load(path)
    assert again == original
    assert summarize(again) == summarize(original)
    (tmp_path / "bad.json").write_text('{"meta": {}}')
    with pytest.raises(ConfigError, match="not a results file"):
        RunResults.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="cannot read results"):
        RunResults.load(tmp_path / "missing.json")


def test_records_refuse_nan_and_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        outcome(0, 0, latency_ms=float("nan"))
    with pytest.raises(ValidationError):
        TelemetrySample.model_validate({"t_s": 0, "agent": "a", "lod": 1})
