"""Runners: torch and ONNX Runtime give the same float32 outputs for every task; the ONNX runner
feeds exactly the inputs a graph declares and refuses files that are not models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgefed.cloud.compress.errors import ExportError
from edgefed.cloud.compress.runtime import (
    OnnxRunner,
    Runner,
    TorchRunner,
    decoder_position_ids,
    mean_pool,
    tokenize,
)

from .tiny_hf import SENTENCES, Exported, build_and_export, tokenizer

KINDS = ("bert", "cls", "gpt2", "llama")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    root = tmp_path_factory.mktemp("runtime")
    return {kind: build_and_export(kind, root) for kind in KINDS}


def test_tokenize_pads_to_longest_or_max_and_truncates() -> None:
    tok = tokenizer()
    ids, mask = tokenize(tok, ["short", "a somewhat longer sentence than the first"], max_length=64)
    assert ids.dtype == np.int64
    assert mask.dtype == np.int64
    assert ids.shape == mask.shape
    assert ids.shape[1] == int(mask[1].sum())  # longest row has no padding
    assert mask[0].sum() < mask[1].sum()

    ids, mask = tokenize(tok, ["short"], max_length=16, pad_to_max=True)
    assert ids.shape == (1, 16)
    ids, mask = tokenize(tok, [" ".join(["word"] * 100)], max_length=8)
    assert ids.shape == (1, 8)
    assert mask.all()


def test_tokenize_refuses_a_bare_string_and_nothing() -> None:
    with pytest.raises(TypeError):
        tokenize(tokenizer(), "not a list", max_length=8)
    with pytest.raises(ValueError, match="no texts"):
        tokenize(tokenizer(), [], max_length=8)


def test_mean_pool_ignores_padding() -> None:
    hidden = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]], dtype=np.int64)
    np.testing.assert_allclose(mean_pool(hidden, mask), [[2.0, 3.0]])
    assert mean_pool(hidden, mask).dtype == np.float32


def test_decoder_position_ids_count_real_tokens() -> None:
    mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]])
    np.testing.assert_array_equal(decoder_position_ids(mask), [[0, 1, 2, 1], [1, 0, 1, 2]])


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_runner_matches_torch_runner(exported: dict[str, Exported], kind: str) -> None:
    e = exported[kind]
    ids, mask = tokenize(e.tokenizer, SENTENCES, max_length=32)
    torch_runner = TorchRunner(e.model, e.task)
    onnx_runner = OnnxRunner(e.onnx_dir, e.task)
    assert isinstance(torch_runner, Runner)
    assert isinstance(onnx_runner, Runner)
    want = torch_runner.outputs(ids, mask)
    got = onnx_runner.outputs(ids, mask)
    assert got.dtype == np.float32
    assert want.dtype == np.float32
    n = len(SENTENCES)
    if e.task == "feature-extraction":
        assert got.shape == (n, 32)
    elif e.task == "text-classification":
        assert got.shape == (n, 2)
    else:
        assert got.shape == (n, ids.shape[1], e.tokenizer.vocab_size)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_onnx_runner_feeds_only_declared_inputs(exported: dict[str, Exported]) -> None:
    bert = OnnxRunner(exported["bert"].onnx_dir, "feature-extraction")
    assert set(bert.input_names) == {"input_ids", "attention_mask", "token_type_ids"}
    gpt2 = OnnxRunner(exported["gpt2"].onnx_dir, "text-generation")
    assert "token_type_ids" not in gpt2.input_names
    ids, mask = tokenize(exported["gpt2"].tokenizer, SENTENCES[:3], max_length=16)
    feeds = gpt2.feeds(ids, mask)
    assert set(feeds) == set(gpt2.input_names)
    past = [name for name in feeds if name.startswith("past_key_values")]
    assert len(past) == 4  # 2 layers x key/value
    for name in past:
        assert feeds[name].shape == (3, 2, 0, 16)  # (batch, heads, 0, head_dim)
        assert feeds[name].dtype == np.float32
    np.testing.assert_array_equal(feeds["position_ids"], decoder_position_ids(mask))
    # Llama with grouped-query attention: one KV head.
    llama = OnnxRunner(exported["llama"].onnx_dir, "text-generation")
    assert llama.feeds(ids, mask)["past_key_values.0.key"].shape == (3, 1, 0, 16)


def test_onnx_runner_accepts_a_file_and_reports_providers(exported: dict[str, Exported]) -> None:
    runner = OnnxRunner(
        exported["cls"].onnx_dir / "model.onnx", "text-classification", intra_op_threads=1
    )
    assert runner.providers == ["CPUExecutionProvider"]


def test_onnx_runner_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no model\.onnx"):
        OnnxRunner(tmp_path, "feature-extraction")
    with pytest.raises(ExportError, match="does not exist"):
        OnnxRunner(tmp_path / "nope.onnx", "feature-extraction")


def test_onnx_runner_garbage_file(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"this is not a protobuf \x00\x01\x02" * 10)
    with pytest.raises(ExportError, match="cannot load"):
        OnnxRunner(tmp_path, "feature-extraction")


def test_onnx_runner_refuses_a_graph_that_is_not_a_text_model(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    with pytest.raises(ExportError, match="input_ids"):
        OnnxRunner(tmp_path, "feature-extraction")


def test_onnx_runner_refuses_a_model_without_the_task_output(exported: dict[str, Exported]) -> None:
    with pytest.raises(ExportError, match="logits"):
        OnnxRunner(exported["bert"].onnx_dir, "text-classification")


def test_torch_runner_embeds_with_a_model_that_has_a_head(exported: dict[str, Exported]) -> None:
    """A classifier asked for embeddings pools its encoder's last hidden layer."""
    e = exported["cls"]
    ids, mask = tokenize(e.tokenizer, SENTENCES[:4], max_length=32)
    out = TorchRunner(e.model, "feature-extraction").outputs(ids, mask)
    assert out.shape == (4, 32)
    assert out.dtype == np.float32
