"""The agent's ONNX Runtime adapter on tiny exported models, checked against torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgefed.cloud.compress.runtime import OnnxRunner, TorchRunner, tokenize
from edgefed.common.errors import ErrorCode, PayloadError
from edgefed.common.serving.errors import InputTooLongError, ModelLoadError
from edgefed.common.serving.runtime import (
    CPU,
    CUDA,
    MAX_NEW_TOKENS_CAP,
    TENSORRT,
    OnnxModel,
    provider_options,
)

from .tiny_artifacts import LABELS, SENTENCES, TinyArtifact, TinyArtifacts, resign

ALL_PROVIDERS = [TENSORRT, CUDA, CPU]


def load(art: TinyArtifact) -> OnnxModel:
    return OnnxModel.load(art.dir, art.manifest, providers=ALL_PROVIDERS)


@pytest.fixture(scope="module")
def embed(tiny_artifacts: TinyArtifacts) -> OnnxModel:
    return load(tiny_artifacts.embed)


@pytest.fixture(scope="module")
def classify(tiny_artifacts: TinyArtifacts) -> OnnxModel:
    return load(tiny_artifacts.classify)


@pytest.fixture(scope="module")
def generate(tiny_artifacts: TinyArtifacts) -> OnnxModel:
    return load(tiny_artifacts.generate)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


# --------------------------------------------------------------------------- loading


def test_attributes_come_from_the_manifest_and_configs(
    embed: OnnxModel, classify: OnnxModel, generate: OnnxModel
) -> None:
    assert (embed.name, embed.version, embed.task, embed.role) == (
        "tiny-embed",
        1,
        "feature-extraction",
        "full",
    )
    assert embed.max_length == 128  # tokenizer.json truncation and max_position_embeddings
    assert classify.labels == LABELS
    assert generate.task == "text-generation"
    assert "position_ids" in generate.input_specs
    assert any(name.startswith("past_key_values") for name in generate.input_specs)


def test_providers_fall_back_to_cpu_here(embed: OnnxModel) -> None:
    assert embed.providers == [CPU]


def test_provider_options_keep_the_preference_order_and_end_with_cpu(tmp_path: Path) -> None:
    chosen = provider_options(
        [TENSORRT, "MadeUpProvider", CUDA, CPU],
        [CPU, CUDA, TENSORRT],
        cache_dir=tmp_path,
        fp16=True,
    )
    assert [name for name, _ in chosen] == [TENSORRT, CUDA, CPU]
    trt = chosen[0][1]
    assert trt["trt_engine_cache_enable"] == "True"
    assert Path(trt["trt_engine_cache_path"]).is_relative_to(tmp_path)
    assert trt["trt_fp16_enable"] == "True"
    assert chosen[1][1] == {}
    assert provider_options([CUDA], [CPU]) == [(CPU, {})]
    assert "trt_fp16_enable" not in provider_options([TENSORRT], [TENSORRT, CPU])[0][1]


def test_a_missing_tokenizer_is_a_load_error(tiny_artifacts: TinyArtifacts, tmp_path: Path) -> None:
    manifest = resign(
        tiny_artifacts.embed.dir,
        tmp_path / "a",
        key=tiny_artifacts.key,
        version=2,
        drop=("tokenizer.json",),
    )
    with pytest.raises(ModelLoadError, match=r"no tokenizer\.json"):
        OnnxModel.load(tmp_path / "a", manifest, providers=[CPU])


def test_a_missing_or_broken_graph_is_a_load_error(
    tiny_artifacts: TinyArtifacts, tmp_path: Path
) -> None:
    manifest = tiny_artifacts.embed.manifest
    with pytest.raises(ModelLoadError, match=r"no model\.onnx"):
        OnnxModel.load(tmp_path, manifest, providers=[CPU])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"not a graph")
    (broken / "tokenizer.json").write_bytes(
        (tiny_artifacts.embed.dir / "tokenizer.json").read_bytes()
    )
    with pytest.raises(ModelLoadError, match="ONNX Runtime refused"):
        OnnxModel.load(broken, manifest, providers=[CPU])


# --------------------------------------------------------------------------- texts


def test_embeddings_match_torch_mean_pooling(
    tiny_artifacts: TinyArtifacts, embed: OnnxModel
) -> None:
    art = tiny_artifacts.embed
    ids, mask = tokenize(tiny_artifacts.tokenizer, SENTENCES, max_length=128)
    torch_pooled = TorchRunner(art.model, "feature-extraction").outputs(ids, mask)
    onnx_pooled = OnnxRunner(art.dir, "feature-extraction").outputs(ids, mask)

    out = embed.run_texts(SENTENCES, {})
    ours = np.asarray([o["embedding"] for o in out])
    assert ours.shape == (len(SENTENCES), 32)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    assert cosines(ours, torch_pooled).min() > 0.9999
    assert cosines(ours, onnx_pooled).min() > 0.99999

    raw = np.asarray([o["embedding"] for o in embed.run_texts(SENTENCES, {"normalize": False})])
    np.testing.assert_allclose(raw, onnx_pooled, atol=1e-5)


def test_padding_in_a_batch_does_not_change_a_text_s_result(embed: OnnxModel) -> None:
    together = embed.run_texts(SENTENCES[:4], {})
    alone = [embed.run_texts([text], {})[0] for text in SENTENCES[:4]]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-5)


def test_run_text_batch_splits_outputs_back_per_request(embed: OnnxModel) -> None:
    batch = [(SENTENCES[:2], {}), (SENTENCES[2:3], {"normalize": False}), (SENTENCES[3:6], {})]
    results = embed.run_text_batch(batch)
    assert [len(r) for r in results] == [2, 1, 3]
    assert results[0] == embed.run_texts(SENTENCES[:2], {})
    assert np.linalg.norm(results[1][0]["embedding"]) != pytest.approx(1.0)


def test_classification_gives_a_label_and_scores_that_sum_to_one(
    tiny_artifacts: TinyArtifacts, classify: OnnxModel
) -> None:
    out = classify.run_texts(SENTENCES[:3], {})
    ids, mask = tokenize(tiny_artifacts.tokenizer, SENTENCES[:3], max_length=128)
    with torch.no_grad():
        logits = tiny_artifacts.classify.model(
            input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)
        ).logits
    probs = torch.softmax(logits, dim=-1).numpy()
    for row, expected in zip(out, probs, strict=True):
        assert set(row["scores"]) == set(LABELS.values())
        assert sum(row["scores"].values()) == pytest.approx(1.0, abs=1e-9)
        assert row["label"] == LABELS[int(expected.argmax())]
        np.testing.assert_allclose(
            [row["scores"][LABELS[i]] for i in range(3)], expected, atol=1e-5
        )


def _prompt_ids(tiny_artifacts: TinyArtifacts, text: str) -> list[int]:
    ids = tiny_artifacts.tokenizer(text)["input_ids"]
    assert ids[-1] == tiny_artifacts.tokenizer.sep_token_id
    return list(ids[:-1])  # the agent drops the trailing end-of-sequence token of a prompt


def test_greedy_generation_matches_torch_and_stops_at_max_new_tokens(
    tiny_artifacts: TinyArtifacts, generate: OnnxModel
) -> None:
    prompt = SENTENCES[0]
    (out,) = generate.run_texts([prompt], {"max_new_tokens": 6})
    assert out["tokens"] == 6
    ids = torch.as_tensor([_prompt_ids(tiny_artifacts, prompt)])
    with torch.no_grad():
        full = tiny_artifacts.generate.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )
    new = full[0, ids.shape[1] :].tolist()
    assert len(new) == 6
    expected = tiny_artifacts.tokenizer.backend_tokenizer.decode(new, skip_special_tokens=True)
    assert out["text"] == expected
    (short,) = generate.run_texts([prompt], {"max_new_tokens": 2})
    assert short["tokens"] == 2
    (default,) = generate.run_texts([prompt], {})
    assert default["tokens"] == 32


def test_generation_stops_at_the_end_of_sequence_token(
    tiny_artifacts: TinyArtifacts, tmp_path: Path
) -> None:
    prompt = SENTENCES[1]
    ids = torch.as_tensor([_prompt_ids(tiny_artifacts, prompt)])
    with torch.no_grad():
        logits = tiny_artifacts.generate.model(input_ids=ids).logits
    first, second = logits[0, -1].topk(2).indices.tolist()
    sep = tiny_artifacts.tokenizer.sep_token_id
    # Make the model's first greedy token an end-of-sequence token: nothing is generated.
    manifest = resign(
        tiny_artifacts.generate.dir,
        tmp_path / "eos",
        key=tiny_artifacts.key,
        version=2,
        edit_json={"generation_config.json": {"eos_token_id": [sep, first]}},
    )
    model = OnnxModel.load(tmp_path / "eos", manifest, providers=[CPU])
    (out,) = model.run_texts([prompt], {"max_new_tokens": 5})
    assert out == {"text": "", "tokens": 0}
    assert second != first


def test_a_text_longer_than_the_model_takes_is_refused_not_truncated(
    embed: OnnxModel, generate: OnnxModel
) -> None:
    long_text = "word " * 200
    with pytest.raises(InputTooLongError, match=r"text 1 is 202 tokens long.*at most 128") as err:
        embed.run_texts(["short", long_text], {})
    assert err.value.code is ErrorCode.MALFORMED
    with pytest.raises(InputTooLongError, match="exceeds the 128 tokens"):
        generate.run_texts(["word " * 100], {"max_new_tokens": 40})
    with pytest.raises(InputTooLongError, match=str(MAX_NEW_TOKENS_CAP)):
        generate.run_texts(["hello"], {"max_new_tokens": MAX_NEW_TOKENS_CAP + 1})


@pytest.mark.parametrize(
    ("texts", "parameters", "match"),
    [
        ([], {}, "texts is empty"),
        (["hi"], {"max_new_tokens": 0}, "max_new_tokens"),
        (["hi"], {"max_new_tokens": "5"}, "max_new_tokens"),
    ],
)
def test_bad_generation_parameters_are_payload_errors(
    generate: OnnxModel, texts: list[str], parameters: dict[str, object], match: str
) -> None:
    with pytest.raises(PayloadError, match=match):
        generate.run_texts(texts, parameters)


def test_warm_up_runs_every_kind(
    embed: OnnxModel, classify: OnnxModel, generate: OnnxModel
) -> None:
    for model in (embed, classify, generate):
        model.warm_up()


# --------------------------------------------------------------------------- tensors


def test_run_tensors_feeds_the_graph_and_fills_what_it_can(
    tiny_artifacts: TinyArtifacts, embed: OnnxModel, generate: OnnxModel
) -> None:
    ids, mask = tokenize(tiny_artifacts.tokenizer, SENTENCES[:2], max_length=128)
    out = embed.run_tensors({"input_ids": ids, "attention_mask": mask})  # no token_type_ids
    hidden = out["last_hidden_state"]
    assert hidden.shape == (*ids.shape, 32)
    onnx_pooled = OnnxRunner(tiny_artifacts.embed.dir, "feature-extraction").outputs(ids, mask)
    pooled = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(pooled, onnx_pooled, atol=1e-5)
    # int32 ids convert safely
    again = embed.run_tensors({"input_ids": ids.astype(np.int32), "attention_mask": mask})
    np.testing.assert_allclose(again["last_hidden_state"], hidden, atol=1e-6)

    dec = generate.run_tensors({"input_ids": ids[:1, :5], "attention_mask": mask[:1, :5]})
    assert dec["logits"].shape[:2] == (1, 5)
    assert dec["present.0.key"].shape == (1, 2, 5, 16)


def test_run_tensors_continues_a_decoder_from_its_cache(
    tiny_artifacts: TinyArtifacts, generate: OnnxModel
) -> None:
    ids = np.asarray([_prompt_ids(tiny_artifacts, SENTENCES[2])], dtype=np.int64)
    full = generate.run_tensors({"input_ids": ids})
    first = generate.run_tensors({"input_ids": ids[:, :-1]})
    past = {
        name.replace("present", "past_key_values"): value
        for name, value in first.items()
        if name.startswith("present")
    }
    # The mask (cache + new token) and the position ids are derived from the cache's length.
    step = generate.run_tensors({"input_ids": ids[:, -1:], **past})
    np.testing.assert_allclose(step["logits"][0, -1], full["logits"][0, -1], atol=1e-4)


@pytest.mark.parametrize(
    ("tensors", "error", "match"),
    [
        ({"input_ids": np.zeros((1, 4), np.float32)}, PayloadError, "cannot be fed from float32"),
        ({"input_ids": np.zeros((4,), np.int64)}, PayloadError, "must have 2 dimensions"),
        ({"pixels": np.zeros((1, 4), np.int64)}, PayloadError, "has no input 'pixels'"),
        ({"attention_mask": np.ones((1, 4), np.int64)}, PayloadError, "missing input input_ids"),
        ({"input_ids": np.zeros((1, 300), np.int64)}, InputTooLongError, "300 tokens long"),
    ],
)
def test_malformed_tensors_are_refused_with_a_clear_error(
    embed: OnnxModel, tensors: dict[str, np.ndarray], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        embed.run_tensors(tensors)
