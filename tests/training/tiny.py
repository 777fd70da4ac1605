"""Tiny federated models built from configs (2 layers, hidden 32) with a word-level tokenizer
trained on the toy sentences, and toy data sets: a sentence's colour word decides its label, and
embedding pairs share their object word."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import BertConfig, BertForSequenceClassification, BertModel

from edgefed.common.learning import LocalExample
from edgefed.common.training import FederatedModel

COLOURS = ("red", "blue")
OBJECTS = ("car", "sky", "ball", "house", "apple", "shirt", "door", "pen", "cup", "lamp")
FILLER = ("the", "a", "near", "under", "is", "looks", "very", "quite", "this", "that")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def colour_examples(n: int, seed: int = 0) -> list[LocalExample]:
    """Sentences whose only signal is the colour word (label 0 = red, 1 = blue)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        a, b = rng.sample(OBJECTS, 2)
        words = [rng.choice(FILLER), a, rng.choice(FILLER), b, "is", COLOURS[label]]
        out.append(LocalExample(text=" ".join(words), label=label))
    return out


def pair_examples(n: int, seed: int = 0) -> list[LocalExample]:
    """Pairs that share an object and a colour among random filler words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        thing, colour = rng.choice(OBJECTS), rng.choice(COLOURS)
        text = f"{rng.choice(FILLER)} {colour} {thing} {rng.choice(FILLER)}"
        pair = f"{thing} {rng.choice(FILLER)} {rng.choice(FILLER)} {colour}"
        out.append(LocalExample(text=text, text_pair=pair))
    return out


def tokenizer() -> Tokenizer:
    """A BERT-style word-level tokenizer ([CLS] … [SEP]) over every toy word."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = [" ".join(COLOURS + OBJECTS + FILLER)]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return tok


def bert_config(tok: Tokenizer, *, labels: bool) -> BertConfig:
    extra = {}
    if labels:
        extra = {
            "id2label": dict(enumerate(COLOURS)),
            "label2id": {c: i for i, c in enumerate(COLOURS)},
        }
    return BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        **extra,
    )


def build(task: str, *, seed: int = 0) -> FederatedModel:
    """A fresh tiny model for ``task`` (same weights for the same seed)."""
    tok = tokenizer()
    torch.manual_seed(seed)
    if task == "text-classification":
        model: torch.nn.Module = BertForSequenceClassification(bert_config(tok, labels=True))
    else:
        model = BertModel(bert_config(tok, labels=False))
    config_json = model.config.to_json_string()  # type: ignore[operator]
    return FederatedModel(task, model.eval(), tok, config_json, tok.to_str())


def save(task: str, out: Path, *, seed: int = 0) -> Path:
    return build(task, seed=seed).save_dir(out)
