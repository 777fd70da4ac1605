"""From a scenario to the fleet the harness starts: the agents, links, pools, models, split and
routing settings, and the duration/rate overrides of quick runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefed.simulation.mapping import fleet_spec, split_points
from edgefed.simulation.prepare import PreparedModel, serving_target
from edgefed.simulation.runner import override
from edgefed.simulation.scenario import builtin_scenario, load_scenario
from edgefed.simulation.scenario_faults import SlowAgent
from edgefed.simulation.workload import build_schedule


def prepared(tmp_path: Path, name: str, layers: int = 6) -> PreparedModel:
    onnx = tmp_path / f"{name}-onnx"
    onnx.mkdir()
    (onnx / "model.onnx").write_bytes(b"graph")
    (onnx / "config.json").write_text("{}")
    hf = tmp_path / f"{name}-hf"
    hf.mkdir()
    return PreparedModel(name, "feature-extraction", "tiny", onnx, "x86-avx2", hf, layers, False)


def test_the_demo_maps_to_its_agents_links_pools_and_split_placement(tmp_path: Path) -> None:
    scenario = load_scenario(builtin_scenario("demo"))

    spec = fleet_spec(scenario, {"minilm": prepared(tmp_path, "minilm")})

    assert [a.name for a in spec.agents] == ["orin-1", "nuc-1", "pi-1", "nano-1"]
    assert spec.agents[3].device == "jetson-nano"
    assert spec.agents[3].site == "field"
    assert spec.link("field").delay_ms == 40
    assert spec.link("field").loss == 0.01
    assert [(p.name, p.workers) for p in spec.pools] == [("default", 1)]
    assert spec.models[0].split_points == [2, 4]
    assert spec.pool_models(spec.pools[0]) == ["minilm", "minilm.k2.tail", "minilm.k4.tail"]
    assert spec.controller["split"] == {
        "enabled": True,
        "models": {"minilm": {"pool": "default"}},
    }
    assert spec.controller["routing_policy"] == "latency"
    assert spec.local_endpoints  # requests enter at the agents
    assert spec.offload["pools"] == ["default"]
    assert spec.offload["policy"] == "latency"


def test_split_off_publishes_no_pairs_and_leaves_placement_off(tmp_path: Path) -> None:
    scenario = load_scenario(builtin_scenario("faults"))

    spec = fleet_spec(scenario, {"tiny-encoder": prepared(tmp_path, "tiny-encoder", 4)})

    assert spec.models[0].split_points == []
    assert "split" not in spec.controller
    assert spec.controller["routing_policy"] == "round-robin"


@pytest.mark.parametrize(("layers", "points"), [(6, [2, 4]), (4, [1, 2]), (2, [1]), (1, [])])
def test_split_points_cut_a_third_and_two_thirds_of_the_way(layers: int, points: list[int]) -> None:
    assert split_points(layers) == points


def test_the_served_target_is_the_one_this_host_runs_as_intended() -> None:
    assert serving_target(("arm64", "x86-avx2")) == "x86-avx2"
    assert serving_target(("arm64",)) == "arm64"


def test_a_shorter_run_scales_the_whole_timeline() -> None:
    scenario = load_scenario(builtin_scenario("faults"))

    short = override(scenario, duration_s=15, rate_per_s=2)

    assert short.duration_s == 15
    assert short.workload.rate_per_s == 2
    assert [f.at_s for f in short.faults] == [f.at_s / 4 for f in scenario.faults]
    slow = next(f for f in short.faults if isinstance(f, SlowAgent))
    assert slow.duration_s == 2
    assert short.rollouts[0].at_s == 1.25
    assert short.rollouts[0].soak_s == 1.25
    assert short.workload.bursts[0].at_s == 2.5
    assert all(r.t_offset_s < 15 for r in build_schedule(short))


def test_an_override_that_breaks_the_scenario_is_refused_naming_the_field() -> None:
    scenario = load_scenario(builtin_scenario("demo"))
    with pytest.raises(ValueError, match="rate_per_s"):
        override(scenario, rate_per_s=10**7)


def test_the_tiny_tokenizer_is_built_offline_without_minilm(tmp_path: Path) -> None:
    from edgefed.simulation.tiny import _wordpiece_tokenizer

    tokenizer = _wordpiece_tokenizer()

    ids = tokenizer("The compiler reports an unused variable.")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id
    assert ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert len(tokenizer) <= 2000
