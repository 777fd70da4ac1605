"""Local training: it learns a learnable task, each mode changes only what it should, FedProx
keeps weights near the global model, embeddings learn pairs, and runs repeat given the seed."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgefed.common.learning import LocalExample
from edgefed.common.training import TrainingError, TrainSettings, evaluate, train_local

from . import tiny

FAST = TrainSettings(lr=3e-3, local_steps=8, batch_size=16, max_seq_len=16)


def _changed(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> set[str]:
    return {k for k in before if not np.array_equal(before[k], after[k])}


def _distance(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(((a[k] - b[k]) ** 2).sum()) for k in a)))


def test_training_learns_the_colour_task() -> None:
    fm = tiny.build("text-classification")
    train, held_out = tiny.colour_examples(48, seed=1), tiny.colour_examples(32, seed=2)
    settings = dataclasses.replace(FAST, local_steps=25)
    before = evaluate(fm, held_out, settings)
    outcome = train_local(fm, train, settings)
    after = evaluate(fm, held_out, settings)
    assert outcome.num_examples == 48
    assert after.loss < before.loss * 0.5
    assert after.accuracy >= 0.9 > before.accuracy
    assert after.num_examples == 32
    # fm holds the trained weights, the outcome a full copy of them
    assert set(outcome.arrays) == set(fm.arrays())
    assert not _changed(outcome.arrays, fm.arrays())


def test_training_is_deterministic_given_the_seed_and_leaves_the_global_rng_alone() -> None:
    examples = tiny.colour_examples(40)
    models = [tiny.build("text-classification") for _ in range(3)]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = train_local(models[0], examples, FAST)
    assert torch.equal(torch.get_rng_state(), state)
    second = train_local(models[1], examples, FAST)
    other = train_local(models[2], examples, dataclasses.replace(FAST, seed=1))
    assert not _changed(first.arrays, second.arrays)
    assert first.loss == second.loss
    assert _changed(first.arrays, other.arrays)


def test_head_mode_changes_only_the_classifier_head() -> None:
    fm = tiny.build("text-classification")
    before = fm.arrays()
    outcome = train_local(fm, tiny.colour_examples(40), dataclasses.replace(FAST, mode="head"))
    changed = _changed(before, outcome.arrays)
    assert changed == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
        "classifier.bias",
    }  # fmt: skip
    assert all(p.requires_grad for p in fm.model.parameters())  # freezing was undone


def test_top_layers_mode_changes_only_the_last_layers_and_head() -> None:
    fm = tiny.build("text-classification")
    before = fm.arrays()
    settings = dataclasses.replace(FAST, mode="top-layers", top_layers=1)
    changed = _changed(before, train_local(fm, tiny.colour_examples(40), settings).arrays)
    assert {k for k in changed if ".layer.1." in k}  # the last layer trained
    assert all(".layer.1." in k or "pooler" in k or "classifier" in k for k in changed)
    assert not {k for k in changed if ".layer.0." in k or "embeddings" in k}


def test_top_layers_beyond_the_model_are_refused() -> None:
    fm = tiny.build("text-classification")
    with pytest.raises(TrainingError, match="top-layers 3 exceeds the model's 2"):
        train_local(fm, tiny.colour_examples(8), dataclasses.replace(FAST, mode="top-layers",
                                                                       top_layers=3))  # fmt: skip


def test_lora_returns_the_original_keys_with_only_query_value_and_head_changed() -> None:
    fm = tiny.build("text-classification")
    before = fm.arrays()
    settings = dataclasses.replace(FAST, mode="lora", lora_rank=4)
    outcome = train_local(fm, tiny.colour_examples(40), settings)
    assert {k: v.shape for k, v in outcome.arrays.items()} == {
        k: v.shape for k, v in before.items()
    }
    changed = _changed(before, outcome.arrays)
    adapted = {k for k in changed if k.endswith(("query.weight", "value.weight"))}
    assert len(adapted) == 4  # query and value of both layers
    assert changed - adapted <= {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
        "classifier.bias",
    }  # fmt: skip
    assert "lora" not in " ".join(name for name, _ in fm.model.named_modules())
    # the merged model is a plain model again: another round trains and loads arrays
    fm.load_arrays(before)
    train_local(fm, tiny.colour_examples(8), settings)


def test_fedprox_keeps_the_weights_closer_to_the_global_model() -> None:
    examples = tiny.colour_examples(40)
    fm = tiny.build("text-classification")
    global_arrays = fm.arrays()
    free = train_local(fm, examples, dataclasses.replace(FAST, local_steps=15)).arrays
    fm.load_arrays(global_arrays)
    settings = dataclasses.replace(FAST, local_steps=15, proximal_mu=50.0)
    proximal = train_local(fm, examples, settings).arrays
    assert _distance(proximal, global_arrays) < 0.5 * _distance(free, global_arrays)


def test_max_examples_caps_the_examples_used() -> None:
    fm = tiny.build("text-classification")
    settings = dataclasses.replace(FAST, max_examples=10, local_steps=2)
    assert train_local(fm, tiny.colour_examples(40), settings).num_examples == 10
    assert evaluate(fm, tiny.colour_examples(40), settings).num_examples == 10


def test_embedding_pairs_loss_goes_down() -> None:
    fm = tiny.build("feature-extraction")
    train, held_out = tiny.pair_examples(48, seed=1), tiny.pair_examples(32, seed=2)
    settings = dataclasses.replace(FAST, local_steps=25)
    before = evaluate(fm, held_out, settings)
    outcome = train_local(fm, train, settings)
    after = evaluate(fm, held_out, settings)
    assert outcome.num_examples == 48
    assert after.loss < before.loss
    assert after.accuracy > before.accuracy
    assert 0.0 <= after.accuracy <= 1.0


def test_head_mode_of_an_encoder_is_refused() -> None:
    fm = tiny.build("feature-extraction")
    with pytest.raises(TrainingError, match="leaves nothing to train"):
        train_local(fm, tiny.pair_examples(8), dataclasses.replace(FAST, mode="head"))


@pytest.mark.parametrize(
    ("task", "examples", "problem"),
    [
        ("text-classification", [], "no examples"),
        ("text-classification", [LocalExample("a red car", 5)], "label 5 but the model has 2"),
        ("text-classification", [LocalExample("a red car")], "label None"),
        ("feature-extraction", [LocalExample("a red car", 0)], "has no text_pair"),
    ],
)
def test_unusable_examples_are_refused_before_training(
    task: str, examples: list[LocalExample], problem: str
) -> None:
    fm = tiny.build(task)
    before = fm.arrays()
    with pytest.raises(TrainingError, match=problem):
        train_local(fm, examples, FAST)
    assert not _changed(before, fm.arrays())
