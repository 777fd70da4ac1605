"""The ServerApp's run: run-config checks, central DP, progress.json, and a whole run of the real
ClientApp handlers on a tiny BERT through LocalGrid ending with a loadable model directory."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefed.cloud.federation.errors import FederationConfigError
from edgefed.cloud.federation.local_grid import LocalGrid, by_message_type
from edgefed.cloud.federation.progress import read_progress
from edgefed.cloud.federation.server_app import app, run_federation
from edgefed.cloud.federation.strategies import build_strategy
from edgefed.common.learning import write_local_dataset
from tests.cloud.federation import toy
from tests.cloud.federation.conftest import run_toy


def test_read_progress_without_a_file_is_none(tmp_path: Path) -> None:
    assert read_progress(tmp_path) is None


def test_central_dp_runs_and_stays_finite(tmp_path: Path) -> None:
    task = toy.make_task(6, per_client=100, test_size=200, seed=1)
    strategy = build_strategy(
        "fedavg", min_train_nodes=6, fraction_evaluate=0.0, dp_clipping_norm=5.0,
        dp_noise_multiplier=0.1,
    )  # fmt: skip
    result = run_toy(strategy, task, tmp_path, rounds=3)
    assert all(np.isfinite(v).all() for v in result.arrays.values())
    assert result.progress["status"] == "succeeded"
    assert result.progress["rounds"][-1]["eval_accuracy"] > 0.5


@pytest.mark.parametrize(
    ("name", "options", "key", "words"),
    [
        ("fedsgd", {}, "strategy", "unknown strategy 'fedsgd'"),
        (
            "bulyan",
            {"min_train_nodes": 10, "num_malicious_nodes": 2},
            "min-train-nodes",
            "n >= 4f + 3",
        ),
        (
            "krum",
            {"min_train_nodes": 4, "num_malicious_nodes": 1},
            "min-train-nodes",
            "n >= 2f + 3",
        ),
        ("fedprox", {}, "proximal-mu", "proximal term > 0"),
        ("fltrust", {}, "root-data", "root data set"),
        ("fedtrimmedavg", {"trimmed_beta": 0.5}, "trimmed-beta", "[0, 0.5)"),
        ("fedavg", {"dp_noise_multiplier": 1.0}, "dp-noise-multiplier", "dp-clipping-norm"),
    ],
)
def test_impossible_strategy_options_are_refused_naming_the_key(
    name: str, options: dict[str, Any], key: str, words: str
) -> None:
    with pytest.raises(FederationConfigError) as info:
        build_strategy(name, **options)
    assert info.value.key == key
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"model-dir": None}, "model-dir"),
        ({"num-rounds": "three"}, "num-rounds"),
        ({"train-mode": "everything"}, "train-mode"),
        ({"norm-ratio": -1.0}, "norm-ratio"),
        ({"strategy": "bulyan", "krum-byzantine": 1}, "min-train-nodes"),
    ],
)
def test_a_bad_run_config_fails_the_run_naming_the_key(
    change: dict[str, Any], key: str, tmp_path: Path
) -> None:
    cfg: dict[str, Any] = {"model-dir": str(tmp_path / "model"), "out-dir": str(tmp_path / "out")}
    if key == "min-train-nodes":  # checked once the model is loaded: give it a real one
        from tests.training import tiny

        tiny.save("text-classification", tmp_path / "model")
    for k, v in change.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    grid = LocalGrid(lambda m, c: m, 2)
    with pytest.raises(FederationConfigError) as info:
        run_federation(grid, cfg)
    assert info.value.key == key
    progress = read_progress(tmp_path / "out")
    assert progress is not None
    assert progress["status"] == "failed"
    assert key in progress["error"]


# ------------------------------------------------------------------- tiny BERT, real client


def test_a_run_with_the_real_client_app_ends_with_a_loadable_model(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from edgefed.common.training import FederatedModel
    from edgefed.edge.training.client_app import handle_evaluate, handle_train
    from tests.training import tiny

    model_dir = tiny.save("text-classification", tmp_path / "start")
    data = []
    for node in range(2):
        path = tmp_path / f"node{node}" / "data.jsonl"
        path.parent.mkdir()
        write_local_dataset(path, tiny.colour_examples(32, seed=node + 1))
        data.append({"data-dir": str(path.parent)})
    write_local_dataset(tmp_path / "eval.jsonl", tiny.colour_examples(32, seed=99))
    out = tmp_path / "out"
    grid = LocalGrid(
        by_message_type(train=handle_train, evaluate=handle_evaluate), 2, node_configs=data
    )
    result = run_federation(
        grid,
        {
            "model-dir": str(model_dir),
            "out-dir": str(out),
            "num-rounds": 2,
            "strategy": "fedavg",
            "min-train-nodes": 2,
            "eval-data": str(tmp_path / "eval.jsonl"),
            "local-steps": 3,
            "batch-size": 8,
            "max-seq-len": 16,
            "lr": 0.005,
        },
    )
    progress = read_progress(out)
    assert progress is not None
    assert progress["status"] == "succeeded"
    assert progress["model_dir"] == str(out / "model")
    assert [r["round"] for r in progress["rounds"]] == [1, 2]
    assert all(r["accepted"] == 2 and r["rejected"] == [] for r in progress["rounds"])
    assert all(math.isfinite(r["train_loss"]) for r in progress["rounds"])
    assert progress["initial_eval_accuracy"] is not None
    assert progress["rounds"][-1]["eval_source"] == "server"

    saved = FederatedModel.from_dir(out / "model")
    for key, value in saved.arrays().items():
        np.testing.assert_allclose(value, result.arrays[key], atol=1e-6)
    assert AutoModelForSequenceClassification.from_pretrained(out / "model").num_labels == 2
    # the start model and the federated one differ: the rounds did something
    start = FederatedModel.from_dir(model_dir).arrays()
    assert any(not np.array_equal(start[k], v) for k, v in saved.arrays().items())


def test_the_server_app_object_is_a_flower_server_app() -> None:
    from flwr.serverapp import ServerApp

    assert isinstance(app, ServerApp)
