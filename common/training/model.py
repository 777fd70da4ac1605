"""The model being federated: an HF encoder with its ``tokenizers`` tokenizer, and its float
state as named numpy arrays (what travels in Flower's ArrayRecords).

The server builds it from a model directory; a client builds the same architecture from the
config and tokenizer texts the server sends (randomly initialised, then the global arrays are
loaded), so a client needs no model files of its own.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer  # type: ignore[import-untyped]
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from edgefed.common.learning.data import TASKS
from edgefed.common.training.errors import TrainingError

log = logging.getLogger(__name__)

# Files of a tokenizer that save_dir copies from a source directory (those present).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)
_PAD_CANDIDATES = ("[PAD]", "<pad>", "<|pad|>")
_SPECIAL_CANDIDATES = {
    "unk_token": ("[UNK]", "<unk>"),
    "cls_token": ("[CLS]", "<s>"),
    "sep_token": ("[SEP]", "</s>"),
    "mask_token": ("[MASK]", "<mask>"),
    "bos_token": ("<s>",),
    "eos_token": ("</s>",),
}


class FederatedModel:
    """A model for ``task`` (``text-classification`` or ``feature-extraction``) with its
    tokenizer and the exact config/tokenizer texts that define it (their digest lets a client
    reuse a model it built already)."""

    def __init__(
        self,
        task: str,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        config_json: str,
        tokenizer_json: str,
    ) -> None:
        if task not in TASKS:
            raise TrainingError(f"unsupported task {task!r}; supported tasks: {', '.join(TASKS)}")
        self.task = task
        self.model = model
        self.tokenizer = tokenizer
        self.config_json = config_json
        self.tokenizer_json = tokenizer_json

    # ------------------------------------------------------------------ identity

    @property
    def digest(self) -> str:
        """sha256 hex of the config text followed by the tokenizer text."""
        return hashlib.sha256((self.config_json + self.tokenizer_json).encode("utf-8")).hexdigest()

    @property
    def config(self) -> PretrainedConfig:
        config = getattr(self.model, "config", None)
        if not isinstance(config, PretrainedConfig):
            raise TrainingError("the model carries no Hugging Face config")
        return config

    @property
    def label2id(self) -> dict[str, int] | None:
        """Label names to ids of a classifier; None for feature extraction."""
        if self.task != "text-classification":
            return None
        return {str(name): int(i) for name, i in (self.config.label2id or {}).items()}

    @property
    def num_labels(self) -> int:
        return int(self.config.num_labels)

    @property
    def num_layers(self) -> int:
        return len(encoder_layers(self.model))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dir(cls, path: Path, task: str | None = None) -> FederatedModel:
        """Load an HF model directory (config.json, weights, tokenizer.json). ``task`` None
        infers it: a ``*ForSequenceClassification`` architecture or declared labels mean
        ``text-classification``, anything else ``feature-extraction``."""
        config_file = path / "config.json"
        if not config_file.is_file():
            raise TrainingError(f"model directory {path} has no config.json")
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TrainingError(
                f"model directory {path} has no tokenizer.json (save a fast tokenizer next to "
                "the model with tokenizer.save_pretrained)"
            )
        try:
            declared = json.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TrainingError(f"cannot read {config_file}: {exc}") from None
        if not isinstance(declared, dict):
            raise TrainingError(f"{config_file} is not a JSON object")
        task = task or _infer_task(declared)
        tokenizer_json = tokenizer_file.read_text(encoding="utf-8")
        tokenizer = _parse_tokenizer(tokenizer_json)
        auto = _auto_class(task)
        try:
            model = auto.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for bad dirs
            raise TrainingError(f"cannot load the {task} model in {path}: {exc}") from None
        model = model.float().eval()
        return cls(task, model, tokenizer, model.config.to_json_string(), tokenizer_json)

    @classmethod
    def from_texts(cls, task: str, config_json: str, tokenizer_json: str) -> FederatedModel:
        """Build the architecture that ``config_json`` describes, randomly initialised (load the
        global arrays next), with the tokenizer of ``tokenizer_json``."""
        config = _parse_config(config_json)
        tokenizer = _parse_tokenizer(tokenizer_json)
        auto = _auto_class(task)
        try:
            model = auto.from_config(config)
        except Exception as exc:  # noqa: BLE001 - unknown architectures fail in many ways
            raise TrainingError(f"cannot build a {task} model from the config: {exc}") from None
        return cls(task, model.float().eval(), tokenizer, config_json, tokenizer_json)

    # ------------------------------------------------------------------ arrays

    def arrays(self) -> dict[str, np.ndarray]:
        """float32 copies of every floating-point state_dict entry, in state_dict order
        (integer buffers such as ``position_ids`` are rebuilt by the model itself)."""
        return {
            key: value.detach().to("cpu", torch.float32).numpy().copy()
            for key, value in self.model.state_dict().items()
            if value.is_floating_point()
        }

    def load_arrays(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Load a full float state; refuses missing, extra, misshapen, non-float or non-finite
        arrays (naming them) before changing any weight."""
        state = {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}
        missing = [k for k in state if k not in arrays]
        extra = [k for k in arrays if k not in state]
        problems = []
        if missing:
            problems.append(f"missing keys {_few(missing)}")
        if extra:
            problems.append(f"unexpected keys {_few(extra)}")
        shapes = [
            f"{k} {tuple(arrays[k].shape)} != {tuple(v.shape)}"
            for k, v in state.items()
            if k in arrays and tuple(np.shape(arrays[k])) != tuple(v.shape)
        ]
        if shapes:
            problems.append(f"shape mismatch: {_few(shapes)}")
        if problems:
            raise TrainingError("arrays do not match the model: " + "; ".join(problems))
        for key in state:
            value = arrays[key]
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
                kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
                raise TrainingError(f"array {key} is not floating point ({kind})")
            if not np.isfinite(value).all():
                raise TrainingError(f"array {key} holds NaN or infinite values")
        with torch.no_grad():
            for key, tensor in state.items():
                tensor.copy_(torch.from_numpy(np.ascontiguousarray(arrays[key])).to(tensor.dtype))

    # ------------------------------------------------------------------ tokenization

    def encode(
        self, texts: Sequence[str], pairs: Sequence[str] | None, max_seq_len: int
    ) -> dict[str, torch.Tensor]:
        """Model inputs for a batch, padded to its longest and truncated to ``max_seq_len``
        (and to the model's position limit)."""
        limit = getattr(self.config, "max_position_embeddings", None)
        length = min(max_seq_len, int(limit)) if isinstance(limit, int) else max_seq_len
        tok = self.tokenizer
        tok.enable_truncation(max_length=length)
        pad_id, pad_token = self._pad()
        tok.enable_padding(pad_id=pad_id, pad_token=pad_token)
        inputs: list[Any] = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
        encodings = tok.encode_batch(inputs)
        batch = {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        }
        if _accepts(self.model, "token_type_ids"):
            batch["token_type_ids"] = torch.tensor(
                [e.type_ids for e in encodings], dtype=torch.long
            )
        return batch

    def _pad(self) -> tuple[int, str]:
        padding = self.tokenizer.padding
        if padding:
            return int(padding["pad_id"]), str(padding["pad_token"])
        for token in _PAD_CANDIDATES:
            pad_id = self.tokenizer.token_to_id(token)
            if pad_id is not None:
                return pad_id, token
        pad_id = getattr(self.config, "pad_token_id", None)
        if isinstance(pad_id, int):
            return pad_id, self.tokenizer.id_to_token(pad_id) or "[PAD]"
        return 0, self.tokenizer.id_to_token(0) or "[PAD]"

    # ------------------------------------------------------------------ saving

    def save_dir(self, out: Path, *, tokenizer_source: Path | None = None) -> Path:
        """Save as an HF model directory (safetensors) that ``AutoModelFor…`` and
        ``AutoTokenizer`` load: the tokenizer files of ``tokenizer_source`` when given, else
        this model's tokenizer.json with a matching tokenizer_config.json."""
        out.mkdir(parents=True, exist_ok=True)
        model = self.model
        if not isinstance(model, PreTrainedModel):
            raise TrainingError(f"cannot save a {type(model).__name__}: not a transformers model")
        model.save_pretrained(out, safe_serialization=True)
        if tokenizer_source is not None:
            copied = [n for n in TOKENIZER_FILES if (tokenizer_source / n).is_file()]
            if not copied:
                raise TrainingError(f"tokenizer source {tokenizer_source} has no tokenizer files")
            for name in copied:
                shutil.copyfile(tokenizer_source / name, out / name)
            return out
        fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
            tokenizer_object=Tokenizer.from_str(self.tokenizer_json),
            model_max_length=int(getattr(self.config, "max_position_embeddings", 512)),
            **self._special_tokens(),
        )
        fast.save_pretrained(out)
        (out / "tokenizer.json").write_text(self.tokenizer_json, encoding="utf-8")
        return out

    def _special_tokens(self) -> dict[str, str]:
        found = {"pad_token": self._pad()[1]}
        for name, candidates in _SPECIAL_CANDIDATES.items():
            for token in candidates:
                if self.tokenizer.token_to_id(token) is not None:
                    found[name] = token
                    break
        return found


def encoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's stack of transformer layers (the first ModuleList as long as the config's
    layer count); empty when none is found."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            stack: list[torch.nn.Module] = list(module)
            if count is None or len(stack) == count:
                return stack
    return []


def _infer_task(declared: Mapping[str, object]) -> str:
    architectures = declared.get("architectures") or []
    if isinstance(architectures, list) and any(
        str(a).endswith("ForSequenceClassification") for a in architectures
    ):
        return "text-classification"
    if "id2label" in declared and isinstance(architectures, list) and not architectures:
        return "text-classification"
    return "feature-extraction"


def _auto_class(task: str) -> Any:
    if task == "text-classification":
        return AutoModelForSequenceClassification
    if task == "feature-extraction":
        return AutoModel
    raise TrainingError(f"unsupported task {task!r}; supported tasks: {', '.join(TASKS)}")


def _parse_config(config_json: str) -> PretrainedConfig:
    try:
        declared = json.loads(config_json)
    except json.JSONDecodeError as exc:
        raise TrainingError(f"the model config is not valid JSON: {exc.msg}") from None
    if not isinstance(declared, dict):
        raise TrainingError("the model config is not a JSON object")
    model_type = declared.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise TrainingError(f"the model config names no known model_type (got {model_type!r})")
    try:
        config: PretrainedConfig = CONFIG_MAPPING[model_type].from_dict(declared)
    except Exception as exc:  # noqa: BLE001 - config classes validate in their own ways
        raise TrainingError(f"invalid {model_type} config: {exc}") from None
    return config


def _parse_tokenizer(tokenizer_json: str) -> Tokenizer:
    try:
        return Tokenizer.from_str(tokenizer_json)
    except Exception as exc:  # noqa: BLE001 - the Rust side raises plain Exceptions
        raise TrainingError(f"the tokenizer is not a valid tokenizer.json: {exc}") from None


def _accepts(model: torch.nn.Module, name: str) -> bool:
    return name in inspect.signature(model.forward).parameters


def _few(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"
