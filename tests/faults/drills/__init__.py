"""Fault drills: one module per row of the table, ``rowNN_<name>.py``, each with

    ROW: int                      # the row's number in issue 10's table
    INJECT: str                   # what is injected (one line)
    MUST_HOLD: str                # what must hold (one line)
    def run(workdir: Path, *, full: bool = False) -> DrillResult

``run`` sets up what it needs under ``workdir`` (its own mosquitto on a free loopback port,
controller and agents as processes, ...), injects the fault, measures, tears everything down
(also on failure) and returns the figures. Tests in ``tests/faults/test_rowNN_*.py`` call it
with ``full=False`` (bounded: well under a minute each on a loaded 2-core machine) and assert
the property; ``bench/faults.py`` calls every drill (``full=True`` unless ``--quick``) and
prints one table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Figure = int | float | str | bool


@dataclass(frozen=True)
class DrillResult:
    """What one drill measured."""

    row: int
    figures: dict[str, Figure]
    """Named as in the issue's "figure" column (e.g. ``lost``, ``duplicated``, ``recovery_s``)."""
    held: bool
    """Whether the row's "must hold" held in this run."""
    notes: list[str] = field(default_factory=list)
    """What a reader of the bench table should know (sizes, what was measured how)."""
