"""Scenario files: the shipped examples load, and every kind of mistake a user makes in one
fails with a message naming the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefed.common.errors import ConfigError
from edgefed.simulation.scenario import (
    Scenario,
    ScenarioError,
    builtin_scenario,
    builtin_scenario_names,
    load_scenario,
    parse_scenario,
)
from edgefed.simulation.scenario_faults import CutLink, KillAgent, SlowAgent

MINIMAL = """\
name: small
duration_s: 30
seed: 5
sites:
  lab:
    uplink: {delay_ms: 2, bandwidth_mbps: 100}
  home:
    uplink: {delay_ms: 15, jitter_ms: 3}
fleet:
  - name: pi
    count: 2
    device: raspberry-pi-5
    site: home
    labels: {tier: arm}
  - {name: nuc, device: x86-nuc, site: lab}
models:
  - {name: enc, builtin: tiny}
workload:
  rate_per_s: 4
rollouts:
  - {at_s: 10, version: 2, strategy: canary, canary_size: 1}
faults:
  - {at_s: 5, kind: kill_agent, agent: pi-2}
  - {at_s: 8, kind: cut_link, site: lab}
  - {at_s: 12, kind: restore_link, site: lab}
  - {at_s: 15, kind: restart_agent, agent: pi-2}
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> ScenarioError:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return info.value


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line containing ``needle``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_a_valid_file_gives_agents_targets_and_a_timeline(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, MINIMAL))
    assert s.agent_ids() == ["pi-1", "pi-2", "nuc-1"]
    assert s.sites["home"].uplink.jitter_ms == 3
    assert s.routing.policy == "latency"
    assert s.model().name == "enc"
    assert isinstance(s.faults[0], KillAgent)
    assert isinstance(s.faults[1], CutLink)
    assert s.faults[1].site == "lab"
    assert s.rollout_agents(s.rollouts[0]) == ["pi-1", "pi-2", "nuc-1"]


@pytest.mark.parametrize("name", ["demo", "split-and-links", "faults"])
def test_the_shipped_scenarios_load(name: str) -> None:
    s = load_scenario(builtin_scenario(name))
    assert s.name == name
    assert s.agent_ids()
    assert s.faults


def test_the_demo_scenario_has_what_the_demo_promises() -> None:
    s = load_scenario(builtin_scenario("demo"))
    devices = {g.device for g in s.fleet}
    sites = {g.site for g in s.fleet}
    assert len(s.agent_ids()) == 4
    assert len(devices) == 4
    assert len(sites) == 4
    kinds = [f.kind for f in s.faults]
    assert "kill_agent" in kinds
    assert "cut_link" in kinds
    assert [r.strategy for r in s.rollouts] == ["canary"]
    assert s.models[0].builtin == "minilm"
    assert s.models[0].fallback == "tiny"


def test_built_in_names_and_an_unknown_one() -> None:
    assert {"demo", "split-and-links", "faults"} <= set(builtin_scenario_names())
    with pytest.raises(ConfigError, match=r"no built-in scenario 'nope'.*demo"):
        builtin_scenario("nope")


def test_a_typo_names_the_field_the_line_and_the_close_match(tmp_path: Path) -> None:
    text = MINIMAL.replace("uplink: {delay_ms: 15,", "uplink: {dealy_ms: 15,")
    err = error_of(tmp_path, text)
    msg = str(err)
    line = line_of(text, "dealy_ms")
    assert f"s.yaml:{line}: sites.home.uplink.dealy_ms: unknown field" in msg
    assert "did you mean 'delay_ms'" in msg


def test_a_typo_in_a_fault_names_the_fault_and_its_fields(tmp_path: Path) -> None:
    text = MINIMAL.replace("kind: cut_link, site: lab}", "kind: cut_link, sight: lab}")
    err = error_of(tmp_path, text)
    line = line_of(text, "sight")
    [problem] = [p for p in err.problems if p.field == "faults[1].sight"]
    assert problem.line == line
    assert "did you mean 'site'" in problem.message


def test_a_wrong_type_names_the_field_the_line_and_the_value(tmp_path: Path) -> None:
    text = MINIMAL.replace("rate_per_s: 4", "rate_per_s: lots")
    msg = str(error_of(tmp_path, text))
    assert f"s.yaml:{line_of(text, 'lots')}: workload.rate_per_s:" in msg
    assert "valid number" in msg
    assert "'lots'" in msg


def test_an_unknown_device_profile_lists_the_known_ones(tmp_path: Path) -> None:
    text = MINIMAL.replace("device: raspberry-pi-5", "device: raspbery-pi-5")
    err = error_of(tmp_path, text)
    [problem] = err.problems
    assert problem.field == "fleet[0].device"
    assert problem.line == line_of(text, "raspbery")
    assert "unknown device profile 'raspbery-pi-5'" in problem.message
    assert "raspberry-pi-5" in problem.message
    assert "jetson-orin-nano" in problem.message


def test_a_missing_required_field_points_at_its_mapping(tmp_path: Path) -> None:
    text = MINIMAL.replace("    device: raspberry-pi-5\n", "")
    err = error_of(tmp_path, text)
    [problem] = err.problems
    assert problem.field == "fleet[0].device"
    assert problem.message == "required field is missing"
    assert problem.line == line_of(text, "- name: pi")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = (
        MINIMAL.replace("rate_per_s: 4", "rate_per_s: -1")
        .replace("policy", "x")
        .replace("count: 2", "count: two")
    )
    fields = {p.field for p in error_of(tmp_path, text).problems}
    assert fields == {"workload.rate_per_s", "fleet[0].count"}


