"""The decoder split on a tiny Llama with the real SmolLM2-135M's features (tied input/output
embeddings, rope_theta 100000, three query heads per key/value head) plus static llama3 rope
scaling: head + tail, and the whole-model graph from the same exporter, generate exactly the
tokens of transformers' greedy ``generate``. Rope variants that an exported graph cannot follow
are refused. No GGUF needed: the model is built from a config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgefed.cloud.split import (
    SplitPair,
    SplitRunError,
    UnsupportedModelError,
    cached_generate,
    export_split,
    split_generate,
)
from edgefed.cloud.split.partition_decoder import export_decoder_full
from tests.cloud.split.tiny_split import LAYERS, build

PROMPTS = ["The cat sat on the", "Please send the signed contract back by Friday, because"]
NEW_TOKENS = 10


@dataclass
class Smol:
    model: Any
    tokenizer: Any
    pair: SplitPair
    full: Path


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Smol:
    root = tmp_path_factory.mktemp("split-smollm")
    model, tok = build("smollm", root / "model")
    pair = export_split(root / "model", root / "k1", 1, task="text-generation")
    full = export_decoder_full(root / "model", root / "full")
    return Smol(model, tok, pair, full)


def _ids(tok: Any, text: str) -> np.ndarray:
    return np.asarray(
        tok([text], return_tensors="np", add_special_tokens=False)["input_ids"], np.int64
    )


def _reference(model: Any, ids: np.ndarray) -> list[list[int]]:
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(ids),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return [list(map(int, row)) for row in out[:, ids.shape[1] :]]


def test_the_tiny_model_has_the_features_it_stands_for(smol: Smol) -> None:
    config = smol.model.config
    assert smol.model.lm_head.weight is smol.model.model.embed_tokens.weight
    assert config.num_attention_heads // config.num_key_value_heads == 3
    assert config.rope_theta == 100000.0
    assert config.rope_scaling["rope_type"] == "llama3"


def test_split_and_whole_graph_generate_the_tokens_of_transformers(smol: Smol) -> None:
    head, tail = (
        _session(smol.pair.head_dir / "model.onnx"),
        _session(smol.pair.tail_dir / "model.onnx"),
    )
    full = _session(smol.full)
    for text in PROMPTS:
        ids = _ids(smol.tokenizer, text)
        expected = _reference(smol.model, ids)
        assert split_generate(head, tail, ids, NEW_TOKENS).tokens.tolist() == expected, text
        whole = cached_generate(full, ids, NEW_TOKENS)
        assert whole.tokens.tolist() == expected, text
        assert whole.crossings == []


def test_each_graph_holds_its_own_copy_of_the_tied_embedding(smol: Smol) -> None:
    """Tied weights are one tensor in torch; the head needs it as the embedding and the tail as
    the LM head, so each graph must carry it (nothing is fetched from the other side)."""
    import onnx

    vocab, hidden = smol.model.model.embed_tokens.weight.shape

    def has_embedding(path: Path) -> bool:
        graph = onnx.load(str(path)).graph
        return any(sorted(init.dims) == sorted([vocab, hidden]) for init in graph.initializer)

    assert has_embedding(smol.pair.head_dir / "model.onnx")
    assert has_embedding(smol.pair.tail_dir / "model.onnx")


def test_the_whole_graph_is_refused_as_a_split_side_and_vice_versa(smol: Smol) -> None:
    head = _session(smol.pair.head_dir / "model.onnx")
    full = _session(smol.full)
    ids = _ids(smol.tokenizer, PROMPTS[0])
    with pytest.raises(SplitRunError, match="full session has no 'logits' output"):
        cached_generate(head, ids, 2)
    with pytest.raises(SplitRunError, match="no 'hidden_states' output"):
        split_generate(full, full, ids, 2)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_rope_that_follows_the_sequence_length_is_refused(rope_type: str, tmp_path: Path) -> None:
    scaling: dict[str, Any] = {"rope_type": rope_type, "factor": 2.0}
    if rope_type == "longrope":
        half = 4  # head_dim 8 / 2
        scaling |= {"short_factor": [1.0] * half, "long_factor": [2.0] * half}
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        max_position_embeddings=64,
        rope_scaling=scaling,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    with pytest.raises(UnsupportedModelError, match=f"{rope_type}.*rope scaling"):
        export_split(tmp_path / "model", tmp_path / "out", 2, task="text-generation")
    with pytest.raises(UnsupportedModelError, match="sequence length"):
        export_decoder_full(tmp_path / "model", tmp_path / "full")
