"""Shared pieces of the server-side federation tests (see toy.py for the task)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Message

from edgefed.cloud.federation.local_grid import LocalGrid
from edgefed.cloud.federation.progress import ProgressWriter
from edgefed.cloud.federation.rounds import FederationResult, run_rounds
from edgefed.cloud.federation.strategies import ValidatingStrategy
from tests.cloud.federation import toy


def run_toy(
    strategy: ValidatingStrategy,
    task: toy.Task,
    out_dir: Path,
    *,
    rounds: int = 1,
    reply_hook: Callable[[int, Message], Message] | None = None,
    seen: dict[str, Any] | None = None,
) -> FederationResult:
    """``rounds`` rounds of ``strategy`` over the toy task through a LocalGrid."""
    grid = LocalGrid(
        toy.client_handler(task.clients, seen=seen), len(task.clients), reply_hook=reply_hook
    )
    progress = ProgressWriter(out_dir)
    progress.start(strategy=type(strategy.innermost).__name__, num_rounds=rounds)
    return run_rounds(
        grid,
        strategy,
        initial_arrays=toy.initial_arrays(),
        num_rounds=rounds,
        progress=progress,
        server_eval=toy.server_eval(task.test),
    )
