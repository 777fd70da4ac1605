"""The real pretrained MiniLM (6 layers) split at k=3 reproduces its pooled embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from transformers import AutoModel, AutoTokenizer

from edgefed.cloud.split import export_split, inspect_model
from tests.compress.tiny_hf import SENTENCES, minilm_dir


def test_minilm_split_matches_the_full_model(tmp_path: Path) -> None:
    src = minilm_dir()
    shape = inspect_model(src)
    assert (shape.num_layers, shape.hidden_size) == (6, 384)
    pair = export_split(src, tmp_path, 3, task="feature-extraction")
    tok = AutoTokenizer.from_pretrained(src)
    enc = tok(SENTENCES[:4], padding=True, return_tensors="np")
    feeds = {n: np.asarray(v, np.int64) for n, v in enc.items()}
    head = ort.InferenceSession(
        str(pair.head_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    tail = ort.InferenceSession(
        str(pair.tail_dir / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (hidden,) = head.run(None, feeds)
    (last,) = tail.run(None, {"hidden_states": hidden, "attention_mask": feeds["attention_mask"]})
    model = AutoModel.from_pretrained(src).eval()
    with torch.no_grad():
        ref = model(**{n: torch.as_tensor(v) for n, v in feeds.items()}).last_hidden_state.numpy()
    m = feeds["attention_mask"][:, :, None].astype(np.float64)
    got, want = (last * m).sum(1) / m.sum(1), (ref * m).sum(1) / m.sum(1)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() > 0.9999, cos
