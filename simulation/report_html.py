"""``report.html``: one self-contained page (inline CSS and SVG, no scripts, no network) that
opens from a mail attachment or a CI artifact as well as from disk."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from html import escape

from edgefed.simulation.report_plots import PLOT_TITLES
from edgefed.simulation.results import RunResults
from edgefed.simulation.summary import GroupStats, Summary

__all__ = ["render_html"]

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;
max-width:1100px;color:#1d2330;background:#fff;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px}h2{font-size:1.2em;margin-top:32px;
border-bottom:1px solid #d8dde6;padding-bottom:4px}
.meta{color:#5a6372;font-size:.9em}.cards{display:flex;flex-wrap:wrap;gap:12px;margin:16px 0}
.card{border:1px solid #d8dde6;border-radius:8px;padding:10px 14px;min-width:110px}
.card .v{font-size:1.5em;font-weight:600}.card .k{color:#5a6372;font-size:.8em}
.bad .v{color:#b3261e}.good .v{color:#1b7f3b}
table{border-collapse:collapse;font-size:.88em;margin:8px 0;width:100%}
th,td{border-bottom:1px solid #e6e9ef;padding:4px 8px;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f6f9}
figure{margin:8px 0}figure svg{width:100%;height:auto}.empty{color:#8a93a3;font-style:italic}
.notes li{color:#7a5200}
"""


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def _bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:,.1f} {unit}" if unit != "B" else f"{value:,.0f} B"
        value /= 1024
    return f"{value:,.1f} GiB"


_NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+( [KMG]?i?B)?$|^–$")


def _cell(value: object) -> str:
    """A table cell; numbers align right, words left."""
    text = str(value)
    cls = "n" if isinstance(value, int | float) or _NUMBER.match(text) else "t"
    return f'<td class="{cls}">{escape(text)}</td>'


