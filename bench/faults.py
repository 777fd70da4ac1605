"""Fault and bad-input drills (issue 10): every row's figures in one table.

Runs each drill module found in ``tests/faults/drills/`` (``rowNN_<name>.py``, see that
package's docstring), in the order of their ``ROW``, with ``full=True`` unless ``--quick``
(``--quick`` runs the bounded versions the tests run). A drill that cannot be imported or that
raises is reported as an error row and the bench goes on with the next one. Each drill sets up
and tears down its own processes (mosquitto, controller, agents) in a temporary folder.

The table: row, what was injected, what must hold, the figures, whether it held. With
``--json`` the last line is one JSON object: ``{"bench": "faults", "figures": {"row_N":
{...}}, "targets": {"row_N_held": bool}, "met": bool}``. Everything the drills themselves print
(Flower's logs, child processes) goes to stderr so that the JSON line stays last on stdout.

    python bench/faults.py [--quick] [--json] [--rows 1,7]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the drills live in the tests package

from tests.faults import drills  # noqa: E402
from tests.faults.drills import DrillResult  # noqa: E402

_MODULE = re.compile(r"^row(\d+)_\w+$")


@dataclass
class Outcome:
    """One row of the table: a drill's result, or why there is none."""

    row: int
    module: str
    inject: str = ""
    must_hold: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    held: bool = False
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    wall_s: float = 0.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def discover() -> list[tuple[int, str]]:
    """(row number from the file name, module name) of every drill module, by row."""
    found = []
    for info in pkgutil.iter_modules(drills.__path__):
        match = _MODULE.match(info.name)
        if match is not None:
            found.append((int(match.group(1)), info.name))
    return sorted(found)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Point file descriptor 1 (and ``sys.stdout``) at stderr while a drill runs: its child
    processes and loggers must not interleave with the table and the JSON line."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run_drill(number: int, name: str, *, full: bool) -> Outcome:
    outcome = Outcome(number, name)
    started = time.monotonic()
    try:
        with _stdout_to_stderr():
            module: ModuleType = importlib.import_module(f"{drills.__name__}.{name}")
            outcome.row = int(getattr(module, "ROW", number))
            outcome.inject = str(getattr(module, "INJECT", ""))
            outcome.must_hold = str(getattr(module, "MUST_HOLD", ""))
            with tempfile.TemporaryDirectory(prefix=f"faults-row{number}-") as tmp:
                result = module.run(Path(tmp), full=full)
        if not isinstance(result, DrillResult):
            raise TypeError(f"run() returned {type(result).__name__}, not a DrillResult")
        outcome.figures = dict(result.figures)
        outcome.held = bool(result.held)
        outcome.notes = list(result.notes)
    except Exception as exc:  # noqa: BLE001 - one broken drill must not stop the others
        outcome.error = f"{type(exc).__name__}: {exc}"
        _log(f"row {number} ({name}) raised:\n{traceback.format_exc()}")
    outcome.wall_s = round(time.monotonic() - started, 1)
    return outcome


def _figures_text(outcome: Outcome) -> str:
    if outcome.error is not None:
        return f"ERROR {outcome.error}"
    return ", ".join(f"{k}={v}" for k, v in outcome.figures.items())


def print_table(outcomes: list[Outcome], mode: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"fault drills ({mode})", show_lines=True)
    for column, style in (("row", "bold"), ("inject", ""), ("must hold", ""), ("figures", "")):
        table.add_column(column, style=style or None, overflow="fold")
    table.add_column("held", no_wrap=True)
    table.add_column("s", justify="right", no_wrap=True)
    for o in outcomes:
        held = "error" if o.error is not None else ("yes" if o.held else "NO")
        table.add_row(str(o.row), o.inject, o.must_hold, _figures_text(o), held, f"{o.wall_s:.0f}")
    width = None if sys.stdout.isatty() else 160
    Console(width=width, soft_wrap=False).print(table)
    for o in outcomes:
        for note in o.notes:
            print(f"  row {o.row}: {note}")


def _rows(text: str, available: list[tuple[int, str]]) -> set[int]:
    try:
        wanted = {int(part) for part in text.split(",") if part.strip()}
    except ValueError as exc:
        raise SystemExit(f"--rows: expected row numbers like 1,7, got {text!r}") from exc
    known = {number for number, _ in available}
    unknown = sorted(wanted - known)
    if unknown:
        raise SystemExit(
            f"--rows: no drill for row(s) {', '.join(map(str, unknown))}; "
            f"drills exist for {', '.join(map(str, sorted(known))) or 'none'}"
        )
    return wanted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the bounded drills the tests run")
    parser.add_argument("--json", action="store_true", help="one JSON object as the last line")
    parser.add_argument("--rows", default=None, help="run only these rows, e.g. 1,7")
    args = parser.parse_args()
    available = discover()
    chosen = available
    if args.rows is not None:
        wanted = _rows(args.rows, available)
        chosen = [(n, name) for n, name in available if n in wanted]
    full = not args.quick
    mode = "full" if full else "quick"
    outcomes = []
    for number, name in chosen:
        _log(f"row {number}: {name} ({mode}) ...")
        outcome = run_drill(number, name, full=full)
        _log(f"row {number}: {'error' if outcome.error else outcome.held} in {outcome.wall_s} s")
        outcomes.append(outcome)
    outcomes.sort(key=lambda o: (o.row, o.module))
    print_table(outcomes, mode)
    targets = {f"row_{o.row}_held": o.error is None and o.held for o in outcomes}
    met = bool(outcomes) and all(targets.values())
    print(f"  {sum(targets.values())} of {len(targets)} rows held -> met: {met}")
    if args.json:
        figures: dict[str, Any] = {"mode": mode}
        for o in outcomes:
            row = dict(o.figures)
            if o.error is not None:
                row["error"] = o.error
            row["wall_s"] = o.wall_s
            figures[f"row_{o.row}"] = row
        print(json.dumps({"bench": "faults", "figures": figures, "targets": targets, "met": met},
                         default=str))  # fmt: skip


if __name__ == "__main__":
    main()
