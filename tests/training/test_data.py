"""Local JSONL data sets: good files and directories load; every malformed kind is refused with
an error naming file:line and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefed.common.errors import PermanentError
from edgefed.common.learning import (
    LearningError,
    LocalExample,
    TrainingDataError,
    read_local_dataset,
    write_local_dataset,
)

LABELS = {"red": 0, "blue": 1}


def _write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_reads_a_classification_file_with_ids_and_names(tmp_path: Path) -> None:
    f = _write_lines(
        tmp_path / "d.jsonl",
        json.dumps({"text": "a red car", "label": "red"}),
        "",
        json.dumps({"text": "a blue sky", "label": 1}),
        json.dumps({"text": "is it red", "text_pair": "yes", "label": 0}),
    )
    got = read_local_dataset(f, "text-classification", LABELS)
    assert got == [
        LocalExample("a red car", 0),
        LocalExample("a blue sky", 1),
        LocalExample("is it red", 0, "yes"),
    ]


def test_reads_a_directory_in_sorted_order_and_caps(tmp_path: Path) -> None:
    _write_lines(tmp_path / "b.jsonl", json.dumps({"text": "second", "label": 1}))
    _write_lines(tmp_path / "a.jsonl", json.dumps({"text": "first", "label": 0}))
    (tmp_path / "notes.txt").write_text("not data", encoding="utf-8")
    got = read_local_dataset(tmp_path, "text-classification", LABELS)
    assert [e.text for e in got] == ["first", "second"]
    capped = read_local_dataset(tmp_path, "text-classification", LABELS, max_examples=1)
    assert [e.text for e in capped] == ["first"]


def test_reads_pairs_for_feature_extraction(tmp_path: Path) -> None:
    f = _write_lines(tmp_path / "p.jsonl", json.dumps({"text": "a", "text_pair": "b"}))
    assert read_local_dataset(f, "feature-extraction") == [LocalExample("a", text_pair="b")]


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    examples = [LocalExample("ünïcode red", 0), LocalExample("x", 1, "y")]
    path = tmp_path / "sub" / "0.jsonl"
    write_local_dataset(path, examples)
    assert read_local_dataset(path, "text-classification") == examples
    assert [p.name for p in path.parent.iterdir()] == ["0.jsonl"]  # no temporary left


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"text": "a", "label": 0', "invalid JSON"),
        ('["a", 0]', "expected a JSON object, got an array"),
        ('{"label": 0}', "missing field 'text'"),
        ('{"text": "   ", "label": 0}', "field 'text' is blank"),
        ('{"text": 5, "label": 0}', "field 'text' must be a string"),
        ('{"text": "a"}', "missing field 'label'"),
        ('{"text": "a", "label": 1.5}', "field 'label' must be an integer id or a label name"),
        ('{"text": "a", "label": true}', "field 'label' must be an integer id or a label name"),
        ('{"text": "a", "label": "green"}', "unknown label 'green'; known labels: red, blue"),
        ('{"text": "a", "label": 7}', "label id 7 is not one of the model's ids 0, 1"),
        ('{"text": "a", "label": -1}', "label -1 is negative"),
    ],
)
def test_malformed_classification_lines_name_file_and_line(
    tmp_path: Path, line: str, problem: str
) -> None:
    f = _write_lines(tmp_path / "bad.jsonl", json.dumps({"text": "fine", "label": 0}), line)
    with pytest.raises(TrainingDataError) as info:
        read_local_dataset(f, "text-classification", LABELS)
    assert f"{f}:2: " in str(info.value)
    assert problem in str(info.value)


def test_a_label_name_without_label_names_is_refused(tmp_path: Path) -> None:
    f = _write_lines(tmp_path / "d.jsonl", json.dumps({"text": "a", "label": "red"}))
    with pytest.raises(TrainingDataError, match=r"d\.jsonl:1: label 'red' is a name"):
        read_local_dataset(f, "text-classification", None)


def test_missing_pair_is_refused_for_feature_extraction(tmp_path: Path) -> None:
    f = _write_lines(tmp_path / "p.jsonl", json.dumps({"text": "a", "label": 0}))
    with pytest.raises(TrainingDataError, match=r"p\.jsonl:1: missing field 'text_pair'"):
        read_local_dataset(f, "feature-extraction")


def test_non_utf8_line_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "bin.jsonl"
    f.write_bytes(b'{"text": "ok", "label": 0}\n\xff\xfe\n')
    with pytest.raises(TrainingDataError, match=r"bin\.jsonl:2: not UTF-8"):
        read_local_dataset(f, "text-classification")


def test_empty_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(TrainingDataError, match=r"empty\.jsonl:1: no examples"):
        read_local_dataset(f, "text-classification")


def test_directory_without_data_files_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match=r"no \*\.jsonl files"):
        read_local_dataset(tmp_path, "text-classification")


def test_missing_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="no such file or directory") as info:
        read_local_dataset(tmp_path / "nowhere", "text-classification")
    assert isinstance(info.value, PermanentError)
    assert str(tmp_path / "nowhere") in str(info.value)


def test_unknown_task_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LearningError, match="unsupported task 'text-generation'"):
        read_local_dataset(tmp_path, "text-generation")
