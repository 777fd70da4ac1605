"""Bad input to the partitioner gets a clear error from the split exception tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefed.cloud.split import (
    NotAModelError,
    SplitError,
    SplitPointError,
    UnsupportedModelError,
    candidate_points,
    export_split,
    inspect_model,
)
from edgefed.common.errors import PermanentError
from tests.cloud.split.tiny_split import LAYERS, build


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("split-errors")
    build("bert", root / "bert")
    return root / "bert"


def test_split_errors_are_permanent() -> None:
    assert issubclass(SplitError, PermanentError)
    for cls in (NotAModelError, SplitPointError, UnsupportedModelError):
        assert issubclass(cls, SplitError)


def test_inspect_model_reads_depth_and_width(bert_dir: Path) -> None:
    shape = inspect_model(bert_dir)
    assert (shape.model_type, shape.family, shape.num_layers, shape.hidden_size) == (
        "bert",
        "encoder",
        LAYERS,
        32,
    )


@pytest.mark.parametrize(
    ("k", "message"),
    [
        (0, "k=0 is all-cloud"),
        (LAYERS, f"k={LAYERS} is all-edge"),
        (LAYERS + 1, "out of range"),
        (-1, "out of range"),
    ],
)
def test_split_point_out_of_range(bert_dir: Path, tmp_path: Path, k: int, message: str) -> None:
    with pytest.raises(SplitPointError, match=message):
        export_split(bert_dir, tmp_path / "out", k, task="feature-extraction")
    assert not (tmp_path / "out").exists()


def test_candidate_points_needs_a_layer() -> None:
    with pytest.raises(SplitPointError, match="at least one layer"):
        candidate_points(0)


def test_a_directory_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(NotAModelError, match="does not exist"):
        export_split(tmp_path / "missing", tmp_path / "out", 1, task="feature-extraction")
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(NotAModelError, match=r"no config\.json"):
        export_split(tmp_path, tmp_path / "out", 1, task="feature-extraction")
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(NotAModelError, match="not readable JSON"):
        inspect_model(tmp_path)


def test_a_model_type_that_cannot_be_split(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "num_layers": 6}))
    with pytest.raises(UnsupportedModelError, match=r"cannot split a 't5' model.*bert"):
        export_split(tmp_path, tmp_path / "out", 1, task="feature-extraction")


def test_a_task_the_model_cannot_do(bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="cannot be split for task 'text-generation'"):
        export_split(bert_dir, tmp_path / "out", 1, task="text-generation")
    with pytest.raises(UnsupportedModelError, match="unknown task 'summarization'"):
        export_split(bert_dir, tmp_path / "out", 1, task="summarization")
    with pytest.raises(UnsupportedModelError, match="no sequence-classification head"):
        export_split(bert_dir, tmp_path / "out", 1, task="text-classification")
