"""The round loop of a federated run, independent of what model is being federated.

Flower's ``Strategy.start`` drives the rounds; this module hooks the run's bookkeeping into it:
``evaluate_fn`` is called once before the first round and once after every round, so it is where
the server-side evaluation happens and where each round's record (accepted and rejected updates
with reasons, losses, accuracy, seconds) goes into ``progress.json``. Any error ends the run with
``status: failed`` and the error's message before it propagates.

The torch model stays out of this module (``server_app`` brings it in), so tests and benchmarks can
run real strategies on any numpy model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.app.typing import ConfigRecordValues
from flwr.serverapp import Grid

from edgefed.cloud.federation.errors import RoundFailed
from edgefed.cloud.federation.progress import ProgressWriter
from edgefed.cloud.federation.records import NDArray, to_numpy, to_record
from edgefed.cloud.federation.strategies import ValidatingStrategy
from edgefed.common.errors import EdgefedError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalFigures:
    """Server-side evaluation of a global model on the held-out set."""

    loss: float
    accuracy: float
    num_examples: int


ServerEval = Callable[[int, dict[str, NDArray]], EvalFigures | None]
"""``(server_round, global_arrays) -> figures`` (round 0 is the starting model)."""

SaveModel = Callable[[dict[str, NDArray]], Path]
"""Writes the final global model somewhere and returns where."""


@dataclass(frozen=True)
class FederationResult:
    """A finished run: the final global arrays, where they were saved, the progress document."""

    arrays: dict[str, NDArray]
    model_dir: Path | None
    progress: dict[str, Any]
    strategy: ValidatingStrategy


def describe(exc: BaseException) -> str:
    """The message a run's progress shows for ``exc``: ours are written for people already."""
    if isinstance(exc, EdgefedError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _metric(record: MetricRecord | None, key: str) -> float | None:
    if record is None or key not in record:
        return None
    value = record[key]
    return float(value) if isinstance(value, int | float) else None


def run_rounds(
    grid: Grid,
    strategy: ValidatingStrategy,
    *,
    initial_arrays: Mapping[str, NDArray],
    num_rounds: int,
    progress: ProgressWriter,
    train_config: Mapping[str, ConfigRecordValues] | None = None,
    evaluate_config: Mapping[str, ConfigRecordValues] | None = None,
    server_eval: ServerEval | None = None,
    save_model: SaveModel | None = None,
    timeout: float = 3600.0,
) -> FederationResult:
    """Run ``num_rounds`` rounds of ``strategy`` on ``grid``; ``progress`` must be started.

    Raises :class:`RoundFailed` (or whatever else went wrong) after marking the run failed.
    """
    latest: dict[str, ArrayRecord] = {}
    clock = {"round_started": time.monotonic()}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        latest["arrays"] = arrays
        figures = server_eval(server_round, to_numpy(arrays)) if server_eval else None
        metrics = None
        if figures is not None:
            metrics = MetricRecord(
                {
                    "eval-loss": figures.loss,
                    "eval-accuracy": figures.accuracy,
                    "num-examples": figures.num_examples,
                }
            )
        if server_round == 0:
            progress.initial(
                eval_loss=figures.loss if figures else None,
                eval_accuracy=figures.accuracy if figures else None,
            )
        else:
            client_eval = strategy.evaluate_metrics.get(server_round)
            now = time.monotonic()
            progress.round(
                server_round,
                accepted=strategy.accepted.get(server_round, 0),
                rejected=strategy.rejections.get(server_round, []),
                train_loss=_metric(strategy.train_metrics.get(server_round), "train-loss"),
                eval_loss=figures.loss if figures else _metric(client_eval, "eval-loss"),
                eval_accuracy=(
                    figures.accuracy if figures else _metric(client_eval, "eval-accuracy")
                ),
                seconds=now - clock["round_started"],
                eval_source="server" if figures else ("clients" if client_eval else None),
            )
            clock["round_started"] = now
        return metrics

    try:
        strategy.start(
            grid,
            to_record(initial_arrays),
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=ConfigRecord(dict(train_config or {})),
            evaluate_config=ConfigRecord(dict(evaluate_config or {})),
            evaluate_fn=evaluate_fn,
        )
        final = to_numpy(latest["arrays"])
        model_dir = save_model(final) if save_model is not None else None
    except BaseException as exc:
        progress.fail(describe(exc))
        if isinstance(exc, RoundFailed):
            log.error("federated run failed: %s", exc)
        raise
    progress.succeed(model_dir)
    return FederationResult(final, model_dir, dict(progress.doc), strategy)
