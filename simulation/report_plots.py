"""The report's plots, as inline SVG (no network, no files beside the page).

matplotlib draws on bare :class:`~matplotlib.figure.Figure` objects (no pyplot, so no global
backend or figure registry), with text kept as ``<text>`` (searchable, sharp at any zoom) and a
per-plot hash salt so ids of different plots on one page never collide. Artists a reader or a
test looks for carry SVG ids: ``fault-marker-N`` for the N-th fault line, ``rollout-marker-N``.
"""

from __future__ import annotations

import io
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import numpy as np

from edgefed.simulation.results import RequestOutcome, RunResults
from edgefed.simulation.summary import Summary

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PLOT_TITLES", "cdf_points", "render_plots"]

PLOT_TITLES = {
    "cdf_target": "Latency CDF per target",
    "cdf_policy": "Latency CDF per routing policy",
    "timeline": "Throughput and errors over time",
    "agent_load": "Load per agent",
    "rollouts": "Rollout timeline",
    "federation": "Federated rounds",
}

_MAX_LINES = 12
"""Above this many agents the load plot is a heat map instead of one line per agent."""


def cdf_points(latencies_ms: Iterable[float], points: int = 200) -> list[tuple[float, float]]:
    """(latency ms, share of requests at most that slow), at most ``points`` + 1 points."""
    values = np.sort(np.asarray(list(latencies_ms), dtype=float))
    if values.size == 0:
        return []
    if values.size <= points:
        shares = np.arange(1, values.size + 1) / values.size
        return [(float(v), float(s)) for v, s in zip(values, shares, strict=True)]
    shares = np.linspace(0, 1, points + 1)[1:]
    idx = np.minimum(np.ceil(shares * values.size).astype(int) - 1, values.size - 1)
    return [(float(values[i]), float(s)) for i, s in zip(idx, shares, strict=True)]


def render_plots(results: RunResults, summary: Summary) -> dict[str, str | None]:
    """Plot name -> inline ``<svg>`` (``None`` where the run has no data for it)."""
    return {
        "cdf_target": _cdf(results.requests, lambda r: r.target or "(none)", "cdf_target"),
        "cdf_policy": _cdf(results.requests, lambda r: r.policy, "cdf_policy"),
        "timeline": _timeline(results, summary),
        "agent_load": _agent_load(results),
        "rollouts": _rollouts(results),
        "federation": _federation(results),
    }


# --------------------------------------------------------------------------- drawing helpers


def _figure(height: float = 3.4) -> tuple[Figure, Axes]:
    """A bare figure (matplotlib is imported on first use: it is an optional dependency)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, height), layout="constrained")
    return fig, fig.add_subplot()


def _svg(fig: Figure, name: str) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"edgefed-{name}"}):
        fig.savefig(buf, format="svg")
    text = buf.getvalue()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def _cdf(
    requests: list[RequestOutcome], key: Callable[[RequestOutcome], str], name: str
) -> str | None:
    groups: dict[str, list[float]] = defaultdict(list)
    for r in requests:
        if r.status == "ok" and r.latency_ms is not None:
            groups[key(r)].append(r.latency_ms)
    if not groups:
        return None
    fig, ax = _figure()
    for label in sorted(groups):
        pts = cdf_points(groups[label])
        xs = [max(p[0], 1e-3) for p in pts]
        ax.step(xs, [p[1] for p in pts], where="post", label=f"{label} (n={len(groups[label])})")
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.set_ylabel("share of answered requests")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small", ncols=2 if len(groups) > 6 else 1)
    return _svg(fig, name)


def _timeline(results: RunResults, summary: Summary) -> str | None:
    buckets = summary.timeline
    if not buckets:
        return None
    fig, ax = _figure(3.8)
    width = summary.bucket_s
    t = [b.t_s + width / 2 for b in buckets]
    ax.plot(t, [b.throughput_per_s for b in buckets], label="answered / s", color="tab:blue")
    ax.plot(t, [b.sent / width for b in buckets], label="sent / s", color="tab:gray", ls=":")
    ax.bar(
        t,
        [b.errors / width for b in buckets],
        width=width * 0.8,
        color="tab:red",
        alpha=0.6,
        label="errors / s",
    )
    if any(b.lost for b in buckets):
        ax.bar(
            t,
            [b.lost / width for b in buckets],
            width=width * 0.8,
            color="black",
            alpha=0.7,
            label="lost / s",
            bottom=[b.errors / width for b in buckets],
        )
    _markers(ax, [(f.t_s, f"{f.kind} {f.target}") for f in results.faults], "fault", "tab:red")
    starts = [e for e in results.rollouts if e.phase in ("pending", "canary", "started")]
    _markers(
        ax, [(e.t_s, f"rollout {e.model} v{e.version}") for e in starts], "rollout", "tab:green"
    )
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("requests per second")
    ax.set_xlim(0, max(summary.duration_s, buckets[-1].t_s + width))
    ax.set_ylim(0, ax.get_ylim()[1] * 1.35)  # head room for the markers' labels
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=4, fontsize="small")
    return _svg(fig, "timeline")


def _markers(ax: Axes, events: list[tuple[float, str]], kind: str, color: str) -> None:
    """Vertical lines with labels; each line's SVG id is ``{kind}-marker-{i}``."""
    for i, (t_s, label) in enumerate(events):
        line = ax.axvline(t_s, color=color, ls="--", lw=1.2, alpha=0.8)
        line.set_gid(f"{kind}-marker-{i}")
        ax.annotate(
            label,
            xy=(t_s, 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize="x-small",
            color=color,
        )


def _agent_load(results: RunResults) -> str | None:
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in results.telemetry:
        series[s.agent].append((s.t_s, s.load))
    if not series:
        return None
    agents = sorted(series)
    if len(agents) <= _MAX_LINES:
        fig, ax = _figure()
        for agent in agents:
            pts = sorted(series[agent])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=agent, drawstyle="steps-post")
        ax.set_ylabel("requests in progress + queued")
        ax.legend(loc="upper right", fontsize="small", ncols=2 if len(agents) > 6 else 1)
    else:
        fig, ax = _figure(min(2 + 0.08 * len(agents), 9))
        end = max(t for pts in series.values() for t, _ in pts) or 1.0
        cols = 60
        grid = np.zeros((len(agents), cols))
        for row, agent in enumerate(agents):
            for t_s, load in series[agent]:
                col = min(int(t_s / end * cols), cols - 1)
                grid[row, col] = max(grid[row, col], load)
        image = ax.imshow(
            grid,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            extent=(0, end, -0.5, len(agents) - 0.5),
            interpolation="nearest",
        )
        ax.set_ylabel(f"agent (of {len(agents)})")
        fig.colorbar(image, ax=ax, label="peak load")
    ax.set_xlabel("time since start (s)")
    ax.grid(True, alpha=0.3)
    return _svg(fig, "agent_load")


