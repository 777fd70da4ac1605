"""Reports: report.json holds every figure, report.html is one self-contained page with the
plots and fault markers, renders in headless Chromium (Debian's ``chromium`` package) to a
picture that is not blank, and the terminal summary shows the counts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from edgefed.simulation.report import ReportFiles, print_summary, write_report
from edgefed.simulation.report_html import render_html
from edgefed.simulation.results import FaultRecord, RunMeta, RunResults
from edgefed.simulation.summary import summarize
from tests.simulation.synthetic import ERRORS, LOST, SENT, synthetic_results

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "scripts" / "screenshot_report.py"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunResults, ReportFiles]:
    """One report of the synthetic run, shared by the tests that only read it."""
    results = synthetic_results()
    return results, write_report(results, tmp_path_factory.mktemp("report"))


def test_report_json_holds_every_figure(written: tuple[RunResults, ReportFiles]) -> None:
    results, files = written
    data = json.loads(files.json.read_text())
    totals = data["summary"]["totals"]
    assert (totals["sent"], totals["ok"], totals["errors"], totals["lost"]) == (
        SENT,
        SENT - ERRORS - LOST,
        ERRORS,
        LOST,
    )
    targets = data["summary"]["by_target"]
    assert set(targets) == {"orin-1", "nuc-1", "pi-1", "nano-1", "worker-default"}
    assert targets["nano-1"]["latency"]["p99_ms"] > targets["nuc-1"]["latency"]["p99_ms"]
    assert set(data["summary"]["by_policy"]) == {"latency", "round-robin"}
    assert len(data["summary"]["timeline"]) == 60
    for series in data["latency_cdf"]["by_target"].values():
        shares = [p[1] for p in series]
        latencies = [p[0] for p in series]
        assert shares == sorted(shares)
        assert latencies == sorted(latencies)
        assert shares[-1] == 1.0
    assert [f["kind"] for f in data["faults"]] == ["kill_agent", "cut_link", "restore_link"]
    assert data["faults"][0]["t_s"] == 20.01
    assert [e["phase"] for e in data["rollouts"]] == ["canary", "soaking", "rolling", "completed"]
    assert {p["agent"]: p["placement"] for p in data["splits"]} == {
        "pi-1": "split",
        "nano-1": "edge",
    }
    assert len(data["agent_load"]["pi-1"]) == 60
    assert data["meta"]["memory_per_agent_bytes"] == 150 * 2**20
    assert data["meta"]["wall_s"] == 75.5
    assert RunResults.load(files.results) == results


def test_report_html_is_self_contained_with_plots_and_fault_markers(
    written: tuple[RunResults, ReportFiles],
) -> None:
    html = written[1].html.read_text()
    assert html.startswith("<!DOCTYPE html>")
    for plot in ("cdf_target", "cdf_policy", "timeline", "agent_load", "rollouts"):
        section = html.split(f'id="plot-{plot}"', 1)[1].split("</section>", 1)[0]
        assert "<svg" in section, plot
    for i in range(3):
        assert f'id="fault-marker-{i}"' in html
    assert 'id="fault-marker-3"' not in html
    assert 'id="rollout-marker-0"' in html
    assert "kill_agent agent:nuc-1" in html  # the marker's label, as SVG text
    assert "head on device, tail in the cloud" in html  # the split plans table
    # Nothing to fetch: no scripts, no external images, styles or fonts.
    assert "<script" not in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    # Clip paths of different plots must not share ids, or one plot clips another.
    clip_ids = re.findall(r'<clipPath id="([^"]+)"', html)
    assert clip_ids
    assert len(clip_ids) == len(set(clip_ids))


def test_text_from_the_run_is_escaped() -> None:
    results = synthetic_results()
    results.faults.append(
        FaultRecord(
            t_s=50,
            kind="kill_agent",
            target="agent:pi-1",
            ok=False,
            detail="<script>alert(1)</script>",
        )
    )
    html = render_html(results, summarize(results), plots={})
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script" not in html


def test_a_large_fleet_gets_a_heat_map_and_empty_sections_say_so(tmp_path: Path) -> None:
    agents = tuple(f"a-{i}" for i in range(30))
    html = write_report(synthetic_results(agents=agents), tmp_path / "big").html.read_text()
    load = html.split('id="plot-agent_load"', 1)[1].split("</section>", 1)[0]
    assert "<image" in load  # the heat map, embedded as a data URI inside the SVG
    assert 'href="data:image/png;base64,' in load
    bare = RunResults(meta=RunMeta(scenario="bare", seed=0, duration_s=5))
    html = write_report(bare, tmp_path / "bare").html.read_text()
    assert "No data for latency cdf per target" in html
    assert "No data for load per agent" in html


def test_the_terminal_summary_shows_counts_and_targets() -> None:
    console = Console(record=True, width=140, color_system=None)
    results = synthetic_results()
    print_summary(results, summarize(results), console)
    text = console.export_text()
    assert re.search(r"lost\s*│\s*12", text)
    assert re.search(r"explicit errors\s*│\s*30 \(timeout 30\)", text)
    assert "worker-default" in text
    assert "round-robin" in text
    assert "model minilm fell back to tiny" in text


def screenshot(html: Path, png: Path) -> subprocess.CompletedProcess[str]:
    """Runs the script as a user would; it needs Debian's ``chromium`` package."""
    return subprocess.run(
        [sys.executable, str(SCREENSHOT), str(html), "--out", str(png)],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_the_report_renders_in_headless_chromium(
    written: tuple[RunResults, ReportFiles], tmp_path: Path
) -> None:
    html = written[1].html
    proc = screenshot(html, tmp_path / "shot.png")
    assert proc.returncode != 2, (
        f"chromium missing or failed (apt-get install -y chromium): {proc.stderr}"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ": ok" in proc.stdout
    assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_the_screenshot_check_catches_a_blank_page(tmp_path: Path) -> None:
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    proc = screenshot(blank, tmp_path / "blank.png")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "BLANK" in proc.stdout
