"""Local data sets of an edge device: JSONL files that never leave the device.

One example per line. ``text-classification``: ``{"text": str, "label": int | str}`` (a label
name is mapped through the model's ``label2id``), optionally with ``"text_pair"`` for pair
classification. ``feature-extraction``: ``{"text": str, "text_pair": str}``, two texts that
should embed close to each other. A directory holds any number of ``*.jsonl`` files, read in
sorted order. Every problem is reported as ``file:line: what was wrong`` so that a device owner
can fix the file; nothing malformed is silently skipped (blank lines are not examples and are
ignored).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgefed.common.learning.errors import LearningError, TrainingDataError

TASKS = ("text-classification", "feature-extraction")


@dataclass(frozen=True)
class LocalExample:
    """One training example: a text with a label id (classification) or a text pair
    (embeddings; optional second text of a pair classification)."""

    text: str
    label: int | None = None
    text_pair: str | None = None


def read_local_dataset(
    path: Path,
    task: str,
    label2id: Mapping[str, int] | None = None,
    *,
    max_examples: int = 0,
) -> list[LocalExample]:
    """Read the examples of ``path`` (a ``.jsonl`` file or a directory of them) for ``task``.

    ``label2id`` maps label names to ids; when given, integer labels must be among its ids too.
    ``max_examples`` > 0 stops after that many examples (the rest is not read). Raises
    :class:`TrainingDataError` for a missing path, an empty data set and any malformed line.
    """
    if task not in TASKS:
        raise LearningError(f"unsupported task {task!r}; supported tasks: {', '.join(TASKS)}")
    if max_examples < 0:
        raise LearningError(f"max_examples must be >= 0, got {max_examples}")
    files = _data_files(path)
    examples: list[LocalExample] = []
    for file in files:
        for lineno, record in _records(file):
            examples.append(_example(record, task, label2id, f"{file}:{lineno}"))
            if max_examples and len(examples) >= max_examples:
                return examples
    if not examples:
        where = f"{files[0]}:1" if len(files) == 1 else f"{path}"
        raise TrainingDataError(f"{where}: no examples (the data set is empty)")
    return examples


def write_local_dataset(path: Path, examples: Iterable[LocalExample]) -> None:
    """Write ``examples`` as JSONL to ``path`` atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for example in examples:
                record: dict[str, object] = {"text": example.text}
                if example.label is not None:
                    record["label"] = example.label
                if example.text_pair is not None:
                    record["text_pair"] = example.text_pair
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
        if not files:
            raise TrainingDataError(f"{path}: no *.jsonl files in the data directory")
        return files
    if path.is_file():
        return [path]
    if path.exists():
        raise TrainingDataError(f"{path}: not a file or directory")
    raise TrainingDataError(f"{path}: no such file or directory")


def _records(file: Path) -> Iterator[tuple[int, object]]:
    try:
        handle = file.open("rb")
    except OSError as exc:
        raise TrainingDataError(f"{file}: cannot open: {exc.strerror or exc}") from None
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{file}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TrainingDataError(f"{where}: not UTF-8 text ({exc.reason})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise TrainingDataError(f"{where}: invalid JSON: {exc.msg}") from None


def _example(
    record: object, task: str, label2id: Mapping[str, int] | None, where: str
) -> LocalExample:
    if not isinstance(record, dict):
        raise TrainingDataError(f"{where}: expected a JSON object, got {_json_type(record)}")
    text = _text(record, "text", where)
    if task == "feature-extraction":
        return LocalExample(text=text, text_pair=_text(record, "text_pair", where))
    pair = _optional_text(record, "text_pair", where)
    return LocalExample(text=text, label=_label(record, label2id, where), text_pair=pair)


def _text(record: dict[str, object], key: str, where: str) -> str:
    if key not in record:
        raise TrainingDataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise TrainingDataError(f"{where}: field {key!r} must be a string, got {_json_type(value)}")
    if not value.strip():
        raise TrainingDataError(f"{where}: field {key!r} is blank")
    return value


def _optional_text(record: dict[str, object], key: str, where: str) -> str | None:
    return None if record.get(key) is None else _text(record, key, where)


def _label(record: dict[str, object], label2id: Mapping[str, int] | None, where: str) -> int:
    if "label" not in record:
        raise TrainingDataError(f"{where}: missing field 'label'")
    value = record["label"]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TrainingDataError(
            f"{where}: field 'label' must be an integer id or a label name, got {_json_type(value)}"
        )
    if isinstance(value, str):
        if label2id is None:
            raise TrainingDataError(
                f"{where}: label {value!r} is a name but the model declares no label names; "
                "use an integer label id"
            )
        if value not in label2id:
            raise TrainingDataError(
                f"{where}: unknown label {value!r}; known labels: {', '.join(label2id)}"
            )
        return label2id[value]
    if value < 0:
        raise TrainingDataError(f"{where}: label {value} is negative")
    if label2id is not None and value not in set(label2id.values()):
        ids = ", ".join(str(i) for i in sorted(set(label2id.values())))
        raise TrainingDataError(f"{where}: label id {value} is not one of the model's ids {ids}")
    return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
