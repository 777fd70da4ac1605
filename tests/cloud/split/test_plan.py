"""The split planner: choices on fast and slow links, constraints, monotone estimates, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefed.cloud.split.plan import (
    InvalidLink,
    Link,
    NoFeasiblePlan,
    Plan,
    PlanError,
    estimate,
    plan,
    plan_for,
)
from edgefed.cloud.split.profile import scale
from edgefed.common.devices import UnknownDeviceProfile, load_profile
from tests.cloud.split.planning_profiles import (
    MINILM_EMBED_PARAMS,
    MINILM_LAYER_PARAMS,
    decoder_profile,
    encoder_profile,
)

CLOUD = load_profile("cloud-cpu")
FAST = Link(rtt_ms=5, bandwidth_mbps=100)
SLOW = Link(rtt_ms=100, bandwidth_mbps=1)
LINKS = [Link(r, b) for r in (5, 20, 50, 100) for b in (1, 10, 100)]
DEVICES = ["jetson-nano", "jetson-orin-nano", "raspberry-pi-5", "x86-nuc"]


def test_slow_device_on_a_fast_link_runs_all_in_the_cloud() -> None:
    result = plan(encoder_profile(), load_profile("jetson-nano"), CLOUD, FAST)
    assert result.choice.placement == "cloud"
    assert result.choice.k == 0
    assert result.split_point is None


@pytest.mark.parametrize("device", ["jetson-orin-nano", "raspberry-pi-5", "x86-nuc"])
def test_capable_device_on_a_slow_link_runs_all_on_the_edge(device: str) -> None:
    result = plan(encoder_profile(), load_profile(device), CLOUD, SLOW)
    assert result.choice.placement == "edge"
    assert result.choice.k == 6
    assert result.choice.transfer_ms == 0


def test_a_very_slow_device_still_offloads_raw_tokens_over_a_slow_link() -> None:
    # Honest: raw token ids are a few kB, so even at 1 Mbit/s the cloud beats a Jetson Nano.
    result = plan(encoder_profile(), load_profile("jetson-nano"), CLOUD, SLOW)
    assert result.choice.placement == "cloud"


def test_splitting_rarely_wins_because_activations_outweigh_raw_input() -> None:
    for device in DEVICES:
        for link in LINKS:
            result = plan(encoder_profile(), load_profile(device), CLOUD, link)
            assert result.choice.placement != "split", (device, link)
            split = result.option("split", 1)
            assert split.bytes_up > 10 * result.option("cloud").bytes_up


def test_every_option_is_recorded_with_its_estimate() -> None:
    result = plan(encoder_profile(), load_profile("raspberry-pi-5"), CLOUD, FAST)
    assert [o.k for o in result.options] == list(range(7))
    assert [o.placement for o in result.options] == ["cloud"] + ["split"] * 5 + ["edge"]
    for o in result.options:
        assert o.total_ms == pytest.approx(o.edge_ms + o.transfer_ms + o.cloud_ms)
    assert result.choice.total_ms == min(o.total_ms for o in result.options)
    table = result.table()
    for label in ("all-cloud", "all-edge", "split k=1", "split k=5"):
        assert label in table
    assert Plan.model_validate_json(result.model_dump_json()) == result


def test_split_estimate_adds_edge_transfer_and_cloud_parts() -> None:
    profile = encoder_profile()
    edge = load_profile("jetson-nano")
    option = estimate(profile, edge, CLOUD, FAST, 2, dtype="fp16")
    assert option.edge_ms == pytest.approx((0.15 + 2 * 14.0) * edge.speed_factor)
    assert option.cloud_ms == pytest.approx((4 * 14.0 + 0.1) * CLOUD.speed_factor)
    up, down = profile.activation_bytes["fp16"], profile.output_bytes
    assert option.transfer_ms == pytest.approx(5 + (up + down) * 8 / 100e6 * 1e3)
    assert (option.bytes_up, option.bytes_down, option.round_trips) == (up, down, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("link", LINKS, ids=str)
def test_raw_input_on_device_never_runs_all_in_the_cloud(device: str, link: Link) -> None:
    result = plan(
        encoder_profile(), load_profile(device), CLOUD, link, keep_raw_input_on_device=True
    )
    assert result.choice.k >= 1
    assert result.choice.placement != "cloud"
    cloud = result.option("cloud")
    assert not cloud.feasible
    assert cloud.excluded_because == "raw input must stay on the device"
    assert result.choice.total_ms == min(o.total_ms for o in result.options if o.k >= 1)


def test_raw_input_on_device_with_a_slow_device_picks_the_shallowest_split() -> None:
    result = plan(
        encoder_profile(),
        load_profile("jetson-nano"),
        CLOUD,
        FAST,
        keep_raw_input_on_device=True,
    )
    assert result.choice.placement == "split"
    assert result.split_point == 1


def test_edge_memory_limit_rules_out_heads_that_do_not_fit() -> None:
    # fp32 weights: embeddings + 2 layers fit, a third layer does not
    limit = 4 * (MINILM_EMBED_PARAMS + 2 * MINILM_LAYER_PARAMS) + 1000
    result = plan(
        encoder_profile(),
        load_profile("jetson-orin-nano"),
        CLOUD,
        SLOW,
        edge_memory_bytes=limit,
        keep_raw_input_on_device=True,
    )
    assert result.choice.k in (1, 2)
    assert result.edge_memory_bytes == limit
    for o in result.options:
        if o.k >= 3:
            assert not o.feasible
            assert "weights on the device" in (o.excluded_because or "")
        assert o.feasible or o.k == 0 or o.edge_weight_bytes > limit
    # the same limit with int8 weights leaves all-edge feasible (4x smaller)
    int8 = plan(
        encoder_profile(),
        load_profile("jetson-orin-nano"),
        CLOUD,
        SLOW,
        edge_memory_bytes=limit,
        weight_dtype="int8",
    )
    assert int8.choice.placement == "edge"


def test_device_memory_is_the_default_limit() -> None:
    tiny_device = load_profile("raspberry-pi-5").model_copy(update={"memory_bytes": 1024})
    result = plan(encoder_profile(), tiny_device, CLOUD, SLOW)
    assert result.choice.placement == "cloud"
    assert result.edge_memory_bytes == 1024


def test_no_feasible_option_is_a_clear_error() -> None:
    with pytest.raises(NoFeasiblePlan, match="raw input must stay on the device"):
        plan(
            encoder_profile(),
            load_profile("raspberry-pi-5"),
            CLOUD,
            SLOW,
            keep_raw_input_on_device=True,
            edge_memory_bytes=1024,
        )


@pytest.mark.parametrize("device", DEVICES)
def test_estimates_fall_with_bandwidth_and_rise_with_rtt(device: str) -> None:
    profile, edge = encoder_profile(), load_profile(device)
    for k in range(profile.num_layers + 1):
        by_bw = [estimate(profile, edge, CLOUD, Link(20, bw), k).total_ms for bw in (1, 5, 20, 100)]
        by_rtt = [estimate(profile, edge, CLOUD, Link(rtt, 10), k).total_ms for rtt in (1, 10, 50)]
        assert by_bw == sorted(by_bw, reverse=True)
        assert by_rtt == sorted(by_rtt)
        if k == profile.num_layers:  # all-edge does not touch the link
            assert len(set(by_bw)) == 1
            assert len(set(by_rtt)) == 1
        else:
            assert by_bw[0] > by_bw[-1]
            assert by_rtt[0] < by_rtt[-1]


def test_plan_follows_the_measured_bandwidth() -> None:
    edge = load_profile("jetson-orin-nano")
    choices = [
        plan(encoder_profile(), edge, CLOUD, Link(20, bw)).choice.placement for bw in (1, 100)
    ]
    assert choices == ["edge", "cloud"]


def test_smaller_transfer_dtypes_make_splits_cheaper() -> None:
    profile, edge = encoder_profile(), load_profile("jetson-nano")
    link = Link(20, 10)
    times = [
        estimate(profile, edge, CLOUD, link, 3, dtype=d).transfer_ms
        for d in ("fp32", "fp16", "int8")
    ]
    assert times == sorted(times, reverse=True)


def test_decoder_split_pays_one_round_trip_per_generated_token() -> None:
    profile = decoder_profile()
    edge = load_profile("x86-nuc")
    result = plan(profile, edge, CLOUD, Link(50, 10), new_tokens=32, keep_raw_input_on_device=True)
    split = result.option("split", 10)
    assert split.round_trips == 32
    assert split.transfer_ms > 32 * 50
    step = profile.step_activation_bytes
    assert step is not None
    assert split.bytes_up == profile.activation_bytes["fp16"] + 31 * step["fp16"]
    cloud = result.option("cloud")
    assert cloud.round_trips == 1
    # on a 50 ms link, 32 round trips lose to a capable device running all 30 layers
    assert result.choice.placement == "edge"
    # prompt + 31 steps on the edge
    assert result.option("edge").edge_ms == pytest.approx(
        (profile.forward.total_ms + 31 * (0.05 + 30 * 1.2 + 3.5)) * edge.speed_factor
    )


def test_decoder_on_a_near_link_with_a_slow_device_splits_when_raw_input_must_stay() -> None:
    result = plan(
        decoder_profile(),
        load_profile("jetson-nano"),
        CLOUD,
        Link(1, 100),
        new_tokens=8,
        keep_raw_input_on_device=True,
    )
    assert result.choice.placement == "split"
    assert result.new_tokens == 8


def test_bad_inputs_get_clear_errors() -> None:
    profile, edge = encoder_profile(), load_profile("jetson-nano")
    with pytest.raises(InvalidLink, match="bandwidth must be > 0"):
        Link(rtt_ms=5, bandwidth_mbps=-10)
    with pytest.raises(InvalidLink, match="bandwidth must be > 0"):
        Link(rtt_ms=5, bandwidth_mbps=0)
    with pytest.raises(InvalidLink, match="RTT must be >= 0"):
        Link(rtt_ms=-1, bandwidth_mbps=10)
    with pytest.raises(InvalidLink, match="finite"):
        Link(rtt_ms=float("nan"), bandwidth_mbps=10)
    with pytest.raises(PlanError, match="k=7 is out of range"):
        estimate(profile, edge, CLOUD, FAST, 7)
    with pytest.raises(PlanError, match="k=-1 is out of range"):
        estimate(profile, edge, CLOUD, FAST, -1)
    with pytest.raises(PlanError, match="unknown transfer dtype 'bf16'"):
        plan(profile, edge, CLOUD, FAST, dtype="bf16")  # type: ignore[arg-type]
    with pytest.raises(PlanError, match="edge memory must be a positive"):
        plan(profile, edge, CLOUD, FAST, edge_memory_bytes=-5)
    with pytest.raises(PlanError, match="new_tokens must be a positive integer"):
        plan(decoder_profile(), edge, CLOUD, FAST, new_tokens=0)
    with pytest.raises(PlanError, match="reference-host profile"):
        plan(scale(profile, edge), edge, CLOUD, FAST)


def test_plan_for_checks_names_and_link_before_profiling(tmp_path: Path) -> None:
    missing = tmp_path / "no-model"  # never reached: the names and figures fail first
    with pytest.raises(UnknownDeviceProfile, match="'jetson-xyz'"):
        plan_for(missing, "jetson-xyz", 5, 100)
    with pytest.raises(UnknownDeviceProfile, match="'big-cloud'"):
        plan_for(missing, "jetson-nano", 5, 100, cloud_name="big-cloud")
    with pytest.raises(InvalidLink, match="bandwidth"):
        plan_for(missing, "jetson-nano", 5, -100)


def test_plan_for_uses_a_given_profile() -> None:
    result = plan_for(Path("unused"), "jetson-nano", 5, 100, profile=encoder_profile())
    assert result.choice.placement == "cloud"
    assert result.edge.name == "jetson-nano"
    assert result.cloud.name == "cloud-cpu"