def _table(head: Sequence[str], rows: Iterable[Sequence[object]], cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    out = [f"<table{attr}><thead><tr>"]
    out += [f"<th>{escape(h)}</th>" for h in head]
    out.append("</tr></thead><tbody>")
    count = 0
    for row in rows:
        out.append("<tr>" + "".join(_cell(c) for c in row) + "</tr>")
        count += 1
    if count == 0:
        out.append(f'<tr><td colspan="{len(head)}" class="empty">none</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _group_table(title: str, groups: dict[str, GroupStats]) -> str:
    rows = [
        (
            name,
            g.requests,
            g.ok,
            g.errors,
            g.lost,
            _ms(g.latency.p50_ms if g.latency else None),
            _ms(g.latency.p99_ms if g.latency else None),
            _ms(g.latency.p999_ms if g.latency else None),
        )
        for name, g in groups.items()
    ]
    head = [title, "requests", "ok", "errors", "lost", "p50 ms", "p99 ms", "p99.9 ms"]
    return _table(head, rows)


def _card(key: str, value: str, cls: str = "") -> str:
    return (
        f'<div class="card {cls}"><div class="v">{escape(value)}</div>'
        f'<div class="k">{escape(key)}</div></div>'
    )


def _plot(name: str, svg: str | None) -> str:
    title = escape(PLOT_TITLES[name])
    body = svg if svg is not None else f'<p class="empty">No data for {title.lower()}.</p>'
    return f'<section id="plot-{name}"><h2>{title}</h2><figure>{body}</figure></section>'


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _federation_section(results: RunResults, svg: str | None) -> str:
    info = results.federation_info
    facts = ""
    if info is not None:
        facts = (
            f'<p class="meta">{escape(info.engine)} · strategy {escape(info.strategy)} · '
            f"{info.clients} clients (Dirichlet alpha {info.alpha:g}) · "
            f"{info.byzantine} byzantine · status {escape(info.status)} · accuracy before "
            f"round 1 {_pct(info.initial_accuracy)}"
            + (f" · error: {escape(info.error)}" if info.error else "")
            + "</p>"
        )
    table = _table(
        [
            "round",
            "at s",
            "accepted",
            "rejected",
            "accuracy",
            "eval loss",
            "train loss",
            "seconds",
            "rejections",
        ],
        (
            (
                r.round,
                f"{r.t_s:.2f}",
                r.accepted,
                len(r.rejected),
                _pct(r.accuracy),
                "–" if r.loss is None else f"{r.loss:.3f}",
                "–" if r.train_loss is None else f"{r.train_loss:.3f}",
                "–" if r.seconds is None else f"{r.seconds:.1f}",
                "; ".join(r.rejected),
            )
            for r in results.federation
        ),
        "federation",
    )
    return _plot("federation", svg).replace("</h2>", "</h2>" + facts, 1) + table


def render_html(results: RunResults, summary: Summary, plots: dict[str, str | None]) -> str:
    """The whole page."""
    meta, totals, overall = results.meta, summary.totals, summary.overall
    cards = [
        _card("sent", f"{totals.sent:,}"),
        _card("answered", f"{totals.ok:,}", "good"),
        _card("explicit errors", f"{totals.errors:,}", "bad" if totals.errors else ""),
        _card("lost", f"{totals.lost:,}", "bad" if totals.lost else "good"),
        _card("deadline missed", f"{totals.deadline_missed:,}"),
        _card("p50 ms", _ms(overall.p50_ms if overall else None)),
        _card("p99 ms", _ms(overall.p99_ms if overall else None)),
        _card("p99.9 ms", _ms(overall.p999_ms if overall else None)),
    ]
    facts = (
        f"seed {meta.seed} · {meta.agents} agents ({escape(meta.mode)}) · policy "
        f"{escape(meta.policy or '–')} · planned {meta.duration_s:g} s · wall {meta.wall_s:.1f} s"
        f" · peak memory {_bytes(meta.peak_memory_bytes)} · per agent "
        f"{_bytes(meta.memory_per_agent_bytes)} · started {meta.started_at.isoformat()}"
        f" · edgefed {escape(meta.edgefed_version or '?')} on {escape(meta.host or '?')}"
    )
    notes = "".join(f"<li>{escape(n)}</li>" for n in meta.notes)
    errors = ", ".join(f"{k or '?'}: {v}" for k, v in totals.error_codes.items()) or "none"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>edgefed report: {escape(meta.scenario)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Simulation report: {escape(meta.scenario)}</h1>",
        f'<p class="meta">{facts}</p>',
        f'<ul class="notes">{notes}</ul>' if notes else "",
        f'<div class="cards">{"".join(cards)}</div>',
        f'<p class="meta">Error codes: {escape(errors)}. Lost = sent − answered − explicit '
        "errors.</p>",
        _plot("cdf_target", plots.get("cdf_target")),
        _group_table("target", summary.by_target),
        _plot("cdf_policy", plots.get("cdf_policy")),
        _group_table("policy", summary.by_policy),
        "<h2>Per priority and placement</h2>",
        _group_table("priority", summary.by_priority),
        _group_table("placement", summary.by_placement),
        _plot("timeline", plots.get("timeline")),
        "<h2>Faults</h2>",
        _table(
            ["#", "at s", "kind", "target", "planned s", "injected", "detail"],
            (
                (
                    i,
                    f"{f.t_s:.2f}",
                    f.kind,
                    f.target,
                    "–" if f.planned_at_s is None else f"{f.planned_at_s:g}",
                    "yes" if f.ok else "NO",
                    f.detail,
                )
                for i, f in enumerate(results.faults)
            ),
            "faults",
        ),
        _plot("agent_load", plots.get("agent_load")),
        _table(
            [
                "agent",
                "served",
                "mean load",
                "max load",
                "peak memory",
                "mean CPU %",
                "offline samples",
            ],
            (
                (
                    name,
                    a.served,
                    f"{a.mean_load:.2f}",
                    f"{a.max_load:.0f}",
                    _bytes(a.peak_memory_bytes),
                    "–" if a.mean_cpu_percent is None else f"{a.mean_cpu_percent:.0f}",
                    a.offline_samples,
                )
                for name, a in summary.agents.items()
            ),
        ),
        _plot("rollouts", plots.get("rollouts")),
        _table(
            ["at s", "model", "version", "phase", "agents", "detail"],
            (
                (f"{e.t_s:.2f}", e.model, e.version, e.phase, ", ".join(e.agents), e.detail)
                for e in results.rollouts
            ),
        ),
        "<h2>Split plans chosen</h2>",
        _table(
            [
                "at s",
                "agent",
                "device",
                "site",
                "model",
                "placement",
                "split k",
                "layers",
                "bandwidth Mbit/s",
                "RTT ms",
                "estimate ms",
                "reason",
            ],
            (
                (
                    f"{p.t_s:.2f}",
                    p.agent,
                    p.device or "–",
                    p.site or "–",
                    p.model,
                    p.placement,
                    "–" if p.split_k is None else p.split_k,
                    "–" if p.layers is None else p.layers,
                    _ms(p.bandwidth_mbps),
                    _ms(p.rtt_ms),
                    _ms(p.estimated_ms),
                    p.reason,
                )
                for p in results.splits
            ),
            "splits",
        ),
    ]
    if results.federation or results.federation_info is not None:
        parts.append(_federation_section(results, plots.get("federation")))
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)
