"""Encoder split: head (embeddings + layers[:k]) → tail (layers[k:] + task head) reproduces the
full model, in torch and in its full ONNX export, for several k and a padded batch."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgefed.cloud.compress.export import export_onnx
from edgefed.cloud.split import SplitPair, candidate_points, export_split
from edgefed.cloud.split.partition import SPLIT_CONFIG_KEY
from tests.cloud.split.tiny_split import LAYERS, build

TEXTS = [
    "Hi.",
    "The cat sat on the warm mat by the window.",
    "Quantum computers use qubits instead of classical bits, which changes everything.",
]
TASKS = {"bert": "feature-extraction", "cls": "text-classification"}
SPLITS = {"bert": (1, 2, 3), "cls": (1, 3)}


@dataclass
class Encoder:
    kind: str
    task: str
    model: Any
    tokenizer: Any
    full: ort.InferenceSession
    pairs: dict[int, SplitPair]


def _session(folder: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=["bert", "cls"])
def encoder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    kind: str = request.param
    root = tmp_path_factory.mktemp(f"split-{kind}")
    model, tok = build(kind, root / "model")
    task = TASKS[kind]
    full_dir = export_onnx(root / "model", root / "full", task)  # type: ignore[arg-type]
    pairs = {k: export_split(root / "model", root / f"k{k}", k, task=task) for k in SPLITS[kind]}
    return Encoder(kind, task, model, tok, _session(full_dir), pairs)


def _batch(tok: Any) -> dict[str, np.ndarray]:
    enc = tok(TEXTS, padding=True, return_tensors="np")
    return {name: np.asarray(value, dtype=np.int64) for name, value in enc.items()}


def _split_output(pair: SplitPair, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    head, tail = _session(pair.head_dir), _session(pair.tail_dir)
    head_feeds = {i.name: feeds[i.name] for i in head.get_inputs()}
    (hidden,) = head.run(["hidden_states"], head_feeds)
    (out,) = tail.run(None, {"hidden_states": hidden, "attention_mask": feeds["attention_mask"]})
    return hidden, out


def test_candidate_points_cover_all_cloud_every_split_and_all_edge() -> None:
    assert candidate_points(LAYERS) == (0, 1, 2, 3, 4)
    assert candidate_points(1) == (0, 1)


def test_head_then_tail_equals_the_full_model_on_a_padded_batch(encoder: Encoder) -> None:
    feeds = _batch(encoder.tokenizer)
    assert (feeds["attention_mask"] == 0).any(), "the batch must contain padding"
    for k, pair in encoder.pairs.items():
        _check_pair(encoder, k, pair, feeds)


def _check_pair(encoder: Encoder, k: int, pair: SplitPair, feeds: dict[str, np.ndarray]) -> None:
    hidden, out = _split_output(pair, feeds)
    assert hidden.shape == (*feeds["input_ids"].shape, 32)
    with torch.no_grad():
        ref = encoder.model(**{n: torch.as_tensor(v) for n, v in feeds.items()})
    expected = ref.logits if encoder.task == "text-classification" else ref.last_hidden_state
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-4, rtol=0, err_msg=f"k={k} torch")
    (full,) = encoder.full.run(None, feeds)
    assert full.shape == out.shape
    np.testing.assert_allclose(out, full, atol=1e-4, rtol=0, err_msg=f"k={k} full ONNX")


def test_padding_changes_nothing_for_the_real_tokens(encoder: Encoder) -> None:
    """The tail honours the attention mask: a text alone equals the same text padded in a batch."""
    pair = encoder.pairs[1]
    batch = _batch(encoder.tokenizer)
    alone = {
        n: np.asarray(v, dtype=np.int64)
        for n, v in encoder.tokenizer([TEXTS[0]], return_tensors="np").items()
    }
    _, padded_out = _split_output(pair, batch)
    _, alone_out = _split_output(pair, alone)
    real = alone["input_ids"].shape[1]
    got = padded_out[0, :real] if encoder.task == "feature-extraction" else padded_out[0]
    np.testing.assert_allclose(got, alone_out[0], atol=1e-4, rtol=0)


def test_each_folder_is_a_complete_side_with_its_split_config(encoder: Encoder) -> None:
    pair = encoder.pairs[3]
    assert (pair.k, pair.num_layers, pair.hidden_size) == (3, LAYERS, 32)
    head_files = {p.name for p in pair.head_dir.iterdir()}
    tail_files = {p.name for p in pair.tail_dir.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "vocab.txt"} <= head_files
    assert "tokenizer.json" not in tail_files  # the head side tokenizes
    assert {"model.onnx", "config.json"} <= tail_files
    for role, folder in (("head", pair.head_dir), ("tail", pair.tail_dir)):
        split = json.loads((folder / "config.json").read_text())[SPLIT_CONFIG_KEY]
        assert split["role"] == role
        assert split["split_point"] == 3
        assert split["num_layers"] == LAYERS
    head_inputs = [i.name for i in _session(pair.head_dir).get_inputs()]
    assert head_inputs == ["input_ids", "attention_mask", "token_type_ids"]
    tail_outputs = [o.name for o in _session(pair.tail_dir).get_outputs()]
    assert tail_outputs == ["logits" if encoder.kind == "cls" else "last_hidden_state"]
