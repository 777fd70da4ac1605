"""The planner can be limited to the split points that can run (those whose head and tail are
published): the others stay in the plan, ruled out, and are never chosen."""

from __future__ import annotations

import pytest

from edgefed.cloud.split import SplitPointError
from edgefed.cloud.split.plan import Link, plan
from edgefed.cloud.split.replan import Replanner
from edgefed.common.devices import load_profile
from tests.cloud.split.planning_profiles import encoder_profile

CLOUD = load_profile("cloud-cpu")
NANO = load_profile("jetson-nano")
FAST = Link(5, 100)


def test_splits_without_artifacts_are_ruled_out_and_the_best_published_one_wins() -> None:
    profile = encoder_profile(layers=4)
    every = plan(profile, NANO, CLOUD, FAST, keep_raw_input_on_device=True)
    limited = plan(profile, NANO, CLOUD, FAST, keep_raw_input_on_device=True, split_points=[2])

    assert (every.choice.placement, every.choice.k) == ("split", 1)
    assert (limited.choice.placement, limited.choice.k) == ("split", 2)
    k1 = limited.option("split", 1)
    assert not k1.feasible
    assert k1.excluded_because == "no head/tail artifacts for split point 1"
    assert limited.option("edge").feasible  # all-edge and all-cloud need no split artifacts


def test_no_published_split_leaves_all_edge_and_all_cloud() -> None:
    limited = plan(encoder_profile(layers=4), NANO, CLOUD, FAST, split_points=())
    assert {o.placement for o in limited.options if o.feasible} == {"edge", "cloud"}
    assert limited.choice.placement == "cloud"


def test_a_split_point_outside_the_model_is_refused() -> None:
    with pytest.raises(SplitPointError, match="out of range"):
        plan(encoder_profile(layers=4), NANO, CLOUD, FAST, split_points=[4])


def test_the_replanner_plans_afresh_when_the_published_split_points_change() -> None:
    replanner = Replanner(encoder_profile(layers=4), CLOUD)
    first = replanner.observe(
        "a", NANO, FAST, keep_raw_input_on_device=True, split_points=frozenset({2})
    )
    same = replanner.observe("a", NANO, FAST, keep_raw_input_on_device=True, split_points=[2])
    more = replanner.observe("a", NANO, FAST, keep_raw_input_on_device=True, split_points=[1, 2])

    assert first is not None
    assert first.choice.k == 2
    assert same is None  # the same points, the same figures: nothing to push
    assert more is not None
    assert more.choice.k == 1
