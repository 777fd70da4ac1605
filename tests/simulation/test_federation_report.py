"""The federated phase in a run's report: accuracy and accepted/rejected updates per round in
report.json, the HTML page (plot + table) and the terminal summary."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from edgefed.simulation.report import write_report
from edgefed.simulation.results import FederationInfo, FederationRound, RunMeta, RunResults


def _results() -> RunResults:
    return RunResults(
        meta=RunMeta(scenario="fed", seed=1, duration_s=30),
        federation=[
            FederationRound(round=1, t_s=12.0, clients=4, accuracy=0.31, loss=2.1, accepted=4),
            FederationRound(
                round=2,
                t_s=20.5,
                clients=4,
                accuracy=0.42,
                loss=1.9,
                accepted=3,
                rejected=["node 3: update norm 41.2 is more than 5x the round's median"],
            ),
        ],
        federation_info=FederationInfo(
            engine="simulation-engine",
            strategy="fedavg",
            clients=4,
            alpha=0.5,
            status="succeeded",
            initial_accuracy=0.05,
        ),
    )


def test_report_has_accuracy_and_updates_per_round(tmp_path: Path) -> None:
    console = Console(record=True, width=160)
    files = write_report(_results(), tmp_path, console=console)
    report = json.loads(files.json.read_text())
    assert [r["accuracy"] for r in report["federation"]] == [0.31, 0.42]
    assert [r["accepted"] for r in report["federation"]] == [4, 3]
    assert "median" in report["federation"][1]["rejected"][0]
    assert report["federation_info"]["strategy"] == "fedavg"
    html = files.html.read_text()
    assert 'id="plot-federation"' in html
    assert "<svg" in html.split('id="plot-federation"')[1]
    assert "42.0 %" in html
    assert "node 3: update norm" in html
    text = console.export_text()
    assert "Federated rounds" in text
    assert "42.0 %" in text
    # Written results load back with the federation records.
    assert RunResults.load(files.results).federation_info == _results().federation_info


def test_a_run_without_federation_has_no_federation_section(tmp_path: Path) -> None:
    files = write_report(RunResults(meta=RunMeta(scenario="x", seed=0, duration_s=5)), tmp_path)
    assert 'id="plot-federation"' not in files.html.read_text()
    assert json.loads(files.json.read_text())["federation_info"] is None
