"""How ``edgefed compress`` shows its work: steps, a distillation progress bar with loss and
ETA, and the validation report as a table."""

from __future__ import annotations

from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table

from edgefed.cloud.compress.distill import DistillProgress
from edgefed.cloud.compress.pipeline import CompressResult


class Progress:
    """Context manager handing ``step`` and ``distill`` callbacks to the pipeline."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bar = RichProgress(
            TextColumn("distilling"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  held-out {task.fields[holdout]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> Self:
        self._bar.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._bar.__exit__(exc_type, exc, tb)

    def step(self, message: str) -> None:
        self.console.print(f"• {message}")

    def distill(self, event: DistillProgress) -> None:
        holdout = "-" if event.holdout is None else f"{event.holdout:.4f}"
        if self._task is None:
            self._task = self._bar.add_task(
                "distill", total=event.total_steps, loss=event.loss, holdout=holdout
            )
        self._bar.update(
            self._task,
            completed=event.step,
            total=event.total_steps,
            loss=event.loss,
            holdout=holdout,
        )


def print_report(console: Console, result: CompressResult) -> None:
    table = Table(title=f"{result.name} v{result.version} ({result.task})", show_lines=True)
    table.add_column("target")
    table.add_column("status")
    table.add_column("quality vs teacher", no_wrap=True)
    table.add_column("b1 ms (x teacher)", justify="right")
    table.add_column("b32 ms (x teacher)", justify="right")
    table.add_column("size MB", justify="right")
    for t in result.targets:
        r = t.report
        quality = "\n".join(f"{k} {v:.4f}" for k, v in r.quality.items())
        lat = r.latency
        status = "[green]published[/green]" if t.published else "[red]refused[/red]"
        table.add_row(
            t.target,
            status,
            quality,
            f"{lat.get('b1_ms', float('nan')):.2f} ({lat.get('speedup_b1', float('nan')):.2f}x)",
            f"{lat.get('b32_ms', float('nan')):.1f} ({lat.get('speedup_b32', float('nan')):.2f}x)",
            f"{r.size_bytes / 1e6:.1f}",
        )
    console.print(table)
    if result.student_layers is not None:
        console.print(f"student layers: {result.student_layers}")
    console.print(f"ONNX parity with torch: max |diff| {result.parity.max_abs_diff:.2e}")
    for t in result.targets:
        if t.artifact_dir is not None:
            console.print(f"{t.target}: {t.artifact_dir}")
        if t.rejected is not None:
            console.print(f"[red]{t.rejected.message}[/red]")
    if result.signing_key_file is not None:
        console.print(f"signed with {result.signing_key_file}")
