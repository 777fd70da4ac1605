"""The federated simulation's data: chatterbot-corpus as a category task, its stratified split
and the Dirichlet(alpha) non-IID partition over clients."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edgefed.common.learning import read_local_dataset
from edgefed.simulation.federation_data import (
    FederationDataError,
    dirichlet_partition,
    load_chatterbot,
    split_corpus,
)
from edgefed.simulation.scenario import ScenarioError, load_scenario


def _labels(n_classes: int = 10, per_class: int = 60) -> np.ndarray:
    return np.repeat(np.arange(n_classes), per_class)


def _mean_max_share(parts: list[list[int]], y: np.ndarray) -> float:
    """Mean over clients of the share of the client's most common label (1.0: one label)."""
    shares = [max(Counter(y[p].tolist()).values()) / len(p) for p in parts if p]
    return float(np.mean(shares))


def test_every_example_goes_to_exactly_one_client() -> None:
    y = _labels()
    parts = dirichlet_partition(y, 12, 0.3, seed=1)
    assert len(parts) == 12
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(y.size))
    assert all(len(p) >= 1 for p in parts)


def test_small_alpha_skews_labels_and_large_alpha_is_near_uniform() -> None:
    y = _labels()
    skewed = _mean_max_share(dirichlet_partition(y, 10, 0.05, seed=3), y)
    uniform = _mean_max_share(dirichlet_partition(y, 10, 1000.0, seed=3), y)
    assert skewed > 0.6
    assert uniform < 0.25  # 10 classes: an even client holds ~0.1 of each


def test_partition_is_deterministic_by_seed() -> None:
    y = _labels()
    assert dirichlet_partition(y, 8, 0.5, seed=7) == dirichlet_partition(y, 8, 0.5, seed=7)
    assert dirichlet_partition(y, 8, 0.5, seed=7) != dirichlet_partition(y, 8, 0.5, seed=8)


def test_more_clients_than_examples_leaves_some_empty_and_loses_nothing() -> None:
    y = _labels(n_classes=2, per_class=3)
    parts = dirichlet_partition(y, 10, 1.0, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(6))
    assert sum(1 for p in parts if not p) >= 4


@pytest.mark.parametrize(("clients", "alpha"), [(0, 0.5), (3, 0.0), (3, float("nan"))])
def test_bad_partition_parameters_are_refused(clients: int, alpha: float) -> None:
    with pytest.raises(FederationDataError, match=r"clients|alpha"):
        dirichlet_partition(_labels(), clients, alpha)


def test_chatterbot_corpus_loads_as_a_category_task() -> None:
    corpus = load_chatterbot()
    assert len(corpus.labels) >= 10
    assert len(corpus.examples) >= 500
    assert len({e.text for e in corpus.examples}) == len(corpus.examples)  # deduplicated
    counts = Counter(e.label for e in corpus.examples)
    assert min(counts.values()) >= 8
    assert any("dropped" in n for n in corpus.notes)  # the tiny categories are named
    split = split_corpus(corpus, seed=0)
    train, test = {e.text for e in split.train}, {e.text for e in split.held_out}
    assert not train & test
    assert not {e.text for e in split.root} & (train | test)
    assert {e.label for e in split.held_out} == set(corpus.labels)  # stratified


def test_written_partitions_are_readable_by_the_client_reader(tmp_path: Path) -> None:
    from edgefed.simulation.federation_data import write_jsonl

    corpus = load_chatterbot()
    path = write_jsonl(tmp_path / "0.jsonl", corpus.examples[:5], corpus.labels)
    label2id = {name: i for i, name in enumerate(corpus.labels)}
    examples = read_local_dataset(path, "text-classification", label2id)
    assert [e.text for e in examples] == [e.text for e in corpus.examples[:5]]
    assert [corpus.labels[e.label or 0] for e in examples] == [e.label for e in corpus.examples[:5]]


# --------------------------------------------------------------------------- scenario settings

_SCENARIO = """\
name: fed
duration_s: 30
sites:
  lab: {}
fleet:
  - {name: pi, count: 3, device: raspberry-pi-5, site: lab}
models:
  - {name: enc, builtin: tiny}
workload:
  rate_per_s: 2
"""


def _load(tmp_path: Path, federation: str) -> object:
    path = tmp_path / "s.yaml"
    path.write_text(_SCENARIO + "federation: " + federation + "\n")
    return load_scenario(path)


def test_scenario_accepts_federation_settings(tmp_path: Path) -> None:
    s = _load(
        tmp_path,
        "{rounds: 2, strategy: fltrust, alpha: 0.3, clients: 6, clients_per_round: 4}",
    )
    fed = s.federation  # type: ignore[attr-defined]
    assert (fed.rounds, fed.strategy, fed.alpha, fed.num_clients(3)) == (2, "fltrust", 0.3, 6)
    default = _load(tmp_path, "{rounds: 1}").federation  # type: ignore[attr-defined]
    assert default.num_clients(3) == 3  # one virtual client per agent


@pytest.mark.parametrize(
    ("federation", "field", "words"),
    [
        ("{rounds: 2, strategy: fedsgd}", "federation.strategy", "fedavg"),
        ("{rounds: 2, alpha: 0}", "federation.alpha", "greater than 0"),
        ("{rounds: 2, byzantine: 0.2}", "federation", "engine: in-process"),
        ("{rounds: 2, clients: 4, clients_per_round: 5}", "federation.clients_per_round", "4"),
        ("{rounds: 2, strategy: bulyan, clients_per_round: 2}", "federation.strategy", "4f + 3"),
        ("{rounds: 2, start_at_s: 40}", "federation.start_at_s", "after the end"),
        ("{rounds: 2, strategy: fedprox, proximal_mu: 0}", "federation", "proximal_mu > 0"),
    ],
)
def test_scenario_refuses_bad_federation_settings(
    tmp_path: Path, federation: str, field: str, words: str
) -> None:
    with pytest.raises(ScenarioError) as info:
        _load(tmp_path, federation)
    [problem] = info.value.problems
    assert problem.field == field
    assert words in str(info.value)
