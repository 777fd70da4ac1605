"""Distillation data: text, JSONL and datasets directories, the offline corpus, the held-out
split, and a clear DataError (file and line) for every kind of bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgefed.cloud.compress.data import Example, default_corpus, load_examples, split_holdout
from edgefed.cloud.compress.errors import DataError


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, *records: object) -> Path:
    return _write(path, "\n".join(json.dumps(r) for r in records) + "\n")


# --------------------------------------------------------------------------- text files


def test_txt_strips_drops_empty_dedupes_and_keeps_order(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.txt", "  first line \n\n second\n\t\nfirst line\nthird\n")
    examples = load_examples(path, task="feature-extraction")
    assert examples == [Example("first line"), Example("second"), Example("third")]


def test_max_examples_caps_after_dedupe(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.txt", "a\na\nb\nc\n")
    assert [e.text for e in load_examples(path, task="feature-extraction", max_examples=2)] == [
        "a",
        "b",
    ]
    with pytest.raises(DataError, match="max_examples must be at least 1"):
        load_examples(path, task="feature-extraction", max_examples=0)


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"])
def test_empty_file_is_refused(tmp_path: Path, content: str) -> None:
    path = _write(tmp_path / "empty.txt", content)
    with pytest.raises(DataError, match=r"empty\.txt contains no texts"):
        load_examples(path, task="feature-extraction")


def test_missing_path_and_unknown_extension(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.txt", task="feature-extraction")
    csv = _write(tmp_path / "d.csv", "text\nhello\n")
    with pytest.raises(DataError, match=r"unknown extension '\.csv'.*\.txt.*\.jsonl"):
        load_examples(csv, task="feature-extraction")


def test_non_utf8_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(path, task="feature-extraction")


# --------------------------------------------------------------------------- JSONL


def test_jsonl_texts_and_labels(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "d.jsonl",
        {"text": " good film ", "label": "positive"},
        {"text": "bad film", "label": 0},
        {"text": "no label"},
        {"text": "null label", "label": None},
        {"text": "   "},
        {"text": "good film", "label": "positive"},  # exact duplicate
        {"text": "good film", "label": "negative"},  # same text, other label: kept
    )
    assert load_examples(path, task="text-classification") == [
        Example("good film", "positive"),
        Example("bad film", 0),
        Example("no label"),
        Example("null label"),
        Example("good film", "negative"),
    ]


def test_jsonl_skips_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a"}\n\n   \n{"text": "b"}\n')
    assert [e.text for e in load_examples(path, task="feature-extraction")] == ["a", "b"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "unterminated', r"d\.jsonl:2: malformed JSON"),
        ('["text", "a list"]', r"d\.jsonl:2: expected a JSON object, got list"),
        ('{"label": 1}', r"d\.jsonl:2: expected a string 'text', found no 'text'"),
        ('{"text": 42}', r"d\.jsonl:2: expected a string 'text', found 'text' of type int"),
        ('{"text": "a", "label": 1.5}', r"d\.jsonl:2: 'label' must be a string or an integer"),
        ('{"text": "a", "label": true}', r"d\.jsonl:2: 'label' must be .*got bool"),
        ('{"text": "a", "label": ["x"]}', r"d\.jsonl:2: 'label' must be .*got list"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_examples(path, task="text-classification")


# --------------------------------------------------------------------------- datasets directories


def test_datasets_directory_and_dataset_dict(tmp_path: Path) -> None:
    import datasets

    rows = {"text": ["one", " two ", "one", ""], "label": [0, 1, 0, 1]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "plain"))
    expected = [Example("one", 0), Example("two", 1)]
    assert load_examples(tmp_path / "plain", task="text-classification") == expected

    split = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["train text"]}),
            "test": datasets.Dataset.from_dict({"text": ["test text"]}),
        }
    )
    split.save_to_disk(str(tmp_path / "dict"))
    assert load_examples(tmp_path / "dict", task="feature-extraction") == [Example("train text")]


def test_datasets_directory_errors(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(
        str(tmp_path / "no-train")
    )
    with pytest.raises(DataError, match=r"no 'train' split \(splits: test\)"):
        load_examples(tmp_path / "no-train", task="feature-extraction")

    datasets.Dataset.from_dict({"sentence": ["x"]}).save_to_disk(str(tmp_path / "no-text"))
    with pytest.raises(DataError, match=r"no 'text' column \(columns: sentence\)"):
        load_examples(tmp_path / "no-text", task="feature-extraction")

    datasets.Dataset.from_dict({"text": ["x"], "label": [0.5]}).save_to_disk(
        str(tmp_path / "float-label")
    )
    with pytest.raises(DataError, match=r"row 0: 'label' must be a string or an integer"):
        load_examples(tmp_path / "float-label", task="text-classification")

    (tmp_path / "plain-dir").mkdir()
    with pytest.raises(DataError, match="is not a dataset saved by datasets"):
        load_examples(tmp_path / "plain-dir", task="feature-extraction")


# --------------------------------------------------------------------------- offline corpus


def test_default_corpus_is_large_clean_and_deterministic() -> None:
    corpus = default_corpus()
    assert len(corpus) >= 3000
    assert len(set(corpus)) == len(corpus)
    for sentence in corpus:
        assert 5 <= len(sentence.split()) <= 40
        assert sentence == " ".join(sentence.split())
    assert default_corpus() == corpus
    assert default_corpus(10) == corpus[:10]
    default_corpus().clear()  # callers get a copy: the cache cannot be damaged
    assert default_corpus() == corpus


def test_default_corpus_is_the_same_in_another_process() -> None:
    """Same sentences in the same order whatever the hash seed of the process."""
    code = (
        "import hashlib; from edgefed.cloud.compress.data import default_corpus; "
        "print(hashlib.sha256('\\n'.join(default_corpus()).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    here = hashlib.sha256("\n".join(default_corpus()).encode()).hexdigest()
    assert out.stdout.strip() == here


def test_load_examples_without_path_uses_the_corpus() -> None:
    examples = load_examples(None, task="feature-extraction", max_examples=50)
    assert [e.text for e in examples] == default_corpus(50)
    assert all(e.label is None for e in examples)


# --------------------------------------------------------------------------- held-out split


def test_split_holdout_is_deterministic_disjoint_and_complete() -> None:
    examples = [Example(f"text {i}") for i in range(50)]
    train, holdout = split_holdout(examples, 0.2, seed=7)
    assert len(holdout) == 10
    assert len(train) == 40
    assert set(train) | set(holdout) == set(examples)
    assert not set(train) & set(holdout)
    assert split_holdout(examples, 0.2, seed=7) == (train, holdout)
    assert split_holdout(examples, 0.2, seed=8) != (train, holdout)


def test_split_holdout_keeps_one_on_each_side() -> None:
    two = [Example("a"), Example("b")]
    for fraction in (0.01, 0.5, 0.99):
        train, holdout = split_holdout(two, fraction, seed=0)
        assert len(train) == 1
        assert len(holdout) == 1
    with pytest.raises(DataError, match="at least 2 examples"):
        split_holdout([Example("a")], 0.5, seed=0)
    with pytest.raises(DataError, match="between 0 and 1"):
        split_holdout(two, 1.0, seed=0)


def test_package_corpus_reads_installed_packages_docstrings_without_importing_them() -> None:
    import sys

    from edgefed.cloud.compress.data import package_corpus

    before = set(sys.modules)
    first = package_corpus(["email", "not_a_real_package_xyz"], max_sentences=50)
    assert 0 < len(first) <= 50
    assert first == package_corpus(["email"], max_sentences=50)
    assert all(5 <= len(s.split()) <= 40 for s in first)
    assert not {m for m in set(sys.modules) - before if m.startswith("email.")}
