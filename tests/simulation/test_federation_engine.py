"""One real run of Flower's simulation engine: edgefed's ServerApp and ClientApp, 3 virtual
SuperNodes on Dirichlet partitions of chatterbot-corpus, 2 rounds (the engine's SuperLink and
Ray start-up cost ~10-20 s, so this is the only such test)."""

from __future__ import annotations

import math
from pathlib import Path

import psutil

from edgefed.simulation.federation_data import prepare_federation_data
from edgefed.simulation.federation_sim import federation_run_config, run_engine


def test_simulation_engine_runs_the_real_apps_and_reports_accuracy_per_round(
    tmp_path: Path,
) -> None:
    data = prepare_federation_data(clients=3, alpha=0.5, seed=0, cache_dir=tmp_path / "cache")
    assert data.empty_clients == []
    config = federation_run_config(
        data, tmp_path / "out", rounds=2, min_train_nodes=3, local_steps=2, batch_size=8
    )
    seen: list[int] = []
    outcome = run_engine(
        config,
        num_supernodes=3,
        work_dir=tmp_path / "work",
        actors=1,
        timeout_s=300,
        on_round=lambda r: seen.append(r.round),
    )
    assert outcome.path == "simulation-engine"
    assert outcome.status == "succeeded", outcome.error
    assert [r.round for r in outcome.rounds] == [1, 2] == seen
    for r in outcome.rounds:
        assert r.accepted == 3
        assert r.rejected == []
        assert r.eval_accuracy is not None
        assert 0.0 <= r.eval_accuracy <= 1.0
        assert r.eval_loss is not None
        assert math.isfinite(r.eval_loss)
    assert outcome.model_dir is not None
    assert (outcome.model_dir / "model.safetensors").is_file()
    # The SuperLink, its SuperExec, flwr-simulation and Ray are all gone.
    assert psutil.Process().children(recursive=True) == []
