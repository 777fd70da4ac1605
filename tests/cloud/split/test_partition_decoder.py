"""Decoder split with a KV cache on each side: greedy generation through head and tail sessions
gives exactly the tokens of the full model's greedy generation, and after the prompt only one
hidden vector per token crosses the link."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgefed.cloud.split import SplitPair, SplitRunError, export_split, split_generate
from tests.cloud.split.tiny_split import build

PROMPTS = [
    "The cat sat on the",
    "Stock markets fell sharply on Monday after",
    "Please send the signed contract back by Friday, because",
]
NEW_TOKENS = 8


@dataclass
class Decoder:
    kind: str
    model: Any
    tokenizer: Any
    pairs: dict[int, SplitPair]


def _session(folder: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


def _sessions(pair: SplitPair) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    return _session(pair.head_dir), _session(pair.tail_dir)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def decoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Decoder:
    kind: str = request.param
    root = tmp_path_factory.mktemp(f"split-{kind}")
    model, tok = build(kind, root / "model")
    splits = (1, 2) if kind == "gpt2" else (2,)
    pairs = {
        k: export_split(root / "model", root / f"k{k}", k, task="text-generation") for k in splits
    }
    return Decoder(kind, model, tok, pairs)


def _prompt_ids(tok: Any, text: str) -> np.ndarray:
    return np.asarray(
        tok([text], return_tensors="np", add_special_tokens=False)["input_ids"], np.int64
    )


def _reference(
    model: Any, ids: np.ndarray, mask: np.ndarray | None = None, **kw: Any
) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask if mask is not None else np.ones_like(ids)),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            **kw,
        )
    return np.asarray(out[:, ids.shape[1] :].numpy())


def test_split_generation_equals_full_greedy_generation(decoder: Decoder) -> None:
    prompts = [_prompt_ids(decoder.tokenizer, text) for text in PROMPTS]
    references = [
        _reference(decoder.model, ids, eos_token_id=None, pad_token_id=0) for ids in prompts
    ]
    for k, pair in decoder.pairs.items():
        head, tail = _sessions(pair)
        for text, ids, expected in zip(PROMPTS, prompts, references, strict=True):
            got = split_generate(head, tail, ids, NEW_TOKENS)
            assert got.tokens.tolist() == expected.tolist(), f"k={k}, prompt {text!r}"
            assert got.sequences.tolist() == np.concatenate([ids, expected], axis=1).tolist()


def test_after_the_prompt_one_hidden_vector_per_token_crosses(decoder: Decoder) -> None:
    pair = next(iter(decoder.pairs.values()))
    ids = _prompt_ids(decoder.tokenizer, PROMPTS[1])
    got = split_generate(*_sessions(pair), ids, NEW_TOKENS)
    hidden = pair.hidden_size
    assert got.crossings[0] == (1, ids.shape[1], hidden)
    assert got.crossings[1:] == [(1, 1, hidden)] * (NEW_TOKENS - 1)
    assert got.crossing_bytes[1:] == [hidden * 4] * (NEW_TOKENS - 1)


def test_a_left_padded_batch_generates_like_each_prompt_alone(decoder: Decoder) -> None:
    tok = decoder.tokenizer
    tok.padding_side = "left"
    enc = tok(PROMPTS, padding=True, return_tensors="np", add_special_tokens=False)
    ids = np.asarray(enc["input_ids"], np.int64)
    mask = np.asarray(enc["attention_mask"], np.int64)
    assert (mask == 0).any()
    pair = max(decoder.pairs.values(), key=lambda p: p.k)
    got = split_generate(*_sessions(pair), ids, NEW_TOKENS, attention_mask=mask)
    expected = _reference(decoder.model, ids, mask, eos_token_id=None, pad_token_id=0)
    assert got.tokens.tolist() == expected.tolist()
    assert got.crossings[1] == (len(PROMPTS), 1, pair.hidden_size)


def test_end_of_sequence_stops_a_row_like_generate(decoder: Decoder) -> None:
    """With an eos id that the model produces, finished rows continue with padding, as in
    transformers' generate."""
    pair = next(iter(decoder.pairs.values()))
    head, tail = _sessions(pair)
    ids = _prompt_ids(decoder.tokenizer, PROMPTS[0])
    free = split_generate(head, tail, ids, NEW_TOKENS).tokens[0]
    eos = int(free[2])  # pretend the third generated token is the end of sequence
    got = split_generate(head, tail, ids, NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    expected = _reference(decoder.model, ids, eos_token_id=eos, pad_token_id=0)
    assert got.tokens.tolist() == expected.tolist()
    assert got.tokens.shape[1] <= 3  # stops once every row has finished


def test_sessions_in_the_wrong_order_are_refused(decoder: Decoder) -> None:
    head, tail = _sessions(next(iter(decoder.pairs.values())))
    ids = _prompt_ids(decoder.tokenizer, PROMPTS[0])
    with pytest.raises(SplitRunError, match="no 'input_ids' input"):
        split_generate(tail, head, ids, 3)
    with pytest.raises(SplitRunError, match="input_ids must be integer"):
        split_generate(head, tail, ids[0], 3)
    with pytest.raises(SplitRunError, match="max_new_tokens"):
        split_generate(head, tail, ids, -1)
    with pytest.raises(SplitRunError, match="does not match input_ids"):
        split_generate(head, tail, ids, 3, attention_mask=np.ones((1, 1), np.int64))
