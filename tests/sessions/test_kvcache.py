"""The session KV cache: truncation, sizes, and its fp16/int8 wire form, checked on arrival and
continuing generation on a tiny GPT-2 decoder (ONNX) as the original cache does."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgefed.common.errors import PayloadError
from edgefed.common.serving.runtime import OnnxModel
from edgefed.common.sessions.kvcache import (
    KV_FORMATS,
    KvCache,
    KvWireFormat,
    kv_from_wire,
    kv_to_wire,
)
from tests.edge.tiny_artifacts import TinyArtifact, build_tiny_artifacts

PROMPT = "The cat sat on the warm mat by the window."
FOLLOW_UP = " She plays the violin every evening before dinner."
HEADS, HEAD_DIM = 2, 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifact:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return build_tiny_artifacts(tmp_path_factory.mktemp("tiny")).generate


@pytest.fixture(scope="module")
def model(tiny: TinyArtifact) -> OnnxModel:
    return OnnxModel.load(tiny.dir, tiny.manifest, providers=["CPUExecutionProvider"])


def random_cache(tokens: int = 5, *, seed: int = 0, dtype: Any = np.float32) -> KvCache:
    rng = np.random.default_rng(seed)
    tensors = {
        f"past_key_values.{layer}.{kind}": rng.normal(0, 2, (1, HEADS, tokens, HEAD_DIM)).astype(
            dtype
        )
        for layer in range(2)
        for kind in ("key", "value")
    }
    return KvCache(list(range(100, 100 + tokens)), tensors)


# --------------------------------------------------------------------------- in memory


def test_truncation_keeps_the_first_positions_and_leaves_the_original_alone() -> None:
    cache = random_cache(5)
    before = {k: v.copy() for k, v in cache.tensors.items()}
    cut = cache.truncated(3)
    assert cut.token_ids == [100, 101, 102]
    assert cut.length == 3
    for name, value in cut.tensors.items():
        assert value.shape == (1, HEADS, 3, HEAD_DIM)
        np.testing.assert_array_equal(value, before[name][:, :, :3, :])
    assert cache.length == 5
    for name, value in cache.tensors.items():
        np.testing.assert_array_equal(value, before[name])
    assert cache.truncated(0).length == 0
    with pytest.raises(ValueError, match="cannot truncate a cache of 5 tokens to 6"):
        cache.truncated(6)


def test_common_prefix_counts_the_leading_tokens_the_cache_covers() -> None:
    cache = random_cache(5)
    assert cache.common_prefix([100, 101, 102, 103, 104, 105, 106]) == 5
    assert cache.common_prefix([100, 101, 999, 103]) == 2
    assert cache.common_prefix([100, 101]) == 2
    assert cache.common_prefix([7]) == 0
    assert cache.common_prefix([]) == 0


def test_a_cache_whose_tensors_do_not_cover_its_tokens_is_refused() -> None:
    tensors = random_cache(5).tensors
    with pytest.raises(ValueError, match="covers 5 positions, but the cache has 4 token ids"):
        KvCache([1, 2, 3, 4], tensors)
    with pytest.raises(ValueError, match=r"must be \(1, heads, tokens, head_dim\)"):
        KvCache([1], {"past_key_values.0.key": np.zeros((2, 2, 1, 4), np.float32)})


def test_wire_sizes_are_what_kv_to_wire_makes() -> None:
    cache = random_cache(7)
    values = 4 * HEADS * 7 * HEAD_DIM
    assert cache.nbytes("fp16") == values * 2
    assert cache.nbytes("int8") == values + 4 * HEADS * 7 * 2  # one fp16 scale per head, position
    for fmt in KV_FORMATS:
        tensors, _ = kv_to_wire(cache, fmt)
        assert sum(t.nbytes for t in tensors.values()) == cache.nbytes(fmt)
    with pytest.raises(ValueError, match="kv format must be one of fp16, int8"):
        cache.nbytes("bf16")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- wire form


def test_fp16_wire_layout_and_metadata() -> None:
    cache = random_cache(4)
    tensors, meta = kv_to_wire(cache, "fp16")
    assert set(tensors) == {f"kv.{name}" for name in cache.tensors}
    assert all(
        t.dtype == np.float16 and t.shape == (1, HEADS, 4, HEAD_DIM) for t in tensors.values()
    )
    assert meta == {
        "format": "fp16",
        "dtype": "float32",
        "token_ids": [100, 101, 102, 103],
        "names": sorted(cache.tensors),
    }
    back = kv_from_wire(tensors, meta)
    assert back.token_ids == cache.token_ids
    for name, value in back.tensors.items():
        assert value.dtype == np.float32
        np.testing.assert_allclose(value, cache.tensors[name], rtol=1e-3, atol=1e-3)


def test_fp16_round_trip_of_a_float16_cache_is_exact_and_dtype_can_be_chosen() -> None:
    cache = random_cache(3, dtype=np.float16)
    tensors, meta = kv_to_wire(cache, "fp16")
    back = kv_from_wire(tensors, meta)
    for name, value in back.tensors.items():
        assert value.dtype == np.float16
        np.testing.assert_array_equal(value, cache.tensors[name])
    assert all(
        v.dtype == np.float32 for v in kv_from_wire(tensors, meta, dtype="float32").tensors.values()
    )


def test_int8_error_is_at_most_half_a_step_per_head_and_position() -> None:
    cache = random_cache(9, seed=3)
    tensors, meta = kv_to_wire(cache, "int8")
    for name in cache.tensors:
        q, scale = tensors[f"kv.{name}"], tensors[f"kv.{name}.scale"]
        assert q.dtype == np.int8
        assert int(np.abs(q.astype(np.int16)).max()) <= 127
        assert scale.dtype == np.float16
        assert scale.shape == (1, HEADS, 9)
    back = kv_from_wire(tensors, meta)
    for name, value in cache.tensors.items():
        step = tensors[f"kv.{name}.scale"].astype(np.float32)[..., None]
        peak = np.abs(value).max(axis=-1, keepdims=True)
        # Half a quantisation step, plus what the float16 rounding of the scale may clip.
        bound = step / 2 + peak * 2.0**-10
        assert (np.abs(back.tensors[name] - value) <= bound + 1e-7).all()


def test_all_zero_rows_travel_as_zeros_under_int8() -> None:
    cache = random_cache(3)
    cache.tensors["past_key_values.0.key"][:, :, 1, :] = 0.0
    back = kv_from_wire(*kv_to_wire(cache, "int8"))
    np.testing.assert_array_equal(back.tensors["past_key_values.0.key"][:, :, 1, :], 0.0)
    assert np.isfinite(back.tensors["past_key_values.0.key"]).all()


def test_a_cache_with_nan_or_beyond_float16_is_not_sent() -> None:
    for bad in (np.nan, np.inf, 1e6):
        cache = random_cache(2)
        cache.tensors["past_key_values.1.value"][0, 0, 0, 0] = bad
        for fmt in KV_FORMATS:
            with pytest.raises(ValueError, match=r"past_key_values\.1\.value"):
                kv_to_wire(cache, fmt)


def _wire(fmt: KvWireFormat = "int8") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    tensors, meta = kv_to_wire(random_cache(4), fmt)
    return dict(tensors), dict(meta)


def test_a_missing_tensor_is_named() -> None:
    tensors, meta = _wire()
    del tensors["kv.past_key_values.1.key"]
    with pytest.raises(PayloadError, match=r"missing tensor\(s\) kv.past_key_values.1.key$"):
        kv_from_wire(tensors, meta)
    tensors, meta = _wire()
    del tensors["kv.past_key_values.0.value.scale"]
    with pytest.raises(PayloadError, match=r"missing .*kv\.past_key_values\.0\.value\.scale"):
        kv_from_wire(tensors, meta)


def test_an_unexpected_tensor_is_named() -> None:
    tensors, meta = _wire("fp16")
    tensors["kv.past_key_values.9.key"] = tensors["kv.past_key_values.0.key"]
    with pytest.raises(PayloadError, match=r"unexpected tensor.*kv\.past_key_values\.9\.key"):
        kv_from_wire(tensors, meta)


def test_tensors_of_different_shapes_are_refused() -> None:
    tensors, meta = _wire()
    tensors["kv.past_key_values.1.value"] = tensors["kv.past_key_values.1.value"][:, :1]
    with pytest.raises(
        PayloadError, match=r"kv.past_key_values.1.value' has shape \[1, 1, 4, 16\]"
    ):
        kv_from_wire(tensors, meta)
    tensors, meta = _wire()
    tensors["kv.past_key_values.0.key"] = tensors["kv.past_key_values.0.key"][0]
    with pytest.raises(PayloadError, match=r"must be \(1, heads, tokens, head_dim\)"):
        kv_from_wire(tensors, meta)
    tensors, meta = _wire()
    tensors["kv.past_key_values.0.key.scale"] = tensors["kv.past_key_values.0.key.scale"][..., :2]
    with pytest.raises(PayloadError, match=r"scale 'kv.past_key_values.0.key.scale' has shape"):
        kv_from_wire(tensors, meta)


def test_a_token_count_that_does_not_match_the_positions_is_refused() -> None:
    tensors, meta = _wire()
    meta["token_ids"] = meta["token_ids"][:-1]
    with pytest.raises(PayloadError, match="covers 4 positions, the metadata lists 3 token ids"):
        kv_from_wire(tensors, meta)


@pytest.mark.parametrize(
    ("fmt", "name", "dtype", "message"),
    [
        (
            "fp16",
            "kv.past_key_values.0.key",
            np.float32,
            "has dtype float32, format fp16 sends float16",
        ),
        ("int8", "kv.past_key_values.0.key", np.int16, "has dtype int16, format int8 sends int8"),
        ("int8", "kv.past_key_values.0.key.scale", np.float32, "scale .* must be float16"),
    ],
)
def test_a_wrong_dtype_is_refused(fmt: KvWireFormat, name: str, dtype: Any, message: str) -> None:
    tensors, meta = _wire(fmt)
    tensors[name] = tensors[name].astype(dtype)
    with pytest.raises(PayloadError, match=message):
        kv_from_wire(tensors, meta)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"format": "bf16"}, "kv format must be one of fp16, int8, not 'bf16'"),
        ({"token_ids": [1, -2, 3, 4]}, "token_ids must be a list of non-negative integers"),
        ({"token_ids": "1234"}, "token_ids must be a list"),
        ({"names": []}, "kv names must be a non-empty list"),
        ({"dtype": "int64"}, "kv dtype must be one of"),
    ],
)
def test_bad_metadata_is_refused(edit: dict[str, Any], message: str) -> None:
    tensors, meta = _wire()
    meta.update(edit)
    with pytest.raises(PayloadError, match=message):
        kv_from_wire(tensors, meta)


def test_non_finite_values_or_negative_scales_are_refused() -> None:
    tensors, meta = _wire("fp16")
    tensors["kv.past_key_values.0.key"] = tensors["kv.past_key_values.0.key"].copy()
    tensors["kv.past_key_values.0.key"][0, 0, 0, 0] = np.inf
    with pytest.raises(PayloadError, match="NaN or infinity"):
        kv_from_wire(tensors, meta)
    tensors, meta = _wire("int8")
    tensors["kv.past_key_values.0.key.scale"] = -tensors["kv.past_key_values.0.key.scale"]
    with pytest.raises(PayloadError, match="negative or not finite"):
        kv_from_wire(tensors, meta)


# --------------------------------------------------------------------------- on the model


def _turns(model: OnnxModel) -> tuple[str, KvCache]:
    first = model.generate_turn(PROMPT, {"max_new_tokens": 6}, None)
    prompt = PROMPT + " " + first.text + FOLLOW_UP
    assert first.cache is not None
    return prompt, first.cache


def test_fp16_round_trip_continues_generation_with_the_same_tokens(model: OnnxModel) -> None:
    prompt, cache = _turns(model)
    tensors, meta = kv_to_wire(cache, "fp16")
    back = kv_from_wire(tensors, meta, dtype=model.kv_dtype)
    assert back.token_ids == cache.token_ids
    original = model.generate_turn(prompt, {"max_new_tokens": 16}, cache)
    shipped = model.generate_turn(prompt, {"max_new_tokens": 16}, back)
    assert shipped.prefill_tokens == original.prefill_tokens < len(model.tokenize_prompt(prompt))
    assert shipped.token_ids == original.token_ids
    assert shipped.text == original.text


def _next_logits(model: OnnxModel, cache: KvCache, token: int) -> np.ndarray:
    feeds: dict[str, np.ndarray] = {"input_ids": np.asarray([[token]], dtype=np.int64)}
    feeds.update(cache.tensors)
    logits: np.ndarray = model.run_tensors(feeds)["logits"][0, -1].astype(np.float64)
    return logits


def test_int8_round_trip_stays_close_and_continues_generation_alike(model: OnnxModel) -> None:
    prompt, cache = _turns(model)
    tensors, meta = kv_to_wire(cache, "int8")
    assert (
        sum(t.nbytes for t in tensors.values()) == model.kv_bytes_per_token("int8") * cache.length
    )
    back = kv_from_wire(tensors, meta, dtype=model.kv_dtype)
    peak = max(float(np.abs(v).max()) for v in cache.tensors.values())
    error = max(float(np.abs(back.tensors[k] - v).max()) for k, v in cache.tensors.items())
    # Half a quantisation step of the largest row (about 0.0073 for this model's cache).
    assert error <= peak / 127 / 2 * 1.01
    # The next step's logits move by under 1% of their spread and keep their argmax ...
    token = model.tokenize_prompt(prompt)[cache.length]
    exact, approx = _next_logits(model, cache, token), _next_logits(model, back, token)
    assert np.abs(exact - approx).max() < 0.01 * (exact.max() - exact.min())
    assert exact.argmax() == approx.argmax()
    # ... and greedy decoding of the next turn picks the same 16 tokens.
    original = model.generate_turn(prompt, {"max_new_tokens": 16}, cache)
    shipped = model.generate_turn(prompt, {"max_new_tokens": 16}, back)
    assert shipped.token_ids == original.token_ids


def test_a_cache_made_for_another_graph_is_refused_by_the_model(model: OnnxModel) -> None:
    _, cache = _turns(model)
    wrong = KvCache(cache.token_ids, {k: v[..., :8] for k, v in cache.tensors.items()})
    with pytest.raises(PayloadError, match=r"past_key_values.0.key has shape \[1, 2, \d+, 8\]"):
        model.generate_turn(PROMPT, {}, wrong)
    missing = KvCache(
        cache.token_ids, {"past_key_values.0.key": cache.tensors["past_key_values.0.key"]}
    )
    with pytest.raises(PayloadError, match="does not fit model tiny-generate v1"):
        model.generate_turn(PROMPT, {}, missing)
