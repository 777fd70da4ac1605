"""The handoff planner: ship the KV cache on a fast link, re-run on a slow one, flip where its
own estimates meet; and the prefill meter that feeds it."""

from __future__ import annotations

import math

import pytest

from edgefed.common.sessions.handoff import (
    HandoffPlan,
    HandoffPlanner,
    LinkEstimate,
    PrefillMeter,
)

# A 135M-parameter decoder's cache: 30 layers x 2 x 3 heads x 64 dims (fp16; int8 + scales).
PER_TOKEN = {"fp16": 30 * 2 * 3 * 64 * 2, "int8": 30 * 2 * 3 * (64 + 2)}
TOKENS = 1000
PER_TOKEN_MS, FIXED_MS = 0.5, 20.0  # rerun of TOKENS: 520 ms
PREFILL = {"prefill_ms_per_token": PER_TOKEN_MS, "prefill_fixed_ms": FIXED_MS}
MBIT = 1e6


def plan(
    planner: HandoffPlanner, mbps: float, rtt_ms: float = 20.0, tokens: int = TOKENS
) -> HandoffPlan:
    return planner.plan(
        context_tokens=tokens,
        kv_bytes_per_token=PER_TOKEN,
        link=LinkEstimate(bandwidth_bps=mbps * MBIT, rtt_ms=rtt_ms),
        **PREFILL,
    )


def test_a_fast_link_ships_the_cache_a_slow_one_reruns() -> None:
    planner = HandoffPlanner()
    fast = plan(planner, 1000.0)
    assert fast.method == "kv-fp16"
    assert fast.kv_bytes == PER_TOKEN["fp16"] * TOKENS
    slow = plan(planner, 5.0)
    assert slow.method == "rerun"
    assert slow.kv_bytes == 0
    # The estimates are the module's formulas: rtt + transfer + decoding; fixed + per token.
    fp16_bytes = PER_TOKEN["fp16"] * TOKENS
    assert slow.estimates_ms["rerun"] == pytest.approx(20.0 + TOKENS * 0.5)
    assert slow.estimates_ms["kv-fp16"] == pytest.approx(
        20.0 + fp16_bytes * 8 / (5 * MBIT) * 1000 + fp16_bytes / 1e6 * 7.6
    )
    assert "kv-int8" not in slow.estimates_ms  # not allowed: not even considered


def test_int8_is_chosen_only_when_allowed() -> None:
    # At 300 Mbit/s fp16 (23 MB, ~660 ms) loses to the re-run (520 ms), int8 (half the
    # bytes, ~360 ms) wins.
    assert plan(HandoffPlanner(), 300.0).method == "rerun"
    allowed = plan(HandoffPlanner(allow_int8=True), 300.0)
    assert allowed.method == "kv-int8"
    assert allowed.kv_bytes == PER_TOKEN["int8"] * TOKENS
    assert allowed.estimates_ms["kv-int8"] < allowed.estimates_ms["rerun"]
    assert allowed.estimates_ms["kv-fp16"] > allowed.estimates_ms["rerun"]


@pytest.mark.parametrize("allow_int8", [False, True])
@pytest.mark.parametrize("tokens", [50, 1000, 4000])
def test_the_flip_bandwidth_is_where_the_estimates_meet(allow_int8: bool, tokens: int) -> None:
    planner = HandoffPlanner(allow_int8=allow_int8)
    flip = planner.flip_bandwidth_bps(
        context_tokens=tokens,
        kv_bytes_per_token=PER_TOKEN,
        rtt_ms=20.0,
        prefill_ms_per_token=PER_TOKEN_MS,
        prefill_fixed_ms=FIXED_MS,
    )
    assert 0 < flip < math.inf
    assert plan(planner, flip * 1.01 / MBIT, tokens=tokens).method != "rerun"
    assert plan(planner, flip * 0.99 / MBIT, tokens=tokens).method == "rerun"
    at = plan(planner, flip / MBIT, tokens=tokens)
    kv = [v for k, v in at.estimates_ms.items() if k != "rerun"]
    assert min(kv) == pytest.approx(at.estimates_ms["rerun"])


