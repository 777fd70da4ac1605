"""Peak-EWMA, target health and the policies, without a broker."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from edgefed.common.errors import ConfigError
from edgefed.common.routing import (
    Health,
    PeakEwma,
    RecentLatencies,
    RouterConfig,
    Target,
    TargetKind,
    TargetState,
    make_policy,
)
from edgefed.common.topics import Topics

TOPICS = Topics("unit")


def states(n: int, config: RouterConfig | None = None) -> list[TargetState]:
    cfg = config or RouterConfig()
    return [TargetState(Target.agent(TOPICS, f"a{i}"), i, cfg) for i in range(n)]


def test_peak_ewma_jumps_up_at_once_and_decays_slowly() -> None:
    e = PeakEwma(decay_s=1.0)
    assert e.estimate(0.0) is None
    for t in range(10):
        e.observe(0.010, t * 0.01)
    assert e.estimate(0.1) == pytest.approx(0.010, rel=0.02)
    e.observe(0.100, 0.11)  # one slow trip: the estimate is that trip at once
    assert e.estimate(0.11) == pytest.approx(0.100)
    e.observe(0.010, 0.12)  # one fast trip 10 ms later barely moves it down
    assert e.estimate(0.12) > 0.09
    for k in range(1, 501):  # fast trips for 5 time constants bring it back
        e.observe(0.010, 0.12 + k * 0.01)
    assert e.estimate(5.12) == pytest.approx(0.010, rel=0.1)


def test_peak_ewma_decays_towards_zero_when_idle_so_a_slow_target_is_retried() -> None:
    e = PeakEwma(decay_s=2.0)
    e.observe(0.5, 0.0)
    assert e.estimate(2.0) == pytest.approx(0.5 * 0.3679, rel=1e-3)
    assert e.estimate(20.0) < 0.001


def test_peak_ewma_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="decay time"):
        PeakEwma(decay_s=0)
    with pytest.raises(ValueError, match="finite"):
        PeakEwma().observe(float("nan"), 0.0)
    with pytest.raises(ValueError, match=">= 0"):
        PeakEwma().observe(-1.0, 0.0)


def test_recent_latencies_quantile() -> None:
    r = RecentLatencies(size=100)
    assert r.quantile(0.95) is None
    for i in range(1, 101):
        r.add(i / 1000)
    assert r.quantile(0.95) == pytest.approx(0.095)
    assert r.quantile(0.5) == pytest.approx(0.050)
    with pytest.raises(ValueError, match="quantile"):
        r.quantile(1.5)


def test_cost_is_estimate_times_load_plus_one_with_advertised_queue() -> None:
    (s,) = states(1, RouterConfig(queue_depth_ttl_s=5.0))
    assert s.cost(0.0) == 0.0  # unmeasured and idle: try it
    s.started()
    assert s.cost(0.0) == RouterConfig().unsampled_penalty_s  # not flooded before it answers
    s.succeeded_after(0.010, 0.0)
    s.finished()
    assert s.cost(0.0) == pytest.approx(0.010)
    s.started()
    assert s.cost(0.0) == pytest.approx(0.020)
    s.advertise_queue(3, 0.0)
    assert s.load(0.0) == 4
    assert s.cost(0.0) == pytest.approx(0.050)
    assert s.load(6.0) == 1  # a stale heartbeat no longer counts


def test_ejection_after_consecutive_failures_then_one_probe_readmits() -> None:
    (s,) = states(1, RouterConfig(eject_after_failures=2, probe_backoff_s=1.0))
    s.started()
    s.failed_after(0.5, 10.0)
    s.finished()
    assert s.health is Health.ADMITTED
    s.started()
    s.failed_after(None, 10.0)
    s.finished()
    assert s.health is Health.EJECTED
    assert not s.selectable(10.5)
    assert s.selectable(11.0)  # probe due
    s.started()  # the probe
    assert not s.selectable(11.0)  # only one probe at a time
    s.failed_after(0.5, 11.5)  # failed probe: backoff doubles
    s.finished()
    assert not s.selectable(13.0)
    assert s.selectable(13.5)
    s.started()
    s.succeeded_after(0.01, 13.6)
    s.finished()
    assert s.health is Health.ADMITTED
    assert s.consecutive_failures == 0


def test_offline_until_online() -> None:
    (s,) = states(1)
    s.mark_offline()
    assert not s.selectable(1e9)  # no probes to an agent that said it is offline
    s.mark_online()
    assert s.selectable(0.0)


def test_round_robin_cycles_in_order_and_skips_unavailable() -> None:
    ss = states(3)
    rr = make_policy("round-robin", random.Random(1))
    assert [rr.choose(ss, 0.0).id for _ in range(6)] == ["a0", "a1", "a2", "a0", "a1", "a2"]
    without_a1 = [ss[0], ss[2]]
    assert [rr.choose(without_a1, 0.0).id for _ in range(3)] == ["a0", "a2", "a0"]


def test_least_outstanding_picks_the_idlest() -> None:
    ss = states(3)
    for s, n in zip(ss, (3, 1, 2), strict=True):
        for _ in range(n):
            s.started()
    lo = make_policy("least-outstanding", random.Random(1))
    assert {lo.choose(ss, 0.0).id for _ in range(20)} == {"a1"}
    ss[0].advertise_queue(0, 0.0)
    ss[1].advertise_queue(5, 0.0)  # a1's agent says its queue is long
    assert lo.choose(ss, 0.0).id == "a2"


def test_random_is_reproducible_from_its_seed_and_uses_every_target() -> None:
    ss = states(4)
    a = [make_policy("random", random.Random(42)).choose(ss, 0.0).id for _ in range(1)]
    p1, p2 = make_policy("random", random.Random(42)), make_policy("random", random.Random(42))
    seq1 = [p1.choose(ss, 0.0).id for _ in range(200)]
    seq2 = [p2.choose(ss, 0.0).id for _ in range(200)]
    assert seq1 == seq2
    assert a[0] == seq1[0]
    assert set(Counter(seq1)) == {"a0", "a1", "a2", "a3"}


def test_latency_aware_prefers_the_fast_target() -> None:
    ss = states(4)
    for i, s in enumerate(ss):
        s.succeeded_after(0.050 if i == 2 else 0.005, 0.0)
    p2c = make_policy("latency", random.Random(3))
    picks = Counter(p2c.choose(ss, 0.0).id for _ in range(400))
    assert picks["a2"] == 0  # the slow one loses every pairing
    assert all(picks[f"a{i}"] > 50 for i in (0, 1, 3))


def test_latency_aware_weighs_load() -> None:
    fast, slow = states(2)
    fast.succeeded_after(0.010, 0.0)
    slow.succeeded_after(0.030, 0.0)
    p2c = make_policy("latency", random.Random(0))
    assert p2c.choose([fast, slow], 0.0) is fast
    for _ in range(3):
        fast.started()  # 10 ms x 4 > 30 ms x 1
    assert p2c.choose([fast, slow], 0.0) is slow


def test_unknown_policy_and_bad_config_are_refused_with_the_name() -> None:
    with pytest.raises(ConfigError, match=r"'fastest'.*latency, round-robin"):
        make_policy("fastest")
    with pytest.raises(ConfigError, match="'fastest'"):
        RouterConfig(policy="fastest")
    with pytest.raises(ConfigError, match="decay_s"):
        RouterConfig(decay_s=0)
    with pytest.raises(ConfigError, match="retries"):
        RouterConfig(retries=-1)


def test_target_constructors() -> None:
    t = Target.pool(TOPICS, "gpu")
    assert t.kind is TargetKind.CLOUD_POOL
    assert t.topic == TOPICS.worker_infer("gpu")  # published here, consumed via $share/gpu/...
    assert Target.agent(TOPICS, "a1", local=True).kind is TargetKind.LOCAL
    assert Target.split(TOPICS, "a1").topic == TOPICS.agent_infer("a1")
    with pytest.raises(ConfigError, match="target id"):
        Target(id="a/b", kind=TargetKind.PEER, topic="x")
