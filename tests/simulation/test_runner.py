"""The scenario runner end to end: a shipped scenario, shortened and slowed down, runs against a
real fleet (private mosquitto, ``edgefed cloud serve``, cloud workers, agents with shaped links)
serving the tiny model, and its report accounts for every request and every fault.

What a user relies on: every scheduled request ends answered or with an explicit error code,
none lost; every fault of the timeline is injected and recorded with its planned time; the
rollout's phases and the agents' telemetry are in the report; split plans appear when the
scenario asks for them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from edgefed.simulation.runner import RunOptions, override, run_scenario
from edgefed.simulation.scenario import Scenario, builtin_scenario, load_scenario
from edgefed.simulation.workload import build_schedule

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sim-cache")


async def run_small(
    name: str, out: Path, cache: Path, *, duration_s: float, rate: float
) -> tuple[Scenario, dict[str, Any]]:
    scenario = load_scenario(builtin_scenario(name))
    scenario = override(scenario, duration_s=duration_s, rate_per_s=rate)
    console = Console(file=io.StringIO(), width=160)
    options = RunOptions(
        out_dir=out, cache_dir=cache, force_tiny=True, mode="in-process", console=console
    )
    files = await run_scenario(scenario, options)
    assert files.html.is_file()
    assert files.html.stat().st_size > 10_000
    return scenario, json.loads(files.json.read_text())


def assert_every_request_accounted_for(scenario: Scenario, report: dict[str, Any]) -> None:
    totals = report["summary"]["totals"]
    assert totals["sent"] == len(build_schedule(scenario))
    assert totals["ok"] + totals["errors"] == totals["sent"]
    assert totals["lost"] == 0
    assert totals["ok"] > 0


async def test_faults_scenario_injects_every_fault_and_loses_no_request(
    tmp_path: Path, cache_dir: Path
) -> None:
    scenario, report = await run_small("faults", tmp_path / "out", cache_dir, duration_s=14, rate=3)

    assert_every_request_accounted_for(scenario, report)
    kinds = [f["kind"] for f in report["faults"]]
    for fault in scenario.faults:
        assert fault.kind in kinds
    assert "slow_agent_end" in kinds
    assert all(f["ok"] for f in report["faults"]), report["faults"]
    for record in report["faults"]:
        assert record["t_s"] >= record["planned_at_s"] - 0.05
    phases = [e["phase"] for e in report["rollouts"]]
    assert phases[0] in {"pending", "canary", "rolling"}
    assert "loaded" in phases
    assert set(report["agent_load"]) == set(scenario.agent_ids())
    assert report["meta"]["peak_memory_bytes"] > 0


async def test_split_scenario_records_the_placements_it_planned(
    tmp_path: Path, cache_dir: Path
) -> None:
    scenario, report = await run_small(
        "split-and-links", tmp_path / "out", cache_dir, duration_s=14, rate=3
    )

    assert_every_request_accounted_for(scenario, report)
    assert report["splits"], "no split placement was recorded"
    assert {p["agent"] for p in report["splits"]} <= set(scenario.agent_ids())
    assert {p["placement"] for p in report["splits"]} <= {"edge", "cloud", "split"}
    cut = [f for f in report["faults"] if f["kind"] == "cut_link"]
    assert cut
    assert cut[0]["target"] == "nano-lte-2"
