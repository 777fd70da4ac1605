"""Head and tail become two signed artifacts that record role and split point; int8 heads and
tails (dynamic, per target) still reproduce the full model closely."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgefed.cloud.split import (
    SplitArtifacts,
    SplitPair,
    SplitSigningError,
    export_split,
    sign_split,
    split_artifact_name,
)
from edgefed.common.artifact import SigningKey, generate_signing_key, verify
from tests.cloud.split.tiny_split import build

TEXTS = ["Hi there.", "Fresh bread smells wonderful early in the morning, every single day."]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_signing_key()


@pytest.fixture(scope="module")
def split_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, SplitPair]:
    root = tmp_path_factory.mktemp("split-sign")
    model, tok = build("bert", root / "model")
    pair = export_split(root / "model", root / "k2", 2, task="feature-extraction")
    return model, tok, pair


def _pooled(head_dir: Path, tail_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    head = ort.InferenceSession(str(head_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    tail = ort.InferenceSession(str(tail_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (hidden,) = head.run(None, {i.name: feeds[i.name] for i in head.get_inputs()})
    mask = feeds["attention_mask"]
    (last,) = tail.run(None, {"hidden_states": hidden, "attention_mask": mask})
    m = mask[:, :, None].astype(np.float64)
    return np.asarray((last * m).sum(axis=1) / m.sum(axis=1))


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


@pytest.mark.parametrize("target", ["fp32", "x86-avx2"])
def test_signed_head_and_tail_record_role_and_split_point(
    split_bert: tuple[object, object, SplitPair], key: SigningKey, tmp_path: Path, target: str
) -> None:
    model, tok, pair = split_bert
    arts = sign_split(pair, "tiny-bert", 3, key, target, store=tmp_path)
    assert isinstance(arts, SplitArtifacts)
    for role, folder in (("head", arts.head_dir), ("tail", arts.tail_dir)):
        manifest = verify(folder, key.verify_key)
        assert manifest.name == split_artifact_name("tiny-bert", 2, role) == f"tiny-bert.k2.{role}"
        assert manifest.split is not None
        assert (manifest.split.role, manifest.split.split_point) == (role, 2)
        assert manifest.version == 3
        assert manifest.target == target
        assert manifest.task == "feature-extraction"
        assert manifest.quantization is not None
        expected_scheme = "none" if target == "fp32" else "dynamic-int8"
        assert manifest.quantization.scheme == expected_scheme
    assert [s.name for s in arts.head.outputs] == ["hidden_states"]
    assert [s.name for s in arts.tail.inputs] == ["hidden_states", "attention_mask"]
    assert "tokenizer.json" in {f.path for f in arts.head.files}

    enc = tok(TEXTS, padding=True, return_tensors="np")  # type: ignore[operator]
    feeds = {n: np.asarray(v, np.int64) for n, v in enc.items()}
    with torch.no_grad():
        hidden = model(**{n: torch.as_tensor(v) for n, v in feeds.items()}).last_hidden_state  # type: ignore[operator]
    m = feeds["attention_mask"][:, :, None]
    full = (hidden.numpy() * m).sum(axis=1) / m.sum(axis=1)
    cos = _cosines(_pooled(arts.head_dir, arts.tail_dir, feeds), full)
    assert cos.min() > (0.99999 if target == "fp32" else 0.99), cos


def test_versions_only_go_up_and_static_int8_is_refused(
    split_bert: tuple[object, object, SplitPair], key: SigningKey, tmp_path: Path
) -> None:
    _, _, pair = split_bert
    sign_split(pair, "tiny-bert", 1, key, "fp32", store=tmp_path)
    with pytest.raises(SplitSigningError, match="already published"):
        sign_split(pair, "tiny-bert", 1, key, "fp32", store=tmp_path)
    with pytest.raises(SplitSigningError, match="static int8"):
        sign_split(pair, "tiny-bert", 2, key, "static-int8", store=tmp_path)
