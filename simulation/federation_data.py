"""The federated simulation's data and model: the English chatterbot-corpus as a text
classification task (which category does a question belong to?), split into a train pool, a
held-out set (the server's evaluation) and a small root set (FLTrust's trusted server data),
the train pool spread over N clients with a Dirichlet(alpha) non-IID split, and a tiny BERT
with a word-level tokenizer trained on the train texts.

Why chatterbot-corpus: it ships as a pip package (``chatterbot-corpus``), so nothing is
downloaded at run time, and its categories (AI, food, history, sports, trivia...) are a real
label skew a fleet of chat devices would see. Its questions are few (~750 after cleaning), so
the task stays small enough to train in seconds on a CPU.

Everything is deterministic by seed and cached on disk keyed by every parameter, so the
harness, the tests and the bench reuse one build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgefed.common.errors import PermanentError
from edgefed.common.learning import LocalExample, write_local_dataset

__all__ = [
    "CorpusSplit",
    "FederationData",
    "FederationDataError",
    "LabelledCorpus",
    "TextExample",
    "build_model_dir",
    "dirichlet_partition",
    "load_chatterbot",
    "prepare_federation_data",
    "split_corpus",
    "write_jsonl",
]

_DATA_VERSION = 1
"""Bumped when a build changes what it writes (old cache entries then miss)."""

MIN_PER_CATEGORY = 8
"""Categories with fewer distinct questions are dropped: a class that small cannot be split
into train, held-out and root parts and learnt."""


class FederationDataError(PermanentError):
    """The corpus cannot be read, or the requested split cannot be made."""


@dataclass(frozen=True, slots=True)
class TextExample:
    text: str
    label: str


@dataclass(frozen=True)
class LabelledCorpus:
    examples: list[TextExample]
    labels: list[str]
    """Category names, sorted (the model's ``id2label`` order)."""
    notes: list[str] = field(default_factory=list)
    """What was dropped and why."""

    def label_ids(self, examples: Sequence[TextExample] | None = None) -> np.ndarray:
        index = {name: i for i, name in enumerate(self.labels)}
        return np.array([index[e.label] for e in (examples or self.examples)], dtype=np.int64)


@dataclass(frozen=True)
class CorpusSplit:
    train: list[TextExample]
    held_out: list[TextExample]
    root: list[TextExample]


# --------------------------------------------------------------------------- the corpus


def _corpus_folder(language: str) -> Path:
    try:
        base = resources.files("chatterbot_corpus") / "data" / language
    except ModuleNotFoundError:
        raise FederationDataError(
            "the chatterbot-corpus package is not installed (pip install chatterbot-corpus)"
        ) from None
    folder = Path(str(base))
    if not folder.is_dir():
        raise FederationDataError(f"chatterbot-corpus has no language folder {folder}")
    return folder


def _category(doc: dict[str, Any], path: Path) -> str:
    names = doc.get("categories") or [path.stem]
    return str(names[0]).strip().lower().replace(" ", "-")


def load_chatterbot(
    *, language: str = "english", min_per_category: int = MIN_PER_CATEGORY
) -> LabelledCorpus:
    """Each conversation's first utterance (mostly a question) labelled with its file's
    category. Duplicates within a category count once; a text found in several categories is
    dropped (its label is ambiguous); categories left with fewer than ``min_per_category``
    texts are dropped. ``notes`` says what went."""
    import yaml

    folder = _corpus_folder(language)
    by_text: dict[str, set[str]] = defaultdict(set)
    order: list[str] = []
    for path in sorted(folder.glob("*.yml")):
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise FederationDataError(f"cannot read {path}: {exc}") from None
        if not isinstance(doc, dict):
            raise FederationDataError(f"{path}: not a chatterbot corpus file (no mapping)")
        category = _category(doc, path)
        for conversation in doc.get("conversations") or []:
            if not conversation or not isinstance(conversation[0], str):
                continue
            text = " ".join(conversation[0].split())
            if not text:
                continue
            if text not in by_text:
                order.append(text)
            by_text[text].add(category)
    notes: list[str] = []
    ambiguous = [t for t in order if len(by_text[t]) > 1]
    if ambiguous:
        notes.append(f"{len(ambiguous)} text(s) found in several categories dropped")
    kept = [TextExample(t, next(iter(by_text[t]))) for t in order if len(by_text[t]) == 1]
    counts = Counter(e.label for e in kept)
    small = sorted(c for c, n in counts.items() if n < min_per_category)
    if small:
        notes.append(
            f"categories with fewer than {min_per_category} texts dropped: "
            + ", ".join(f"{c} ({counts[c]})" for c in small)
        )
    examples = [e for e in kept if e.label not in small]
    labels = sorted({e.label for e in examples})
    if len(labels) < 2:
        raise FederationDataError(
            f"chatterbot-corpus {language}: fewer than 2 categories have {min_per_category} "
            "texts or more"
        )
    return LabelledCorpus(examples, labels, notes)


def split_corpus(
    corpus: LabelledCorpus, *, held_out: float = 0.2, root: float = 0.05, seed: int = 0
) -> CorpusSplit:
    """A stratified split: per category ``held_out`` of the texts for the server's evaluation,
    ``root`` for FLTrust's root set (at least one per category), the rest for the clients."""
    if not 0 < held_out < 1 or not 0 <= root < 1 or held_out + root >= 1:
        raise FederationDataError(
            f"held_out ({held_out}) and root ({root}) must be shares that leave data to train on"
        )
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[TextExample]] = defaultdict(list)
    for e in corpus.examples:
        by_label[e.label].append(e)
    train: list[TextExample] = []
    test: list[TextExample] = []
    trusted: list[TextExample] = []
    for label in corpus.labels:
        items = by_label[label]
        order = rng.permutation(len(items))
        n_test = max(1, round(held_out * len(items)))
        n_root = max(1, round(root * len(items))) if root > 0 else 0
        test += [items[i] for i in order[:n_test]]
        trusted += [items[i] for i in order[n_test : n_test + n_root]]
        train += [items[i] for i in order[n_test + n_root :]]
    return CorpusSplit(train=train, held_out=test, root=trusted)


