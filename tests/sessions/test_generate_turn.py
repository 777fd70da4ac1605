"""Turn-by-turn generation on a tiny GPT-2 decoder (ONNX, KV cache): the same text as a cold
run, only the tokens past the cache prefilled, a diverging cache cut back to the common prefix."""

from __future__ import annotations

import numpy as np
import pytest

from edgefed.common.errors import PayloadError
from edgefed.common.serving.errors import InputTooLongError
from edgefed.common.serving.runtime import MAX_NEW_TOKENS_CAP, OnnxModel
from edgefed.common.sessions.kvcache import KvCache
from tests.edge.tiny_artifacts import SENTENCES, TinyArtifacts, build_tiny_artifacts

PROMPT = SENTENCES[0]
PARAMS = {"max_new_tokens": 8}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifacts:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return build_tiny_artifacts(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(artifacts: TinyArtifacts) -> OnnxModel:
    art = artifacts.generate
    return OnnxModel.load(art.dir, art.manifest, providers=["CPUExecutionProvider"])


def _copy(cache: KvCache) -> KvCache:
    return KvCache(list(cache.token_ids), {k: v.copy() for k, v in cache.tensors.items()})


def _same(a: KvCache, b: KvCache) -> None:
    assert a.token_ids == b.token_ids
    assert set(a.tensors) == set(b.tensors)
    for name, value in a.tensors.items():
        np.testing.assert_array_equal(value, b.tensors[name])


@pytest.mark.parametrize("prompt", SENTENCES[:4])
def test_a_cold_turn_says_what_run_texts_says(model: OnnxModel, prompt: str) -> None:
    (expected,) = model.run_texts([prompt], PARAMS)
    turn = model.generate_turn(prompt, PARAMS, None)
    assert turn.text == expected["text"]
    assert len(turn.token_ids) == expected["tokens"] == 8
    ids = model.tokenize_prompt(prompt)
    assert turn.prefill_tokens == len(ids)
    assert turn.cache is not None
    # The cache covers the prompt and every generated token but the last (never fed back).
    assert turn.cache.token_ids == ids + turn.token_ids[:-1]
    assert 0 < turn.ttft_ms <= turn.total_ms


def test_tokenize_prompt_gives_the_tokens_the_turn_runs(model: OnnxModel) -> None:
    ids = model.tokenize_prompt(PROMPT)
    assert ids[0] == 101  # [CLS]
    assert ids[-1] != 102  # the trailing [SEP] (end of sequence) is dropped for a prompt
    assert model.prefill(ids) is not None


def test_a_follow_up_prefills_only_what_is_new_and_says_what_a_cold_turn_says(
    model: OnnxModel,
) -> None:
    first = model.generate_turn(PROMPT, {"max_new_tokens": 1}, None)
    assert first.cache is not None
    assert first.cache.token_ids == model.tokenize_prompt(PROMPT)  # one token: none fed back
    kept = _copy(first.cache)
    follow_up = PROMPT + " " + SENTENCES[1]
    ids = model.tokenize_prompt(follow_up)
    assert ids[: first.cache.length] == first.cache.token_ids
    warm = model.generate_turn(follow_up, PARAMS, first.cache)
    cold = model.generate_turn(follow_up, PARAMS, None)
    assert (
        warm.prefill_tokens
        == len(ids) - first.cache.length
        == len(model.tokenize_prompt(SENTENCES[1])) - 1
    )
    assert cold.prefill_tokens == len(ids)
    assert warm.text == cold.text
    assert warm.token_ids == cold.token_ids
    assert warm.cache is not None
    assert cold.cache is not None
    assert warm.cache.token_ids == cold.cache.token_ids
    for name, value in warm.cache.tensors.items():
        np.testing.assert_allclose(value, cold.cache.tensors[name], rtol=1e-4, atol=1e-5)
    _same(first.cache, kept)  # the given cache is never modified


def test_a_second_turn_over_prompt_and_reply_reuses_both(model: OnnxModel) -> None:
    first = model.generate_turn(PROMPT, PARAMS, None)
    assert first.cache is not None
    second = PROMPT + " " + first.text + " " + SENTENCES[2]
    ids = model.tokenize_prompt(second)
    reused = first.cache.common_prefix(ids)
    # The whole first prompt is reused, and as much of the reply as re-tokenises alike.
    assert reused > len(model.tokenize_prompt(PROMPT))
    warm = model.generate_turn(second, PARAMS, first.cache)
    cold = model.generate_turn(second, PARAMS, None)
    assert warm.prefill_tokens == len(ids) - reused
    assert warm.text == cold.text


def test_a_diverging_cache_is_cut_back_to_the_common_prefix(model: OnnxModel) -> None:
    first = model.generate_turn(PROMPT + " It purred.", PARAMS, None)
    assert first.cache is not None
    kept = _copy(first.cache)
    other = PROMPT + " The dog barked loudly at the postman."
    ids = model.tokenize_prompt(other)
    common = len(model.tokenize_prompt(PROMPT))
    assert first.cache.common_prefix(ids) == common < first.cache.length
    warm = model.generate_turn(other, PARAMS, first.cache)
    cold = model.generate_turn(other, PARAMS, None)
    assert warm.prefill_tokens == len(ids) - common
    assert warm.text == cold.text
    assert warm.cache is not None
    assert warm.cache.token_ids[: len(ids)] == ids
    _same(first.cache, kept)


def test_a_cache_of_unrelated_tokens_is_ignored(model: OnnxModel) -> None:
    first = model.generate_turn(SENTENCES[5], PARAMS, None)
    assert first.cache is not None
    bogus = KvCache([7, *first.cache.token_ids[1:]], first.cache.tensors)
    warm = model.generate_turn(PROMPT, PARAMS, bogus)
    assert warm.prefill_tokens == len(model.tokenize_prompt(PROMPT))
    assert warm.text == model.run_texts([PROMPT], PARAMS)[0]["text"]


def test_the_same_prompt_again_runs_only_its_last_token(model: OnnxModel) -> None:
    cache = model.prefill(model.tokenize_prompt(PROMPT))
    assert cache is not None
    again = model.generate_turn(PROMPT, PARAMS, cache)
    assert again.prefill_tokens == 1  # its logits give the first new token
    assert again.text == model.run_texts([PROMPT], PARAMS)[0]["text"]


def test_prefill_reuses_a_cache_and_covers_exactly_the_tokens(model: OnnxModel) -> None:
    short = model.tokenize_prompt(PROMPT)
    long = model.tokenize_prompt(PROMPT + " " + SENTENCES[3])
    base = model.prefill(short)
    assert base is not None
    grown = model.prefill(long, base)
    cold = model.prefill(long)
    assert grown is not None
    assert cold is not None
    assert grown.token_ids == cold.token_ids == long
    for name, value in grown.tensors.items():
        assert value.shape == (1, 2, len(long), 16)
        np.testing.assert_allclose(value, cold.tensors[name], rtol=1e-4, atol=1e-5)


def test_prefill_refuses_what_it_cannot_run(model: OnnxModel) -> None:
    with pytest.raises(PayloadError, match="nothing to prefill"):
        model.prefill([])
    with pytest.raises(PayloadError, match="token id 999999 is outside the vocabulary"):
        model.prefill([101, 999999])
    with pytest.raises(PayloadError, match="token id -1 is outside"):
        model.prefill([-1])
    with pytest.raises(InputTooLongError, match="129 tokens to prefill"):
        model.prefill([101] * (model.max_length + 1))


def test_a_turn_refuses_what_run_texts_refuses(model: OnnxModel) -> None:
    with pytest.raises(InputTooLongError, match="exceeds the 128 tokens"):
        model.generate_turn("word " * 100, {"max_new_tokens": 40}, None)
    with pytest.raises(InputTooLongError, match="max_new_tokens"):
        model.generate_turn(PROMPT, {"max_new_tokens": MAX_NEW_TOKENS_CAP + 1}, None)
    with pytest.raises(PayloadError, match="max_new_tokens must be a positive integer"):
        model.generate_turn(PROMPT, {"max_new_tokens": 0}, None)
    with pytest.raises(InputTooLongError, match=r"at most 128"):
        model.tokenize_prompt("word " * 200)


def test_models_that_do_not_generate_refuse_turns(artifacts: TinyArtifacts) -> None:
    art = artifacts.classify
    classify = OnnxModel.load(art.dir, art.manifest, providers=["CPUExecutionProvider"])
    with pytest.raises(PayloadError, match="does not generate text"):
        classify.generate_turn(PROMPT, {}, None)
    with pytest.raises(PayloadError, match="does not generate text"):
        classify.tokenize_prompt(PROMPT)
    assert classify.kv_bytes_per_token("fp16") == 0


def test_kv_bytes_per_token_follows_the_graph(model: OnnxModel) -> None:
    # 2 layers x (key, value) x 2 heads x 16 dims
    assert model.kv_bytes_per_token("fp16") == 2 * 2 * 2 * 16 * 2
    assert model.kv_bytes_per_token("int8") == 2 * 2 * 2 * (16 + 2)
    cache = model.prefill(model.tokenize_prompt(PROMPT))
    assert cache is not None
    for fmt in ("fp16", "int8"):
        assert cache.nbytes(fmt) == model.kv_bytes_per_token(fmt) * cache.length
    assert model.kv_dtype == np.float32


def test_a_templated_prompt_gets_no_second_start_token(model: OnnxModel) -> None:
    """A chat template writes the model's start token itself; the tokenizer must not add
    another (SmolLM2 otherwise sees ``<|im_start|><|im_start|>``)."""
    prompt = "[CLS] user: the belt slips"
    plain = model.tokenize_prompt(prompt)
    templated = model.tokenize_prompt(prompt, special_tokens=False)
    assert plain[0] == plain[1]  # what the default does to a prompt that has its own
    assert templated == plain[1:]
    turn = model.generate_turn(prompt, {"max_new_tokens": 3}, None, special_tokens=False)
    cold = model.generate_turn(prompt, {"max_new_tokens": 3}, None)
    assert turn.prefill_tokens == cold.prefill_tokens - 1