def test_the_flip_of_one_format() -> None:
    planner = HandoffPlanner(allow_int8=True)
    common = {"context_tokens": TOKENS, "rtt_ms": 20.0, **PREFILL}
    fp16 = planner.flip_bandwidth_bps(kv_bytes_per_token=PER_TOKEN["fp16"], **common)  # type: ignore[arg-type]
    int8 = planner.flip_bandwidth_bps(kv_bytes_per_token=PER_TOKEN["int8"], fmt="int8", **common)  # type: ignore[arg-type]
    assert int8 < fp16
    assert planner.flip_bandwidth_bps(kv_bytes_per_token=PER_TOKEN, fmt="fp16", **common) == fp16  # type: ignore[arg-type]
    assert planner.flip_bandwidth_bps(kv_bytes_per_token=PER_TOKEN, **common) == int8  # type: ignore[arg-type]
    link = LinkEstimate(bandwidth_bps=fp16, rtt_ms=20.0)
    kv = planner.kv_ms(PER_TOKEN["fp16"] * TOKENS, link, "fp16")
    assert kv == pytest.approx(planner.rerun_ms(TOKENS, 0.5, 20.0))


def test_when_the_round_trip_alone_costs_more_the_cache_never_wins() -> None:
    planner = HandoffPlanner()
    flip = planner.flip_bandwidth_bps(
        context_tokens=10,
        kv_bytes_per_token=PER_TOKEN,
        rtt_ms=200.0,
        prefill_ms_per_token=PER_TOKEN_MS,
        prefill_fixed_ms=FIXED_MS,
    )
    assert flip == math.inf
    assert plan(planner, 1e6, rtt_ms=200.0, tokens=10).method == "rerun"


def test_safety_asks_the_cache_to_win_clearly() -> None:
    plain = HandoffPlanner()
    careful = HandoffPlanner(safety=2.0)
    common = {"context_tokens": TOKENS, "kv_bytes_per_token": PER_TOKEN, "rtt_ms": 20.0}
    f1 = plain.flip_bandwidth_bps(**common, **PREFILL)  # type: ignore[arg-type]
    f2 = careful.flip_bandwidth_bps(**common, **PREFILL)  # type: ignore[arg-type]
    assert f2 > f1
    between = (f1 + f2) / 2 / MBIT
    assert plan(plain, between).method == "kv-fp16"
    chosen = plan(careful, between)
    assert chosen.method == "rerun"
    # The recorded estimates stay the unmultiplied ones.
    assert chosen.estimates_ms == plan(plain, between).estimates_ms
    with pytest.raises(ValueError, match="safety"):
        HandoffPlanner(safety=0.5)