# --------------------------------------------------------------------------- the non-IID split


def dirichlet_partition(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[list[int]]:
    """Indices of ``labels`` per client: for each class, the class's examples go to the
    clients in proportions drawn from Dirichlet(alpha, ..., alpha). Small alpha gives each
    client few classes; large alpha approaches an IID split. Every index goes to exactly one
    client.

    The draw is repeated (with the same seeded generator, so still deterministic) until every
    client holds at least ``min_size`` examples; after ``max_tries`` the last draw is kept and
    some clients are empty or short (callers report them: with more clients than examples no
    draw can fill them all)."""
    y = np.asarray(labels, dtype=np.int64)
    if num_clients < 1:
        raise FederationDataError(f"num_clients must be >= 1 (got {num_clients})")
    if not alpha > 0 or not np.isfinite(alpha):
        raise FederationDataError(f"alpha must be a finite number > 0 (got {alpha})")
    rng = np.random.default_rng(seed)
    tries = max_tries if y.size >= num_clients * min_size else 1
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for _ in range(max(1, tries)):
        parts = [[] for _ in range(num_clients)]
        for cls in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * idx.size).round().astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_size:
            break
    return [sorted(p) for p in parts]


# --------------------------------------------------------------------------- tokenizer + model


_ROLES = {
    "pad_token": "[PAD]",
    "unk_token": "[UNK]",
    "cls_token": "[CLS]",
    "sep_token": "[SEP]",
    "mask_token": "[MASK]",
}
_SPECIALS = list(_ROLES.values())


def _word_tokenizer(texts: Sequence[str], max_len: int) -> Any:
    """A word-level tokenizer (lower-cased words and punctuation) trained on ``texts``: the
    corpus is tiny, so whole words beat sub-words for a model trained from scratch."""
    from tokenizers import (  # type: ignore[import-untyped]
        Tokenizer,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from tokenizers.processors import TemplateProcessing  # type: ignore[import-untyped]
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=_ROLES["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        list(texts), trainer=trainers.WordLevelTrainer(special_tokens=_SPECIALS, min_frequency=1)
    )
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    fast: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        model_max_length=max_len,
        **_ROLES,
    )
    return fast


