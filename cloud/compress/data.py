"""Distillation data: texts (and optional labels) from a file, a ``datasets`` directory or the
built-in offline corpus, and a deterministic held-out split.

Every loader strips whitespace, drops empty texts, keeps the order of the source and drops exact
duplicates (same text and same label). Bad input raises :class:`DataError` naming the file and,
for JSONL, the line.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import json
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefed.cloud.compress.config import Task
from edgefed.cloud.compress.errors import DataError

Label = str | int


@dataclass(frozen=True, slots=True)
class Example:
    """One distillation example: a text and, for classification, an optional label (a label
    name of the teacher's ``label2id`` or a class index)."""

    text: str
    label: Label | None = None


# --------------------------------------------------------------------------- loading


def load_examples(
    path: Path | None, *, task: Task, max_examples: int | None = None
) -> list[Example]:
    """Read distillation examples.

    ``path`` is a ``.txt`` file (one text per non-empty line), a ``.jsonl`` file (one object per
    line with a string ``text`` and an optional string or integer ``label``), a directory written
    by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` contributes its ``train`` split) with a
    ``text`` column and an optional ``label`` column, or ``None`` for the built-in offline corpus
    (no labels). ``max_examples`` caps the result after de-duplication. ``task`` is accepted so
    callers state what the data is for; labels are checked against the teacher when distilling.
    """
    del task  # labels are validated against the teacher's label2id in distill
    if max_examples is not None and max_examples < 1:
        raise DataError(f"max_examples must be at least 1, got {max_examples}")
    if path is None:
        examples = [Example(text) for text in default_corpus()]
    else:
        examples = _dedupe(_read(path))
        if not examples:
            raise DataError(f"{path} contains no texts")
    return examples[:max_examples] if max_examples is not None else examples


def _read(path: Path) -> Iterator[Example]:
    """Examples of one source, in order, stripped and without empty texts (not de-duplicated)."""
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        return _read_dataset_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _read_txt(path)
    if suffix == ".jsonl":
        return _read_jsonl(path)
    raise DataError(
        f"data file {path} has an unknown extension {path.suffix!r}: use .txt (one text per "
        "line), .jsonl (objects with 'text' and optional 'label') or a datasets directory"
    )


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None


def _read_txt(path: Path) -> Iterator[Example]:
    for line in _lines(path):
        text = line.strip()
        if text:
            yield Example(text)


def _read_jsonl(path: Path) -> Iterator[Example]:
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        example = _example(record.get("text"), record.get("label"), where)
        if example is not None:
            yield example


def _example(text: object, label: object, where: str) -> Example | None:
    """An example from raw values, or None when the text is empty after stripping."""
    if not isinstance(text, str):
        found = "no 'text'" if text is None else f"'text' of type {type(text).__name__}"
        raise DataError(f"{where}: expected a string 'text', found {found}")
    if label is not None and (isinstance(label, bool) or not isinstance(label, str | int)):
        raise DataError(
            f"{where}: 'label' must be a string or an integer, got {type(label).__name__}"
        )
    text = text.strip()
    return Example(text, label) if text else None


def _read_dataset_dir(path: Path) -> Iterator[Example]:
    """Rows of a ``datasets`` directory (``train`` split of a ``DatasetDict``)."""
    import datasets  # type: ignore[import-untyped]  # heavy: imported only when used

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for a bad directory
        raise DataError(f"{path} is not a dataset saved by datasets' save_to_disk: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            splits = ", ".join(loaded) or "none"
            raise DataError(f"dataset {path} has no 'train' split (splits: {splits})")
        loaded = loaded["train"]
    columns = list(loaded.column_names)
    if "text" not in columns:
        raise DataError(f"dataset {path} has no 'text' column (columns: {', '.join(columns)})")
    texts: list[Any] = list(loaded["text"])
    labels: list[Any] = list(loaded["label"]) if "label" in columns else [None] * len(texts)
    for row, (text, label) in enumerate(zip(texts, labels, strict=True)):
        example = _example(text, label, f"{path} row {row}")
        if example is not None:
            yield example


def _dedupe(examples: Iterable[Example]) -> list[Example]:
    """Drop exact repeats (same text and label), keeping the first occurrence's position."""
    return list(dict.fromkeys(examples))


# --------------------------------------------------------------------------- held-out split


def split_holdout(
    examples: Sequence[Example], fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Shuffle deterministically by ``seed`` and cut ``fraction`` off as held-out data.

    Both parts get at least one example, so at least two examples are needed.
    """
    if len(examples) < 2:
        raise DataError(
            f"need at least 2 examples to hold some out for validation, got {len(examples)}"
        )
    if not 0 < fraction < 1:
        raise DataError(f"holdout fraction must be between 0 and 1, got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # noqa: S311 - a data split, not a secret
    n_holdout = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    holdout = [examples[i] for i in order[:n_holdout]]
    train = [examples[i] for i in order[n_holdout:]]
    return train, holdout


# --------------------------------------------------------------------------- offline corpus

_CORPUS_MODULES: tuple[str, ...] = (
    "json", "os", "pathlib", "collections", "itertools", "functools", "re", "datetime",
    "asyncio", "logging", "argparse", "csv", "email", "http.client", "urllib.parse",
    "xml.etree.ElementTree", "sqlite3", "statistics", "decimal", "fractions", "textwrap",
    "string", "shutil", "subprocess", "threading", "queue", "socket", "ssl", "hashlib",
    "random", "math", "typing", "dataclasses", "enum", "inspect", "unittest", "zipfile",
    "tarfile", "gzip", "contextlib", "io", "heapq", "bisect", "pickle", "configparser",
    "tempfile", "glob", "difflib", "pprint", "abc", "selectors", "ipaddress", "uuid",
    "calendar", "locale", "codecs", "struct", "array", "weakref", "copy", "operator",
    "traceback", "warnings", "zlib", "bz2", "lzma", "base64", "binascii", "mimetypes",
    "smtplib", "imaplib", "ftplib", "http.server", "http.cookies", "urllib.request",
    "html.parser", "xml.dom.minidom", "wave", "sched", "timeit", "cProfile", "pdb", "doctest",
    "multiprocessing", "concurrent.futures", "graphlib", "ast", "tokenize", "dis",
    "importlib", "pkgutil", "zipimport", "runpy", "platform", "getpass", "shlex", "fnmatch",
    "filecmp", "netrc", "plistlib", "secrets", "hmac", "numbers", "cmath", "reprlib",
    "types", "gettext", "optparse", "tkinter", "turtle", "venv", "zoneinfo", "ctypes",
)  # fmt: skip

_FUNCTION_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef)
_BULLET = re.compile(r"^(?:[*\-\u2022]|\d+\.)\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_WORDY = re.compile(r"^[A-Z][^<>{}|\\]*[a-z][.!?]$")
_CODE_MARKERS = (">>>", "...:", "::=", "==", "->", "()", "[]", "__", "|", "\\", "Copyright")


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    """All corpus sentences in a fixed order (computed once per process)."""
    return tuple(dict.fromkeys(_sentences(_corpus_paragraphs())))


def default_corpus(max_sentences: int | None = None) -> list[str]:
    """English sentences that ship with CPython (about 4,800 on 3.11): the ``pydoc_data`` help
    topics and the docstrings of ~120 standard-library modules (module and class docstrings
    whole, the first paragraph of functions and methods; read from the source files, so imports
    and monkey-patching by other libraries change nothing), split into 5-40-word sentences with
    whitespace normalised, de-duplicated, in the same order on every call and in every process
    of the same Python. Nothing is downloaded. The text is technical English; models distilled
    on it lag out of domain."""
    sentences = _corpus()
    return list(sentences if max_sentences is None else sentences[:max_sentences])


def package_corpus(packages: Sequence[str], max_sentences: int | None = None) -> list[str]:
    """More offline English: sentences from the docstrings in the source files of installed
    packages (read with ``ast``, never imported; test folders skipped), package by package in
    the order given, files in sorted order, de-duplicated. Missing packages are skipped. How
    much text this yields depends on what is installed, so it is not the default corpus."""
    out: dict[str, None] = {}
    for name in packages:
        for sentence in _sentences(_package_paragraphs(name)):
            out[sentence] = None
            if max_sentences is not None and len(out) >= max_sentences:
                return list(out)
    return list(out)


def _package_paragraphs(package: str) -> Iterator[str]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is None or spec.submodule_search_locations is None:
        return
    root = Path(spec.origin).parent
    for path in sorted(root.rglob("*.py")):
        if any(part in ("tests", "test", "testing") for part in path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        yield from _source_paragraphs(tree)


def _corpus_paragraphs() -> Iterator[str]:
    """Prose paragraphs: pydoc topics first (sorted by topic), then docstrings module by module."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield from _prose_paragraphs(topics[name])
    for module_name in _CORPUS_MODULES:
        yield from _docstring_paragraphs(module_name)


def _prose_paragraphs(text: str) -> Iterator[str]:
    """Blocks between blank lines joined into one line, list bullets removed; interactive
    examples and grammar rules are skipped (other code fails the sentence filter)."""
    for block in re.split(r"\n\s*\n", text):
        if ">>>" in block or "::=" in block:
            continue
        yield _BULLET.sub("", " ".join(line.strip() for line in block.splitlines()))


def _docstring_paragraphs(module_name: str) -> Iterator[str]:
    """Docstrings of a standard-library module, read from its source files (a package adds its
    public submodules, by name) so that nothing is imported and nothing another library patched
    at run time changes the text; compiled modules (math, itertools) are read from the module."""
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:  # optional stdlib parts can be missing from a build
        return
    if spec.origin is None or not spec.origin.endswith(".py"):
        yield from _compiled_module_paragraphs(module_name)
        return
    for path in _source_files(Path(spec.origin), spec.submodule_search_locations is not None):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        yield from _source_paragraphs(tree)


def _source_files(origin: Path, is_package: bool) -> list[Path]:
    if not is_package:
        return [origin]
    submodules = sorted(p for p in origin.parent.glob("*.py") if not p.name.startswith("_"))
    return [origin, *submodules]


def _source_paragraphs(tree: ast.Module) -> Iterator[str]:
    """All of the module's and its public classes' docstrings, the first paragraph of its public
    functions' and methods' docstrings, in source order."""
    yield from _whole_docstring(ast.get_docstring(tree))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield from _whole_docstring(ast.get_docstring(node))
            for item in node.body:
                if isinstance(item, _FUNCTION_DEFS) and not item.name.startswith("_"):
                    yield from _first_paragraph(ast.get_docstring(item))
        elif isinstance(node, _FUNCTION_DEFS) and not node.name.startswith("_"):
            yield from _first_paragraph(ast.get_docstring(node))


def _compiled_module_paragraphs(module_name: str) -> Iterator[str]:
    """Docstrings of a compiled module and of its public classes and functions, by name."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    yield from _whole_docstring(module.__doc__)
    for name in sorted(vars(module)):
        member = vars(module)[name]
        if name.startswith("_") or not (inspect.isclass(member) or inspect.isroutine(member)):
            continue
        if inspect.isclass(member):
            yield from _whole_docstring(member.__doc__)
        else:
            yield from _first_paragraph(member.__doc__)


def _whole_docstring(doc: object) -> Iterator[str]:
    if isinstance(doc, str) and doc.strip():
        yield from _prose_paragraphs(inspect.cleandoc(doc))


def _first_paragraph(doc: object) -> Iterator[str]:
    if isinstance(doc, str) and doc.strip():
        yield from _prose_paragraphs(inspect.cleandoc(doc).split("\n\n", 1)[0])


def _sentences(paragraphs: Iterable[str]) -> Iterator[str]:
    """Sentences of 5-40 words that read as prose (capitalised, ending in punctuation, free of
    code-like markers)."""
    for paragraph in paragraphs:
        for raw in _SENTENCE_END.split(" ".join(paragraph.replace("``", "").split())):
            sentence = raw.strip()
            if not 5 <= len(sentence.split()) <= 40 or not _WORDY.match(sentence):
                continue
            if any(marker in sentence for marker in _CODE_MARKERS):
                continue
            yield sentence
