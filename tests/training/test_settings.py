"""Training settings from Flower configs: defaults, round trip, and clear refusals."""

from __future__ import annotations

import pytest

from edgefed.common.training import TrainingError, TrainSettings


def test_missing_keys_take_defaults_and_other_keys_are_ignored() -> None:
    assert TrainSettings.from_config({"server-round": 3, "task": "x"}) == TrainSettings()


def test_to_config_round_trips_with_hyphenated_keys() -> None:
    settings = TrainSettings(
        lr=0.01, local_steps=3, batch_size=4, max_seq_len=32, mode="lora", top_layers=2,
        lora_rank=4, proximal_mu=0.5, seed=7, max_examples=100,
    )  # fmt: skip
    config = settings.to_config()
    assert config["train-mode"] == "lora"
    assert config["local-steps"] == 3
    assert config["proximal-mu"] == 0.5
    assert TrainSettings.from_config(config) == settings


def test_an_integer_learning_rate_is_accepted_as_float() -> None:
    assert TrainSettings.from_config({"lr": 1, "proximal-mu": 0}).lr == 1.0


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"train-mode": "everything"}, "train-mode must be one of full, top-layers, head, lora"),
        ({"local-steps": 0}, "local-steps must be >= 1"),
        ({"batch-size": 2.5}, "batch-size must be an integer"),
        ({"batch-size": True}, "batch-size must be an integer"),
        ({"lr": "fast"}, "lr must be a number"),
        ({"lr": -0.1}, "lr must be a positive finite number"),
        ({"lr": float("nan")}, "lr must be a positive finite number"),
        ({"proximal-mu": -1.0}, "proximal-mu must be >= 0"),
        ({"max-examples": -5}, "max-examples must be >= 0"),
        ({"lora-rank": 0}, "lora-rank must be >= 1"),
    ],
)
def test_bad_values_are_refused_naming_the_key(config: dict[str, object], problem: str) -> None:
    with pytest.raises(TrainingError, match=problem.replace("(", r"\(")):
        TrainSettings.from_config(config)
