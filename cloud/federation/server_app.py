"""The Flower ServerApp the controller runs for a federated fine-tuning run.

``app`` is what a SuperLink (``flwr run``) or the simulation engine loads
(``edgefed.cloud.federation.server_app:app``); its main function is :func:`run_federation`,
which tests and the simulation harness also call directly with a
:class:`~edgefed.cloud.federation.local_grid.LocalGrid`.

A run reads its settings from Flower's flat run config (keys below), loads the model directory,
sends the global weights with the model's config and tokenizer to the sampled nodes (so a node
needs nothing but the message to build the model), validates every update, aggregates with the
chosen strategy, evaluates on the server's held-out set after every round, writes
``<out-dir>/progress.json`` as it goes and finally saves ``<out-dir>/model`` as an HF directory
that the compression pipeline takes as a teacher.

Run config keys: ``model-dir`` and ``out-dir`` (required); ``num-rounds`` (3); ``strategy``
(fedavg); ``fraction-train`` (1.0), ``fraction-evaluate`` (0 with ``eval-data``, else 1.0),
``min-train-nodes`` (2), ``min-valid-updates`` (half the min train nodes, at least 1);
``eval-data`` and ``root-data`` (JSONL paths); the training settings of the message contract
(``lr``, ``local-steps``, ``batch-size``, ``max-seq-len``, ``train-mode``, ``top-layers``,
``lora-rank``, ``proximal-mu``, ``seed``, ``max-examples``); validation (``max-update-norm`` (0 =
off), ``norm-ratio`` (5; 0 = off), ``max-num-examples`` (1,000,000)); central DP
(``dp-clipping-norm`` > 0 switches it on, ``dp-noise-multiplier``); ``trimmed-beta`` (0.2),
``krum-byzantine`` (0), ``krum-select`` (MultiKrum: min train nodes minus krum-byzantine);
``round-timeout`` seconds (3600).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from edgefed.cloud.federation.errors import FederationConfigError
from edgefed.cloud.federation.fltrust import RootUpdate
from edgefed.cloud.federation.local_grid import HookedGrid, ReplyHook
from edgefed.cloud.federation.progress import ProgressWriter
from edgefed.cloud.federation.records import NDArray
from edgefed.cloud.federation.rounds import (
    EvalFigures,
    FederationResult,
    ServerEval,
    describe,
    run_rounds,
)
from edgefed.cloud.federation.strategies import build_strategy
from edgefed.cloud.federation.validation import ValidationLimits
from edgefed.common.learning import LearningError, LocalExample, read_local_dataset
from edgefed.common.training import (
    FederatedModel,
    TrainingError,
    TrainSettings,
    evaluate,
    train_local,
)

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
_TRAIN_KEYS = frozenset(
    {"lr", "local-steps", "batch-size", "max-seq-len", "train-mode", "top-layers",
     "lora-rank", "proximal-mu", "seed", "max-examples"}
)  # fmt: skip
_SERVER_KEYS = frozenset(
    {"model-dir", "out-dir", "num-rounds", "strategy", "fraction-train", "fraction-evaluate",
     "min-train-nodes", "min-valid-updates", "eval-data", "root-data", "max-update-norm",
     "norm-ratio", "max-num-examples", "dp-noise-multiplier", "dp-clipping-norm",
     "trimmed-beta", "krum-byzantine", "krum-select", "round-timeout"}
)  # fmt: skip
_CLIENT_KEYS = frozenset({"partitions-dir"})
"""Keys the run config carries for the ClientApp (simulation data location)."""


# ---------------------------------------------------------------------------- run config


_REQUIRED = object()


def _get(cfg: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    if key not in cfg:
        if default is _REQUIRED:
            raise FederationConfigError(key, "is required")
        return default
    value = cfg[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise FederationConfigError(key, f"must be {kind.__name__}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise FederationConfigError(key, f"must be finite, got {value!r}")
    if isinstance(value, str) and not value.strip() and default is _REQUIRED:
        raise FederationConfigError(key, "must not be empty")
    return value


def _path(cfg: Mapping[str, Any], key: str) -> Path | None:
    value = _get(cfg, key, str, "")
    return Path(value).expanduser() if value.strip() else None


def _required_path(cfg: Mapping[str, Any], key: str) -> Path:
    return Path(_get(cfg, key, str, _REQUIRED)).expanduser()


@dataclass(frozen=True)
class RunSpec:
    """A federated run's settings, parsed and checked from the flat run config."""

    model_dir: Path
    out_dir: Path
    num_rounds: int
    strategy: str
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_valid_updates: int
    eval_data: Path | None
    root_data: Path | None
    train: TrainSettings
    limits: ValidationLimits
    dp_noise_multiplier: float
    dp_clipping_norm: float
    trimmed_beta: float
    krum_byzantine: int
    krum_select: int | None
    round_timeout: float

    @classmethod
    def from_run_config(cls, cfg: Mapping[str, Any]) -> RunSpec:
        """Raises :class:`FederationConfigError` naming the first bad key."""
        unknown = set(cfg) - _SERVER_KEYS - _TRAIN_KEYS - _CLIENT_KEYS
        if unknown:
            log.warning("run config keys the ServerApp does not read: %s", sorted(unknown))
        out_dir = _required_path(cfg, "out-dir")
        model_dir = _required_path(cfg, "model-dir")
        num_rounds = _get(cfg, "num-rounds", int, 3)
        if num_rounds < 1:
            raise FederationConfigError("num-rounds", f"must be at least 1, got {num_rounds}")
        min_train = _get(cfg, "min-train-nodes", int, 2)
        if min_train < 1:
            raise FederationConfigError("min-train-nodes", f"must be at least 1, got {min_train}")
        min_valid = _get(cfg, "min-valid-updates", int, max(1, min_train // 2))
        if min_valid < 1:
            raise FederationConfigError("min-valid-updates", "must be at least 1")
        eval_data = _path(cfg, "eval-data")
        timeout = _get(cfg, "round-timeout", float, 3600.0)
        if timeout <= 0:
            raise FederationConfigError("round-timeout", "must be > 0 seconds")
        krum_select = _get(cfg, "krum-select", int, 0)
        try:
            train = TrainSettings.from_config({k: v for k, v in cfg.items() if k in _TRAIN_KEYS})
        except TrainingError as exc:
            words = str(exc).split()
            key = words[0] if words and words[0] in _TRAIN_KEYS else "training settings"
            raise FederationConfigError(key, str(exc)) from exc
        return cls(
            model_dir=model_dir,
            out_dir=out_dir,
            num_rounds=num_rounds,
            strategy=_get(cfg, "strategy", str, "fedavg").strip().lower(),
            fraction_train=_get(cfg, "fraction-train", float, 1.0),
            fraction_evaluate=_get(
                cfg, "fraction-evaluate", float, 0.0 if eval_data is not None else 1.0
            ),
            min_train_nodes=min_train,
            min_valid_updates=min_valid,
            eval_data=eval_data,
            root_data=_path(cfg, "root-data"),
            train=train,
            limits=ValidationLimits(
                max_update_norm=_get(cfg, "max-update-norm", float, 0.0),
                norm_ratio=_get(cfg, "norm-ratio", float, 5.0),
                max_num_examples=_get(cfg, "max-num-examples", int, 1_000_000),
            ),
            dp_noise_multiplier=_get(cfg, "dp-noise-multiplier", float, 0.0),
            dp_clipping_norm=_get(cfg, "dp-clipping-norm", float, 0.0),
            trimmed_beta=_get(cfg, "trimmed-beta", float, 0.2),
            krum_byzantine=_get(cfg, "krum-byzantine", int, 0),
            krum_select=krum_select or None,
            round_timeout=timeout,
        )


# ---------------------------------------------------------------------------- the run


def _read_examples(path: Path, key: str, fm: FederatedModel) -> list[LocalExample]:
    try:
        return read_local_dataset(path, fm.task, fm.label2id)
    except LearningError as exc:
        raise FederationConfigError(key, str(exc)) from exc


def run_federation(
    grid: Grid, run_config: Mapping[str, Any], *, reply_hook: ReplyHook | None = None
) -> FederationResult:
    """One federated run on ``grid`` as ``run_config`` describes it (see the module docstring).

    ``reply_hook`` tampers with replies before validation (tests and benchmarks simulating
    Byzantine clients). Every outcome is in ``<out-dir>/progress.json``; errors propagate after
    the file says ``failed``.
    """
    spec = _spec_or_fail(run_config)
    progress = ProgressWriter(spec.out_dir)
    progress.start(strategy=spec.strategy, num_rounds=spec.num_rounds)
    try:
        fm = FederatedModel.from_dir(spec.model_dir)
        initial = fm.arrays()
        eval_examples = _read_examples(spec.eval_data, "eval-data", fm) if spec.eval_data else None
        root_examples = _read_examples(spec.root_data, "root-data", fm) if spec.root_data else None
        strategy = build_strategy(
            spec.strategy,
            fraction_train=spec.fraction_train,
            fraction_evaluate=spec.fraction_evaluate,
            min_train_nodes=spec.min_train_nodes,
            proximal_mu=spec.train.proximal_mu,
            trimmed_beta=spec.trimmed_beta,
            num_malicious_nodes=spec.krum_byzantine,
            num_nodes_to_select=spec.krum_select,
            root_update=_root_update(fm, root_examples, spec.train) if root_examples else None,
            dp_noise_multiplier=spec.dp_noise_multiplier,
            dp_clipping_norm=spec.dp_clipping_norm,
            limits=spec.limits,
            min_valid_updates=spec.min_valid_updates,
        )
    except BaseException as exc:
        progress.fail(describe(exc))
        raise
    config = {
        **spec.train.to_config(),
        "task": fm.task,
        "model-config": fm.config_json,
        "tokenizer": fm.tokenizer_json,
        "model-digest": fm.digest,
    }
    log.info(
        "federated run: %s, %d rounds, model %s (%s), out %s",
        spec.strategy, spec.num_rounds, spec.model_dir, fm.task, spec.out_dir,
    )  # fmt: skip

    def save_model(arrays: dict[str, NDArray]) -> Path:
        fm.load_arrays(arrays)
        return fm.save_dir(spec.out_dir / MODEL_SUBDIR, tokenizer_source=spec.model_dir)

    return run_rounds(
        HookedGrid(grid, reply_hook) if reply_hook is not None else grid,
        strategy,
        initial_arrays=initial,
        num_rounds=spec.num_rounds,
        progress=progress,
        train_config=config,
        evaluate_config=config,
        server_eval=_server_eval(fm, eval_examples, spec.train) if eval_examples else None,
        save_model=save_model,
        timeout=spec.round_timeout,
    )


def _spec_or_fail(run_config: Mapping[str, Any]) -> RunSpec:
    """Parse the run config; when it is bad but names an out-dir, say so in its progress."""
    try:
        return RunSpec.from_run_config(run_config)
    except FederationConfigError as exc:
        out_dir = run_config.get("out-dir")
        if isinstance(out_dir, str) and out_dir:
            writer = ProgressWriter(Path(out_dir).expanduser())
            writer.start(strategy=str(run_config.get("strategy", "")), num_rounds=0)
            writer.fail(describe(exc))
        raise


def _server_eval(
    fm: FederatedModel, examples: list[LocalExample], settings: TrainSettings
) -> ServerEval:
    every = dataclasses.replace(settings, max_examples=0)

    def server_eval(server_round: int, arrays: dict[str, NDArray]) -> EvalFigures:
        fm.load_arrays(arrays)
        outcome = evaluate(fm, examples, every)
        return EvalFigures(outcome.loss, outcome.accuracy, outcome.num_examples)

    return server_eval


def _root_update(
    fm: FederatedModel, examples: list[LocalExample], settings: TrainSettings
) -> RootUpdate:
    def root_update(server_round: int, arrays: dict[str, NDArray]) -> dict[str, NDArray]:
        fm.load_arrays(arrays)
        round_settings = dataclasses.replace(settings, seed=settings.seed + server_round)
        return train_local(fm, examples, round_settings).arrays

    return root_update


# ---------------------------------------------------------------------------- the ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``: the whole run, configured by the run config."""
    run_federation(grid, context.run_config)