def _rollouts(results: RunResults) -> str | None:
    events = results.rollouts
    if not events:
        return None
    lanes = sorted({(e.model, e.version) for e in events})
    fig, ax = _figure(1.4 + 0.5 * len(lanes))
    for row, (model, version) in enumerate(lanes):
        mine = sorted(
            (e for e in events if (e.model, e.version) == (model, version)), key=lambda e: e.t_s
        )
        ts = [e.t_s for e in mine]
        ax.plot(ts, [row] * len(ts), marker="o", color="tab:green")
        for e in mine:
            ax.annotate(
                e.phase,
                xy=(e.t_s, row),
                xytext=(0, 6),
                textcoords="offset points",
                fontsize="x-small",
                rotation=30,
            )
    ax.set_yticks(range(len(lanes)), [f"{m} v{v}" for m, v in lanes])
    ax.set_ylim(-0.6, len(lanes) - 0.2)
    ax.set_xlim(0, results.meta.duration_s)
    ax.set_xlabel("time since start (s)")
    ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig, "rollouts")


def _federation(results: RunResults) -> str | None:
    """Held-out accuracy per round (round 0: the starting model) over bars of accepted and
    rejected updates."""
    rounds = results.federation
    if not rounds:
        return None
    fig, ax = _figure()
    info = results.federation_info
    xs = [r.round for r in rounds]
    accuracy = [math.nan if r.accuracy is None else r.accuracy for r in rounds]
    if info is not None and info.initial_accuracy is not None:
        xs, accuracy = [0, *xs], [info.initial_accuracy, *accuracy]
    bars = ax.twinx()
    width = 0.35
    bars.bar(
        [r.round - width / 2 for r in rounds],
        [r.accepted for r in rounds],
        width,
        color="#1b7f3b",
        alpha=0.35,
        label="accepted updates",
    )
    bars.bar(
        [r.round + width / 2 for r in rounds],
        [len(r.rejected) for r in rounds],
        width,
        color="#b3261e",
        alpha=0.35,
        label="rejected updates",
    )
    bars.set_ylabel("updates")
    ax.plot(xs, accuracy, marker="o", color="#1f4e9c", label="held-out accuracy", zorder=3)
    ax.set_zorder(bars.get_zorder() + 1)
    ax.patch.set_visible(False)
    ax.set_ylim(0, 1)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_xticks(xs)
    handles = ax.get_legend_handles_labels()
    more = bars.get_legend_handles_labels()
    ax.legend(handles[0] + more[0], handles[1] + more[1], loc="best", fontsize="small")
    ax.grid(True, alpha=0.3)
    return _svg(fig, "federation")