def build_model_dir(
    out_dir: Path,
    labels: Sequence[str],
    texts: Sequence[str],
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 2,
    max_len: int = 32,
    seed: int = 0,
) -> Path:
    """A randomly initialised (seeded) BERT classifier over ``labels`` with a word-level
    tokenizer trained on ``texts``, saved as a Hugging Face model directory (config.json with
    id2label/label2id, model.safetensors, tokenizer.json + tokenizer_config.json)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = _word_tokenizer(texts, max_len)
    config = BertConfig(  # type: ignore[no-untyped-call]
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 2,
        max_position_embeddings=max(64, max_len),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        problem_type="single_label_classification",
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)  # type: ignore[no-untyped-call]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# --------------------------------------------------------------------------- files


def write_jsonl(path: Path, examples: Sequence[TextExample], labels: Sequence[str]) -> Path:
    """The agents' local data format (``{"text": ..., "label": <id>}`` per line), written
    atomically by :func:`edgefed.common.learning.write_local_dataset`."""
    index = {name: i for i, name in enumerate(labels)}
    write_local_dataset(path, (LocalExample(text=e.text, label=index[e.label]) for e in examples))
    return path


@dataclass(frozen=True)
class FederationData:
    """A built federated data set on disk."""

    root: Path
    model_dir: Path
    partitions_dir: Path
    """``<partition-id>.jsonl`` per client (empty clients get no file)."""
    eval_path: Path
    root_path: Path
    labels: list[str]
    client_sizes: list[int]
    alpha: float
    seed: int
    cached: bool
    notes: list[str] = field(default_factory=list)

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    @property
    def empty_clients(self) -> list[int]:
        return [i for i, n in enumerate(self.client_sizes) if n == 0]

    def partition_path(self, partition_id: int) -> Path:
        return self.partitions_dir / f"{partition_id}.jsonl"


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefed" / "sim"


def _key(params: dict[str, Any]) -> str:
    blob = json.dumps({"v": _DATA_VERSION, **params}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def prepare_federation_data(
    *,
    clients: int,
    alpha: float,
    seed: int = 0,
    cache_dir: Path | None = None,
    hidden: int = 64,
    layers: int = 2,
    max_len: int = 32,
    min_per_category: int = MIN_PER_CATEGORY,
    progress: Callable[[str], None] | None = None,
) -> FederationData:
    """Build (or reuse from the cache) the corpus split, the Dirichlet partition over
    ``clients`` clients, the per-client JSONL files, the held-out and root JSONL files and the
    initial model directory. Raises :class:`FederationDataError` on bad parameters."""
    if clients < 1:
        raise FederationDataError(f"clients must be >= 1 (got {clients})")
    if not alpha > 0:
        raise FederationDataError(f"alpha must be > 0 (got {alpha})")
    say = progress or (lambda _m: None)
    params = {
        "clients": clients,
        "alpha": alpha,
        "seed": seed,
        "hidden": hidden,
        "layers": layers,
        "max_len": max_len,
        "min_per_category": min_per_category,
    }
    cache = (cache_dir or _default_cache_dir()).expanduser()
    folder = cache / f"federation-{_key(params)}"
    meta_path = folder / "federation.json"
    if meta_path.is_file():
        try:
            return _from_meta(folder, json.loads(meta_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            say(f"federation data cache entry {folder} unreadable; building again")
    say("reading chatterbot-corpus")
    corpus = load_chatterbot(min_per_category=min_per_category)
    split = split_corpus(corpus, seed=seed)
    y = corpus.label_ids(split.train)
    parts = dirichlet_partition(y, clients, alpha, seed=seed)
    notes = list(corpus.notes)
    empty = [i for i, p in enumerate(parts) if not p]
    if empty:
        notes.append(
            f"{len(empty)} of {clients} clients got no example (Dirichlet alpha={alpha:g} over "
            f"{len(split.train)} examples); they refuse to train"
        )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".federation-", dir=cache))
    try:
        say(f"writing {clients} client partitions")
        for i, part in enumerate(parts):
            if part:
                write_jsonl(
                    tmp / "partitions" / f"{i}.jsonl",
                    [split.train[j] for j in part],
                    corpus.labels,
                )
        (tmp / "partitions").mkdir(exist_ok=True)
        write_jsonl(tmp / "eval.jsonl", split.held_out, corpus.labels)
        write_jsonl(tmp / "root.jsonl", split.root, corpus.labels)
        say("building the tiny BERT and its tokenizer")
        build_model_dir(
            tmp / "model",
            corpus.labels,
            [e.text for e in split.train],
            hidden=hidden,
            layers=layers,
            max_len=max_len,
            seed=seed,
        )
        meta = {
            **params,
            "labels": corpus.labels,
            "client_sizes": [len(p) for p in parts],
            "train": len(split.train),
            "held_out": len(split.held_out),
            "root": len(split.root),
            "notes": notes,
        }
        (tmp / "federation.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        try:
            tmp.rename(folder)
        except OSError:  # another process built it first: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    data = _from_meta(folder, json.loads(meta_path.read_text(encoding="utf-8")))
    return dataclasses.replace(data, cached=False)


def _from_meta(folder: Path, meta: dict[str, Any]) -> FederationData:
    return FederationData(
        root=folder,
        model_dir=folder / "model",
        partitions_dir=folder / "partitions",
        eval_path=folder / "eval.jsonl",
        root_path=folder / "root.jsonl",
        labels=list(meta["labels"]),
        client_sizes=[int(n) for n in meta["client_sizes"]],
        alpha=float(meta["alpha"]),
        seed=int(meta["seed"]),
        cached=True,
        notes=list(meta["notes"]),
    )
