"""The terminal summary of a run: a few rich tables a user reads at the end of
``edgefed simulate`` / ``edgefed demo``."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from edgefed.simulation.results import RunResults
from edgefed.simulation.summary import GroupStats, Summary

__all__ = ["print_summary", "summary_renderable"]


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.1f} MiB"


def _groups(title: str, groups: dict[str, GroupStats], limit: int = 15) -> Table:
    table = Table(title=f"Latency per {title}", title_justify="left")
    table.add_column(title)
    for col in ("requests", "ok", "errors", "lost", "p50 ms", "p99 ms", "p99.9 ms"):
        table.add_column(col, justify="right")
    ranked = sorted(groups.items(), key=lambda kv: -kv[1].requests)
    for name, g in ranked[:limit]:
        lat = g.latency
        table.add_row(
            name,
            f"{g.requests:,}",
            f"{g.ok:,}",
            Text(f"{g.errors:,}", style="red" if g.errors else ""),
            Text(f"{g.lost:,}", style="bold red" if g.lost else ""),
            _ms(lat.p50_ms if lat else None),
            _ms(lat.p99_ms if lat else None),
            _ms(lat.p999_ms if lat else None),
        )
    if len(ranked) > limit:
        table.caption = f"{len(ranked) - limit} more in the report"
    return table


def summary_renderable(results: RunResults, summary: Summary) -> Group:
    """The summary as rich renderables (a heading table, then per target and per policy)."""
    meta, totals, overall = results.meta, summary.totals, summary.overall
    head = Table(
        title=f"Run {meta.scenario} (seed {meta.seed})", title_justify="left", show_header=False
    )
    head.add_column("figure")
    head.add_column("value", justify="right")
    head.add_row("agents", f"{meta.agents} ({meta.mode})")
    head.add_row("wall time", f"{meta.wall_s:.1f} s (planned {meta.duration_s:g} s)")
    head.add_row("peak memory", _mib(meta.peak_memory_bytes))
    head.add_row("memory per agent", _mib(meta.memory_per_agent_bytes))
    head.add_row("sent", f"{totals.sent:,}")
    head.add_row("answered", Text(f"{totals.ok:,}", style="green"))
    head.add_row(
        "explicit errors",
        Text(
            f"{totals.errors:,}" + (f" ({_codes(totals.error_codes)})" if totals.errors else ""),
            style="yellow" if totals.errors else "",
        ),
    )
    head.add_row("lost", Text(f"{totals.lost:,}", style="bold red" if totals.lost else "green"))
    head.add_row("deadline missed", f"{totals.deadline_missed:,}")
    head.add_row(
        "p50 / p99 / p99.9 ms",
        " / ".join(
            _ms(getattr(overall, k) if overall else None) for k in ("p50_ms", "p99_ms", "p999_ms")
        ),
    )
    head.add_row("faults injected", f"{sum(f.ok for f in results.faults)} of {len(results.faults)}")
    head.add_row(
        "split plans",
        ", ".join(
            f"{p.agent}: {p.placement}" + (f" k={p.split_k}" if p.split_k is not None else "")
            for p in results.splits[-8:]
        )
        or "–",
    )
    for note in meta.notes:
        head.add_row("note", Text(note, style="yellow"))
    parts: list[Table] = [
        head,
        _groups("target", summary.by_target),
        _groups("policy", summary.by_policy),
    ]
    if results.federation or results.federation_info is not None:
        parts.append(_federation(results))
    return Group(*parts)


def _federation(results: RunResults) -> Table:
    info = results.federation_info
    title = "Federated rounds"
    if info is not None:
        title += (
            f" ({info.strategy}, {info.clients} clients, alpha {info.alpha:g}, "
            f"{info.engine}: {info.status})"
        )
    table = Table(title=title, title_justify="left")
    for col in ("round", "accepted", "rejected", "accuracy", "eval loss", "seconds"):
        table.add_column(col, justify="right")
    if info is not None and info.initial_accuracy is not None:
        table.add_row("0", "–", "–", f"{100 * info.initial_accuracy:.1f} %", "–", "–")
    for r in results.federation:
        table.add_row(
            str(r.round),
            str(r.accepted),
            Text(str(len(r.rejected)), style="yellow" if r.rejected else ""),
            "–" if r.accuracy is None else f"{100 * r.accuracy:.1f} %",
            "–" if r.loss is None else f"{r.loss:.3f}",
            "–" if r.seconds is None else f"{r.seconds:.1f}",
        )
    if info is not None and info.error:
        table.caption = f"error: {info.error}"
    return table


def _codes(codes: dict[str, int]) -> str:
    return ", ".join(f"{k or '?'} {v}" for k, v in codes.items())


def print_summary(results: RunResults, summary: Summary, console: Console | None = None) -> None:
    (console or Console()).print(summary_renderable(results, summary))
