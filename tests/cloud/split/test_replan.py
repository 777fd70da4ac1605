"""The re-planner keeps its plan while link figures jitter and switches once they leave the band."""

from __future__ import annotations

import pytest

from edgefed.cloud.split.plan import Link, PlanError, plan
from edgefed.cloud.split.replan import Replanner
from edgefed.common.devices import load_profile
from tests.cloud.split.planning_profiles import encoder_profile

CLOUD = load_profile("cloud-cpu")
ORIN = load_profile("jetson-orin-nano")
# jetson-orin-nano, RTT 20 ms: all-edge below ~1.8 Mbit/s, all-cloud above
SLOW_BW, FAST_BW = 1.0, 100.0


def test_first_observation_returns_a_plan() -> None:
    replanner = Replanner(encoder_profile(), CLOUD)
    first = replanner.observe("agent-1", ORIN, Link(20, SLOW_BW))
    assert first is not None
    assert first.choice.placement == "edge"
    assert replanner.current("agent-1") == first
    assert replanner.current("agent-2") is None


def test_jitter_inside_the_band_never_replans() -> None:
    replanner = Replanner(encoder_profile(), CLOUD, band=0.25)
    start = replanner.observe("agent-1", ORIN, Link(20, 1.8))
    assert start is not None
    # ±20 % jitter on both figures, across the point where a fresh plan would flip
    jitter = [(20 * r, 1.8 * b) for r in (0.8, 1.0, 1.2) for b in (0.8, 1.0, 1.2)]
    flips = {plan(encoder_profile(), ORIN, CLOUD, Link(r, b)).choice.placement for r, b in jitter}
    assert len(flips) == 2  # without hysteresis this jitter would flap between edge and cloud
    for _ in range(3):
        for rtt, bw in jitter:
            assert replanner.observe("agent-1", ORIN, Link(rtt, bw)) is None
    assert replanner.current("agent-1") == start


def test_a_move_past_the_band_switches_and_back() -> None:
    replanner = Replanner(encoder_profile(), CLOUD)
    replanner.observe("agent-1", ORIN, Link(20, SLOW_BW))
    faster = replanner.observe("agent-1", ORIN, Link(20, FAST_BW))
    assert faster is not None
    assert faster.choice.placement == "cloud"
    assert faster.link == Link(20, FAST_BW)
    assert replanner.current("agent-1") == faster
    slower = replanner.observe("agent-1", ORIN, Link(20, SLOW_BW))
    assert slower is not None
    assert slower.choice.placement == "edge"


def test_a_move_past_the_band_with_the_same_best_option_pushes_nothing_but_reanchors() -> None:
    replanner = Replanner(encoder_profile(), CLOUD)
    replanner.observe("agent-1", ORIN, Link(20, 0.5))
    assert replanner.observe("agent-1", ORIN, Link(20, 1.0)) is None  # +100 %, still all-edge
    current = replanner.current("agent-1")
    assert current is not None
    assert current.link == Link(20, 1.0)
    assert current.choice.placement == "edge"


def test_a_gain_below_the_margin_keeps_the_current_choice() -> None:
    profile = encoder_profile()
    replanner = Replanner(profile, CLOUD, min_gain=0.3)
    replanner.observe("agent-1", ORIN, Link(20, 1.0))
    # past the band and all-cloud is now ~10 % better, but not 30 % better
    assert plan(profile, ORIN, CLOUD, Link(20, 3.0)).choice.placement == "cloud"
    assert replanner.observe("agent-1", ORIN, Link(20, 3.0)) is None
    current = replanner.current("agent-1")
    assert current is not None
    assert current.choice.placement == "edge"
    # far past it the gain is large enough
    switched = replanner.observe("agent-1", ORIN, Link(1, 1000.0))
    assert switched is not None
    assert switched.choice.placement == "cloud"


def test_rtt_changes_count_too() -> None:
    replanner = Replanner(encoder_profile(), CLOUD)
    replanner.observe("agent-1", ORIN, Link(5, 100))
    assert replanner.current("agent-1") is not None
    assert replanner.observe("agent-1", ORIN, Link(6, 100)) is None
    moved = replanner.observe("agent-1", ORIN, Link(300, 100))
    assert moved is not None
    assert moved.choice.placement == "edge"


def test_keys_are_independent_and_a_new_device_or_constraint_replans() -> None:
    replanner = Replanner(encoder_profile(), CLOUD)
    a = replanner.observe("agent-a", ORIN, Link(20, FAST_BW))
    b = replanner.observe("agent-b", ORIN, Link(20, SLOW_BW))
    assert a is not None
    assert b is not None
    assert (a.choice.placement, b.choice.placement) == ("cloud", "edge")
    private = replanner.observe("agent-a", ORIN, Link(20, FAST_BW), keep_raw_input_on_device=True)
    assert private is not None
    assert private.choice.placement != "cloud"
    nano = replanner.observe("agent-b", load_profile("jetson-nano"), Link(20, SLOW_BW))
    assert nano is not None
    assert nano.edge.name == "jetson-nano"
    replanner.forget("agent-b")
    assert replanner.current("agent-b") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"band": 1.5}, "hysteresis band"),
        ({"band": -0.1}, "hysteresis band"),
        ({"min_gain": -1}, "minimum relative gain"),
        ({"min_gain_ms": -1}, "minimum gain"),
    ],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        Replanner(encoder_profile(), CLOUD, **kwargs)
