"""``edgefed demo`` and ``edgefed simulate`` as a user runs them: real processes, real exit codes,
a report on disk. The demo runs shortened (``--duration-s``) on the tiny model (``--tiny``) to
stay within seconds; the real-MiniLM path is the same code with the compression in front."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EDGEFED = [sys.executable, "-m", "edgefed.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFED_")}
    env |= {"COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [*EDGEFED, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_demo_ends_with_a_summary_and_a_report_losing_no_request_across_kill_and_cut(
    tmp_path: Path,
) -> None:
    out = tmp_path / "report"
    result = run(
        "demo",
        "--tiny",
        "--duration-s",
        "16",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
        timeout=290,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "lost" in result.stdout
    assert str(out / "report.html") in result.stdout
    report = json.loads((out / "report.json").read_text())
    totals = report["summary"]["totals"]
    assert totals["sent"] > 0
    assert totals["lost"] == 0
    assert totals["ok"] + totals["errors"] == totals["sent"]
    faults = {(f["kind"], f["target"]): f for f in report["faults"]}
    kill, cut = faults[("kill_agent", "nuc-1")], faults[("cut_link", "site:field")]
    assert kill["ok"]
    assert cut["ok"]
    # Fault times are when the injection started: the SIGKILL lands a moment later (a second
    # is ample), the restart begins at once.
    restarted = faults[("restart_agent", "nuc-1")]
    restart = min(restarted["t_s"], restarted["planned_at_s"])
    during_kill = [
        r
        for r in json.loads((out / "results.json").read_text())["requests"]
        if r["entry"] == "nuc-1" and kill["t_s"] + 1.0 <= r["t_sent_s"] < restart
    ]
    # A device's own applications cannot reach a dead agent: each request ends with an explicit
    # error code (its deadline passing, the message expiring on the device's broker...), or,
    # queued on the device's broker, is answered by the agent once it is back.
    assert during_kill
    for r in during_kill:
        answered_after_restart = r["t_sent_s"] + (r["latency_ms"] or 0) / 1000 >= restart
        assert r["error"] or answered_after_restart, r
    # The canary rollout of v2 started (how far it gets in a 16 s run depends on the host).
    assert any(e["version"] == 2 for e in report["rollouts"]), report["rollouts"]
    assert report["meta"]["agents"] == 4
    assert report["meta"]["mode"] == "processes"
    # The federated phase: 2 rounds in Flower's simulation engine while requests flowed, with
    # the server's held-out accuracy per round.
    info = report["federation_info"]
    assert info["status"] == "succeeded", info
    assert info["engine"] == "simulation-engine"
    rounds = report["federation"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["accepted"] >= 1 for r in rounds), rounds


def test_simulate_lists_the_shipped_scenarios() -> None:
    result = run("simulate", "--list")
    assert result.returncode == 0, result.stderr
    for name in ("demo", "faults", "split-and-links"):
        assert name in result.stdout


def test_a_scenario_with_a_typo_exits_78_naming_the_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = Path(run_builtin_path("demo")).read_text()
    bad.write_text(text.replace("device: x86-nuc", "device: x86-nucc"))

    result = run("simulate", str(bad), "--out", str(tmp_path / "out"))

    assert result.returncode == 78
    assert "fleet[1].device" in result.stderr
    assert "x86-nucc" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_override_that_breaks_the_scenario_is_a_configuration_error(tmp_path: Path) -> None:
    result = run("simulate", "demo", "--rate", "1000000", "--out", str(tmp_path / "out"))
    assert result.returncode == 78
    assert "rate_per_s" in result.stderr


def run_builtin_path(name: str) -> str:
    from edgefed.simulation.scenario import builtin_scenario

    return str(builtin_scenario(name))
