"""Tiny 4-layer models for split tests, built from configs (seconds, no downloads) and saved with
the real MiniLM tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from tests.compress.tiny_hf import tokenizer

LAYERS = 4


def build(kind: str, out: Path, *, seed: int = 0) -> tuple[PreTrainedModel, Any]:
    """``bert`` (BertModel), ``cls`` (3-label classifier), ``gpt2``, ``llama`` or ``smollm`` with
    4 layers. ``smollm`` is a Llama with SmolLM2's features: input and output embeddings tied,
    rope_theta 100000, three query heads per key/value head; plus static llama3 rope scaling
    (which SmolLM2 lacks but Llama 3 checkpoints have)."""
    torch.manual_seed(seed)
    tok = tokenizer()
    vocab = tok.vocab_size
    model: PreTrainedModel
    if kind in ("bert", "cls"):
        config = BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=LAYERS,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            num_labels=3,
        )
        model = BertModel(config) if kind == "bert" else BertForSequenceClassification(config)
    elif kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab,
                n_embd=32,
                n_layer=LAYERS,
                n_head=2,
                n_positions=128,
                bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id,
                initializer_range=0.1,
            )
        )
    elif kind == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=LAYERS,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=128,
                bos_token_id=tok.cls_token_id,
                eos_token_id=tok.sep_token_id,
                pad_token_id=tok.pad_token_id,
                initializer_range=0.1,
            )
        )
    elif kind == "smollm":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=48,
                intermediate_size=96,
                num_hidden_layers=LAYERS,
                num_attention_heads=6,
                num_key_value_heads=2,
                max_position_embeddings=128,
                rope_theta=100000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
                tie_word_embeddings=True,
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