def test_an_unknown_routing_policy_lists_the_policies(tmp_path: Path) -> None:
    text = MINIMAL + "routing: {policy: fastest}\n"
    msg = str(error_of(tmp_path, text))
    assert f"s.yaml:{line_of(text, 'fastest')}: routing.policy:" in msg
    assert "round-robin" in msg


@pytest.mark.parametrize(
    ("old", "new", "field", "words"),
    [
        (
            "agent: pi-2}\n  - {at_s: 8",
            "agent: pi-9}\n  - {at_s: 8",
            "faults[0].agent",
            "no agent 'pi-9'",
        ),
        (
            "kind: cut_link, site: lab",
            "kind: cut_link, site: moon",
            "faults[1].site",
            "no site 'moon'",
        ),
        ("site: home\n", "site: attic\n", "fleet[0].site", "no site 'attic'"),
        (
            "{at_s: 12, kind: restore",
            "{at_s: 99, kind: restore",
            "faults[2].at_s",
            "not before the end",
        ),
        (
            "{at_s: 15, kind: restart_agent",
            "{at_s: 4, kind: restart_agent",
            "faults[3].kind",
            "not down at 4",
        ),
        (
            "canary_size: 1}\n",
            "canary_size: 1}\n  - {at_s: 20, version: 2}\n",
            "rollouts[1].version",
            "does not rise above 2",
        ),
        ("canary_size: 1", "canary_size: 5", "rollouts[0].canary_size", "only 3 are selected"),
    ],
)
def test_cross_references_are_checked_and_placed(
    tmp_path: Path, old: str, new: str, field: str, words: str
) -> None:
    assert old in MINIMAL
    text = MINIMAL.replace(old, new)
    err = error_of(tmp_path, text)
    [problem] = [p for p in err.problems if p.field == field]
    assert words in problem.message
    assert problem.line is not None
    assert str(problem.line) in str(err)


def test_a_link_fault_needs_exactly_one_target(tmp_path: Path) -> None:
    text = MINIMAL.replace("kind: cut_link, site: lab", "kind: cut_link, site: lab, agent: pi-1")
    [problem] = error_of(tmp_path, text).problems
    assert problem.field == "faults[1]"
    assert "exactly one of site or agent" in problem.message


def test_cutting_a_cut_link_or_killing_a_dead_agent_is_refused(tmp_path: Path) -> None:
    text = MINIMAL.replace("kind: restore_link, site: lab", "kind: cut_link, site: lab")
    assert "already cut" in str(error_of(tmp_path, text))
    text = MINIMAL.replace("kind: restart_agent, agent: pi-2", "kind: kill_agent, agent: pi-2")
    assert "already down" in str(error_of(tmp_path, text))


def test_yaml_syntax_errors_and_duplicate_keys_name_the_line(tmp_path: Path) -> None:
    text = MINIMAL.replace("seed: 5", "seed: [5")
    err = error_of(tmp_path, text)
    assert "not valid YAML" in str(err)
    assert err.problems[0].line is not None
    text = MINIMAL.replace("seed: 5", "seed: 5\nseed: 6")
    [problem] = error_of(tmp_path, text).problems
    assert problem.field == "seed"
    assert problem.line == line_of(text, "seed: 6")


def test_a_file_that_is_not_a_mapping_or_not_there(tmp_path: Path) -> None:
    assert "YAML mapping" in str(error_of(tmp_path, "- just\n- a list\n"))
    with pytest.raises(ScenarioError, match="cannot read the file"):
        load_scenario(tmp_path / "missing.yaml")


def test_relative_paths_are_read_from_the_scenario_folder(tmp_path: Path) -> None:
    text = MINIMAL.replace("{name: enc, builtin: tiny}", "{name: enc, teacher: models/t}")
    text = text.replace(
        "rate_per_s: 4\n", "rate_per_s: 4\n  texts: {source: file, path: texts.txt}\n"
    )
    s = load_scenario(write(tmp_path, text))
    assert s.models[0].teacher == tmp_path.resolve() / "models" / "t"
    assert s.workload.texts.path == tmp_path.resolve() / "texts.txt"


def test_python_callers_get_field_paths_without_lines() -> None:
    import yaml

    data = yaml.safe_load(MINIMAL.replace("agent: pi-2}\n  - {at_s: 8", "agent: x}\n  - {at_s: 8"))
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data)
    assert "faults[0].agent: no agent 'x'" in str(info.value)
    s = parse_scenario(yaml.safe_load(MINIMAL))
    assert isinstance(s, Scenario)


def test_slow_agent_bounds(tmp_path: Path) -> None:
    text = MINIMAL + "  - {at_s: 3, kind: slow_agent, agent: nuc-1, factor: 0}\n"
    [problem] = error_of(tmp_path, text).problems
    assert problem.field == "faults[4].factor"
    ok = load_scenario(write(tmp_path, text.replace("factor: 0", "factor: 3"), "ok.yaml"))
    assert isinstance(ok.faults[4], SlowAgent)
    assert ok.faults[4].factor == 3


def test_federation_is_accepted_and_validated(tmp_path: Path) -> None:
    s = load_scenario(write(tmp_path, MINIMAL + "federation: {rounds: 3, strategy: fedprox}\n"))
    assert s.federation is not None
    assert s.federation.rounds == 3
    assert s.not_run_notes() == []
    text = MINIMAL + "federation: {rounds: 0}\n"
    [problem] = error_of(tmp_path, text).problems
    assert problem.field == "federation.rounds"
