"""The planner on a profile of the real pretrained MiniLM measured on this host."""

from __future__ import annotations

import pytest

from edgefed.cloud.split.plan import Link, plan, plan_for
from edgefed.cloud.split.profile import ModelProfile, profile_model
from edgefed.common.devices import load_profile
from tests.compress.tiny_hf import minilm_dir

CLOUD = load_profile("cloud-cpu")


@pytest.fixture(scope="module")
def minilm() -> ModelProfile:
    # seq 64 and few repeats keep this to a few seconds; choices below hold with wide margins
    return profile_model(minilm_dir(), seq=64, repeats=5, warmup=2)


def test_minilm_profile_matches_the_model(minilm: ModelProfile) -> None:
    assert minilm.num_layers == 6
    assert minilm.hidden_size == 384
    assert all(ms > 0 for ms in minilm.forward.layer_ms)
    # a transformer layer costs far more than the embedding lookup or mean pooling
    assert min(minilm.forward.layer_ms) > minilm.forward.embed_ms
    assert min(minilm.forward.layer_ms) > minilm.forward.head_ms
    assert minilm.activation_bytes["fp32"] > 4 * 64 * 384


def test_minilm_plans_follow_device_and_link(minilm: ModelProfile) -> None:
    nano, orin = load_profile("jetson-nano"), load_profile("jetson-orin-nano")
    assert plan(minilm, nano, CLOUD, Link(5, 100)).choice.placement == "cloud"
    assert plan(minilm, orin, CLOUD, Link(100, 1)).choice.placement == "edge"
    private = plan(minilm, nano, CLOUD, Link(5, 100), keep_raw_input_on_device=True)
    assert private.choice.k >= 1
    assert private.choice.total_ms == min(o.total_ms for o in private.options if o.k >= 1)


def test_plan_for_takes_device_and_link_by_name_and_figures(minilm: ModelProfile) -> None:
    result = plan_for(minilm_dir(), "jetson-nano", 5, 100, profile=minilm)
    assert result.choice.placement == "cloud"
    assert result.model == minilm.model
