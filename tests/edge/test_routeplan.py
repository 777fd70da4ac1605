"""Where a model's local requests may go (pure planning): the placement is the first choice,
raw input never goes to a pool when it must stay on the device, a missing head falls back with
a reason; offload settings are validated with clear errors; placements survive a restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgefed.common.errors import ConfigError
from edgefed.common.schemas import Placement
from edgefed.edge.config import AgentConfig, OffloadConfig
from edgefed.edge.placements import PlacementBook
from edgefed.edge.routeplan import plan_route

M = "m"
HEAD1 = "m.k1.head"


def cloud(**kw: Any) -> Placement:
    return Placement(mode="cloud", pool="gpu", **kw)


def split(k: int = 1, **kw: Any) -> Placement:
    return Placement(mode="split", split_point=k, pool="gpu", **kw)


def test_without_placement_and_offload_off_requests_are_served_as_before() -> None:
    assert plan_route(M, None, OffloadConfig(), [M, HEAD1]) is None


def test_a_placement_applies_even_with_offload_off_and_is_the_first_choice() -> None:
    plan = plan_route(M, cloud(expected_ms=4), OffloadConfig(), [M])

    assert plan is not None
    assert plan.first == "cloud"
    assert plan.pools == ("gpu",)
    assert plan.local is True
    assert plan.note is None


def test_offload_enabled_without_placement_keeps_the_agent_first_with_pools_beside() -> None:
    plan = plan_route(M, None, OffloadConfig(enabled=True, pools=["a", "b"]), [M])

    assert plan is not None
    assert (plan.first, plan.pools) == ("edge", ("a", "b"))


def test_split_placement_uses_its_head_and_the_placements_pool_for_the_tail() -> None:
    plan = plan_route(M, split(2), OffloadConfig(pools=["other"]), [M, HEAD1, "m.k2.head"])

    assert plan is not None
    assert (plan.first, plan.head, plan.tail_pool) == ("split", "m.k2.head", "gpu")
    assert plan.pools == ()  # a split placement's pool takes tails, not whole requests


def test_keep_raw_input_on_device_leaves_no_pool_target_but_allows_split() -> None:
    placement = Placement(mode="edge", keep_raw_input_on_device=True)
    plan = plan_route(M, placement, OffloadConfig(enabled=True, pools=["gpu"]), [M, HEAD1])

    assert plan is not None
    assert plan.pools == ()
    assert plan.head == HEAD1
    assert plan.keep_raw_input_on_device


def test_keep_raw_input_in_the_settings_overrides_a_cloud_placement() -> None:
    config = OffloadConfig(keep_raw_input_on_device=True)
    plan = plan_route(M, cloud(), config, [M])

    assert plan is not None
    assert plan.pools == ()
    assert plan.first == "edge"
    assert plan.note is not None
    assert "raw input stays on the device" in plan.note


def test_a_split_placement_whose_head_is_not_installed_falls_back_with_its_reason() -> None:
    plan = plan_route(M, split(3), OffloadConfig(), [M])

    assert plan is not None
    assert plan.first == "edge"
    assert plan.note is not None
    assert "m.k3.head is not installed" in plan.note
    assert "falling back to edge" in plan.note


def test_a_missing_head_with_another_installed_splits_there_and_says_so() -> None:
    plan = plan_route(M, split(3), OffloadConfig(), [HEAD1])

    assert plan is not None
    assert (plan.first, plan.head) == ("split", HEAD1)
    assert plan.note is not None
    assert "instead" in plan.note


def test_nothing_to_serve_the_model_is_a_plan_with_no_first_choice() -> None:
    plan = plan_route(M, Placement(mode="edge", keep_raw_input_on_device=True), OffloadConfig(), [])

    assert plan is not None
    assert plan.first is None


def test_placements_can_be_ignored() -> None:
    assert plan_route(M, cloud(), OffloadConfig(follow_placements=False), [M]) is None


@pytest.mark.parametrize(
    ("offload", "message"),
    [
        ({"policy": "fastest"}, "routing policy 'fastest' is unknown"),
        ({"enabled": True}, "offload is enabled but names no pool"),
        ({"pools": ["a", "a"]}, "lists a pool twice"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"other_prior_factor": 0.5}, "other_prior_factor"),
        ({"wire_dtype": "int4"}, "wire_dtype"),
        ({"hedging": True}, "hedging"),
    ],
)
def test_a_bad_offload_section_is_refused_naming_what_is_wrong(
    tmp_path: Path, offload: dict[str, Any], message: str
) -> None:
    config = {
        "agent_id": "a1",
        "fleet": "f",
        "controller_url": "http://c",
        "broker_url": "mqtt://b",
        "trusted_keys": ["k"],
        "state_dir": str(tmp_path),
        "offload": offload,
    }
    (tmp_path / "agent.json").write_text(json.dumps(config))

    with pytest.raises(ConfigError, match=message):
        AgentConfig.load(tmp_path)


def test_the_offload_section_becomes_the_shared_routers_settings() -> None:
    router = OffloadConfig(policy="round-robin", timeout_s=3, hedge=True).router_config()

    assert (router.policy, router.default_timeout_s, router.hedge) == ("round-robin", 3, True)


async def test_placements_are_kept_on_disk_and_come_back_after_a_restart(tmp_path: Path) -> None:
    book = PlacementBook(tmp_path)
    heard: list[dict[str, Placement]] = []
    book.on_change(lambda p: heard.append(dict(p)))

    changed = await book.apply(4, {M: split(1)})
    again = await book.apply(4, {M: split(1)})
    restarted = PlacementBook(tmp_path)
    loaded = restarted.load()

    assert (changed, again) == (True, False)
    assert heard == [{}, {M: split(1)}]
    assert loaded == {M: split(1)}
    assert restarted.generation == 4


def test_an_unreadable_placements_file_means_none_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / "placements.json").write_text("{not json")

    assert PlacementBook(tmp_path).load() == {}