def test_no_bandwidth_no_cache_no_context() -> None:
    planner = HandoffPlanner(allow_int8=True)
    down = plan(planner, 0.0)
    assert down.method == "rerun"
    assert set(down.estimates_ms) == {"rerun"}  # never an infinite estimate on the wire
    none = planner.plan(
        context_tokens=TOKENS,
        kv_bytes_per_token={},
        link=LinkEstimate(bandwidth_bps=1e9, rtt_ms=1.0),
        **PREFILL,
    )
    assert none.method == "rerun"
    empty = plan(planner, 1000.0, tokens=0)
    assert empty.method == "rerun"
    assert empty.estimates_ms == {"rerun": 20.0}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context_tokens": -1}, "context_tokens must be >= 0"),
        ({"prefill_ms_per_token": -0.1}, "prefill_ms_per_token must be a finite non-negative"),
        ({"prefill_fixed_ms": math.nan}, "prefill_fixed_ms must be a finite"),
        ({"kv_bytes_per_token": {"fp16": -4}}, r"kv_bytes_per_token\['fp16'\] must be"),
    ],
)
def test_nonsense_figures_are_refused(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "context_tokens": TOKENS,
        "kv_bytes_per_token": PER_TOKEN,
        "link": LinkEstimate(bandwidth_bps=1e8, rtt_ms=10.0),
        **PREFILL,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        HandoffPlanner().plan(**args)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bandwidth_bps"):
        LinkEstimate(bandwidth_bps=-1.0, rtt_ms=1.0)
    with pytest.raises(ValueError, match="rtt_ms"):
        LinkEstimate(bandwidth_bps=1.0, rtt_ms=math.inf)


# --------------------------------------------------------------------------- prefill meter


def test_the_meter_answers_its_defaults_before_any_sample() -> None:
    meter = PrefillMeter(default_ms_per_token=0.7, default_fixed_ms=5.0)
    assert (meter.fixed_ms, meter.ms_per_token, meter.samples) == (5.0, 0.7, 0)
    assert meter.estimate_ms(100) == pytest.approx(75.0)


def test_the_meter_fits_fixed_and_per_token_from_samples() -> None:
    meter = PrefillMeter()
    for tokens in (16, 64, 128, 256, 512, 32, 200):
        assert meter.observe(tokens, 12.0 + 0.25 * tokens)
    assert meter.fixed_ms == pytest.approx(12.0)
    assert meter.ms_per_token == pytest.approx(0.25)
    assert meter.per_token_ms == meter.ms_per_token
    assert meter.estimate_ms(1000) == pytest.approx(262.0)


def test_the_meter_follows_a_host_that_slows_down() -> None:
    meter = PrefillMeter(window=16, halflife=2.0)
    for tokens in (50, 100, 150, 200) * 2:
        meter.observe(tokens, 10.0 + 0.1 * tokens)
    for tokens in (50, 100, 150, 200):
        meter.observe(tokens, 10.0 + 0.4 * tokens)
    # The recent samples weigh most: the slope is close to the new 0.4, far from 0.1.
    assert 0.3 < meter.ms_per_token <= 0.4
    # Past the window only the new regime is left.
    for tokens in (50, 100, 150, 200) * 4:
        meter.observe(tokens, 10.0 + 0.4 * tokens)
    assert meter.ms_per_token == pytest.approx(0.4)
    assert meter.fixed_ms == pytest.approx(10.0)
    assert meter.samples == 16


def test_the_meter_never_goes_negative_and_ignores_empty_samples() -> None:
    meter = PrefillMeter(default_fixed_ms=5.0)
    assert not meter.observe(0, 3.0)
    assert not meter.observe(10, math.nan)
    assert not meter.observe(10, -1.0)
    assert meter.samples == 0
    # A single length: the default fixed part is kept (clamped to the time seen), slope fitted.
    meter.observe(100, 55.0)
    assert meter.fixed_ms == 5.0
    assert meter.ms_per_token == pytest.approx(0.5)
    # Samples whose line would cross zero at a negative fixed part: fitted through the origin.
    steep = PrefillMeter()
    steep.observe(10, 1.0)
    steep.observe(100, 100.0)
    assert steep.fixed_ms == 0.0
    assert steep.ms_per_token > 0
    # Longer prompts measured faster (noise): no negative slope, the mean time instead.
    noisy = PrefillMeter()
    noisy.observe(10, 30.0)
    noisy.observe(100, 20.0)
    assert noisy.ms_per_token == 0.0
    assert noisy.fixed_ms > 0


def test_a_meter_feeds_the_planner() -> None:
    meter = PrefillMeter()
    for tokens in (100, 400, 800):
        meter.observe(tokens, 20.0 + 0.5 * tokens)
    planner = HandoffPlanner()
    chosen = planner.plan(
        context_tokens=TOKENS,
        kv_bytes_per_token=PER_TOKEN,
        link=LinkEstimate(bandwidth_bps=5 * MBIT, rtt_ms=20.0),
        prefill_ms_per_token=meter.ms_per_token,
        prefill_fixed_ms=meter.fixed_ms,
    )
    assert chosen.method == "rerun"
    assert chosen.estimates_ms["rerun"] == pytest.approx(meter.estimate_ms(TOKENS))


def test_the_meter_learns_that_long_prefills_cost_more_per_token() -> None:
    """Attention makes a prefill's cost per token grow with its length (SmolLM2 on this
    machine: ~2.7 ms/token at 512, ~3.8 at 1,024): a straight line fitted on short and long
    prefills overestimates the middle and underestimates the end; the meter's square term
    does not."""
    meter = PrefillMeter()
    truth = {n: 5.0 + 1.5 * n + 0.002 * n * n for n in (48, 96, 192, 384, 768)}
    for n, ms in truth.items():
        assert meter.observe(n, ms)
    assert meter.ms_per_token2 == pytest.approx(0.002, rel=1e-6)
    assert meter.estimate_ms(1024) == pytest.approx(5.0 + 1.5 * 1024 + 0.002 * 1024**2, rel=1e-6)
    assert meter.ms_per_token_at(1024) > meter.ms_per_token_at(128)
    # Two lengths only: no square term, the line as before.
    line = PrefillMeter()
    line.observe(100, 60.0)
    line.observe(200, 110.0)
    assert line.ms_per_token2 == 0.0
    assert line.ms_per_token_at(1000) == pytest.approx(0.5)
