"""The teacher: a local Hugging Face model directory loaded for one task, never from the hub."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from edgefed.cloud.compress.config import TASKS, Task
from edgefed.cloud.compress.errors import TeacherError

log = logging.getLogger(__name__)

_AUTO_CLASSES: dict[str, Any] = {
    "feature-extraction": AutoModel,
    "text-classification": AutoModelForSequenceClassification,
    "text-generation": AutoModelForCausalLM,
}

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


@dataclass
class Teacher:
    """A loaded teacher in eval mode with its tokenizer (decoders get a pad token)."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    task: Task
    path: Path


def load_teacher(path: Path, task: Task) -> Teacher:
    """Load the model directory ``path`` for ``task`` with local files only.

    ``feature-extraction`` loads the bare model (``AutoModel``), ``text-classification`` a
    sequence classifier (the config must declare labels or a classification architecture),
    ``text-generation`` a causal LM. Decoder tokenizers without a pad token pad with the end of
    sequence token, on the right. Every failure is a :class:`TeacherError` that names the
    directory and what is wrong with it.
    """
    if task not in TASKS:
        raise TeacherError(f"unsupported task {task!r}; supported tasks: {', '.join(TASKS)}")
    _check_directory(path)
    config = _load_config(path)
    _check_task_fits(path, config, task)
    tokenizer = _load_tokenizer(path)
    model = _load_model(path, task)
    model.eval()  # type: ignore[no-untyped-call]
    if task == "text-generation":
        _prepare_decoder_padding(model, tokenizer)
    return Teacher(model=model, tokenizer=tokenizer, task=task, path=path)


def _check_directory(path: Path) -> None:
    if not path.exists():
        raise TeacherError(f"teacher directory {path} does not exist")
    if not path.is_dir():
        raise TeacherError(f"teacher {path} is not a directory (expected a model directory)")
    if not (path / "config.json").is_file():
        raise TeacherError(
            f"teacher directory {path} is not a Hugging Face model: it has no config.json"
        )


def _load_config(path: Path) -> PretrainedConfig:
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad configs
        raise TeacherError(f"cannot read the model config in {path}: {exc}") from None
    return config


def _check_task_fits(path: Path, config: PretrainedConfig, task: Task) -> None:
    """Refuse a teacher whose config cannot serve the task (before loading any weights)."""
    architectures: list[str] = list(getattr(config, "architectures", None) or [])
    if task == "text-classification" and not _declares_labels(path, architectures):
        raise TeacherError(
            f"teacher {path} has no classification head: its config declares no labels "
            "(id2label or num_labels) and no *ForSequenceClassification architecture"
        )
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    if task == "text-generation" and architectures and not causal:
        raise TeacherError(
            f"teacher {path} is not a causal language model (architectures: "
            f"{', '.join(architectures)}); text-generation needs a *ForCausalLM model"
        )


def _declares_labels(path: Path, architectures: list[str]) -> bool:
    """Whether config.json itself names labels or a classifier (every config object has a
    default of two labels, so the file is read rather than the object)."""
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return True
    declared = json.loads((path / "config.json").read_text(encoding="utf-8"))
    return isinstance(declared, dict) and ("id2label" in declared or "num_labels" in declared)


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise TeacherError(
            f"teacher directory {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); "
            "save the tokenizer next to the model with tokenizer.save_pretrained"
        )
    try:
        tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(  # type: ignore[no-untyped-call]
            path, local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001 - tokenizer loading fails in many ways
        raise TeacherError(f"cannot load the tokenizer in {path}: {exc}") from None
    return tokenizer


def _load_model(path: Path, task: Task) -> PreTrainedModel:
    auto = _AUTO_CLASSES[task]
    try:
        model: PreTrainedModel = auto.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - weights missing, wrong architecture, corrupt file
        raise TeacherError(f"cannot load the {task} model in {path}: {exc}") from None
    return model


def _prepare_decoder_padding(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Batches of a decoder pad on the right with the end of sequence token when the tokenizer
    has no pad token (the usual case for GPT-2 and Llama-family tokenizers)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TeacherError(
                "the decoder's tokenizer has neither a pad token nor an end of sequence token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
