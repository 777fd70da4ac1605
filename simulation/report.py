"""Reports of a simulation run: ``report.json`` (every figure), ``report.html`` (the same
figures with plots, one self-contained file) and ``results.json`` (the raw records, to report
again later with :meth:`RunResults.load`), plus the terminal summary.

``report.json`` holds the summary (totals, latency quantiles per target, policy, priority and
placement, the time buckets, per-agent load), the plotted series (latency CDFs, per-agent load
samples) and every event (faults, rollouts, split plans, federated rounds), so any number on
the page can be checked or re-plotted without the raw records.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from edgefed.simulation.report_console import print_summary
from edgefed.simulation.report_html import render_html
from edgefed.simulation.report_plots import cdf_points, render_plots
from edgefed.simulation.results import RequestOutcome, RunResults
from edgefed.simulation.summary import Summary, summarize

__all__ = ["ReportFiles", "print_summary", "report_figures", "write_report"]

REPORT_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class ReportFiles:
    json: Path
    html: Path
    results: Path
    summary: Summary


def _cdfs(requests: list[RequestOutcome], attr: str) -> dict[str, list[tuple[float, float]]]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r in requests:
        if r.status == "ok" and r.latency_ms is not None:
            groups[str(getattr(r, attr) or "(none)")].append(r.latency_ms)
    return {name: cdf_points(values) for name, values in sorted(groups.items())}


def report_figures(results: RunResults, summary: Summary) -> dict[str, Any]:
    """The content of ``report.json``."""
    load: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in sorted(results.telemetry, key=lambda s: (s.agent, s.t_s)):
        load[s.agent].append(s.model_dump(mode="json", exclude={"agent"}))
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "meta": results.meta.model_dump(mode="json")
        | {"memory_per_agent_bytes": results.meta.memory_per_agent_bytes},
        "summary": summary.model_dump(mode="json"),
        "latency_cdf": {
            "by_target": _cdfs(results.requests, "target"),
            "by_policy": _cdfs(results.requests, "policy"),
        },
        "agent_load": dict(load),
        "faults": [f.model_dump(mode="json") for f in results.faults],
        "rollouts": [e.model_dump(mode="json") for e in results.rollouts],
        "splits": [p.model_dump(mode="json") for p in results.splits],
        "federation": [r.model_dump(mode="json") for r in results.federation],
        "federation_info": (
            results.federation_info.model_dump(mode="json") if results.federation_info else None
        ),
    }


def write_report(
    results: RunResults,
    out_dir: str | Path,
    *,
    bucket_s: float | None = None,
    console: Console | None = None,
) -> ReportFiles:
    """Write ``report.json``, ``report.html`` and ``results.json`` into ``out_dir`` (created if
    needed) and, with ``console``, print the summary there."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(results, bucket_s)
    json_path = out / "report.json"
    json_path.write_text(
        json.dumps(report_figures(results, summary), indent=1, allow_nan=False) + "\n",
        encoding="utf-8",
    )
    html_path = out / "report.html"
    html_path.write_text(
        render_html(results, summary, render_plots(results, summary)), encoding="utf-8"
    )
    results_path = results.save(out / "results.json")
    if console is not None:
        print_summary(results, summary, console)
    return ReportFiles(json_path, html_path, results_path, summary)
