"""The tensor wire format: safetensors bytes, fp16 / int8 compression of floating tensors."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors.numpy

from edgefed.common.errors import PayloadError, TensorFormatError
from edgefed.common.tensors import (
    FORMAT_KEY,
    SCALE_NAME_PREFIX,
    TENSOR_KEY_PREFIX,
    Compression,
    DecodedTensors,
    decode_tensors,
    encode_tensors,
    wire_size,
)

Array = npt.NDArray[Any]
SEEDS = [0, 1, 2, 3, 4]
FLOAT_DTYPES: list[Any] = [np.float16, np.float32, np.float64]
EXACT_DTYPES: list[Any] = [
    np.bool_,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.int32,
    np.uint32,
    np.int64,
]


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> Array:
    dt = np.dtype(dtype)
    if dt == np.bool_:
        return np.asarray(rng.integers(0, 2, size=shape), dtype=bool)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return np.asarray(rng.integers(info.min, info.max, size=shape, dtype=dt, endpoint=True))
    return np.asarray(rng.standard_normal(shape) * rng.uniform(0.01, 10), dtype=dt)


def _activation(seed: int = 0) -> Array:
    return np.random.default_rng(seed).standard_normal((1, 128, 384)).astype(np.float32)


def _raw(data: bytes) -> tuple[dict[str, Array], dict[str, str]]:
    """What a plain safetensors reader sees: stored tensors and the whole metadata."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return dict(safetensors.numpy.load(data)), dict(header.get("__metadata__", {}))


def _craft(tensors: dict[str, Array], metadata: dict[str, str]) -> bytes:
    return safetensors.numpy.save(tensors, metadata=metadata)


def _int8_payload() -> tuple[dict[str, Array], dict[str, str]]:
    x = np.random.default_rng(7).standard_normal((2, 3, 8)).astype(np.float32)
    return _raw(encode_tensors({"hidden": x}, compression=Compression.INT8))


# --------------------------------------------------------------------------- exact round trips


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + EXACT_DTYPES)
def test_uncompressed_round_trip_is_bit_exact_for_every_supported_dtype(
    seed: int, dtype: Any
) -> None:
    rng = np.random.default_rng(seed)
    x = _random(rng, (3, 5, 7), dtype)
    out = decode_tensors(encode_tensors({"x": x})).tensors["x"]
    assert out.dtype == x.dtype
    assert out.shape == x.shape
    assert out.tobytes() == x.tobytes()


@pytest.mark.parametrize("compression", list(Compression))
@pytest.mark.parametrize(
    "shape", [(), (1,), (0,), (0, 384), (4, 0), (2, 0, 3), (1, 128, 384), (3, 1, 1)]
)
def test_round_trip_preserves_dtype_and_shape_including_scalars_and_empty_tensors(
    compression: Compression, shape: tuple[int, ...]
) -> None:
    tensors: dict[str, Array] = {
        "f32": np.full(shape, 0.5, dtype=np.float32),
        "f64": np.full(shape, -2.25, dtype=np.float64),
        "f16": np.full(shape, 3.0, dtype=np.float16),
        "i64": np.full(shape, 9, dtype=np.int64),
        "mask": np.full(shape, True),
    }
    out = decode_tensors(encode_tensors(tensors, compression=compression)).tensors
    assert sorted(out) == sorted(tensors)
    for name, x in tensors.items():
        assert out[name].dtype == x.dtype, name
        assert out[name].shape == x.shape, name
        if compression is Compression.INT8 and name.startswith("f"):
            # The row maximum comes back as 127 * scale, within rounding of the scale.
            np.testing.assert_allclose(out[name], x, rtol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(out[name], x, err_msg=name)


def test_fp16_round_trip_is_exact_for_float16_inputs() -> None:
    x = _random(np.random.default_rng(0), (4, 64), np.float16)
    out = decode_tensors(encode_tensors({"x": x}, compression=Compression.FP16)).tensors["x"]
    assert out.dtype == np.float16
    assert out.tobytes() == x.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fp16_round_trip_is_exact_for_values_that_float16_can_represent(dtype: Any) -> None:
    x = _random(np.random.default_rng(1), (8, 32), np.float16).astype(dtype)
    out = decode_tensors(encode_tensors({"x": x}, compression=Compression.FP16)).tensors["x"]
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("seed", SEEDS)
def test_fp16_round_trip_error_of_float32_is_at_most_half_a_float16_step(seed: int) -> None:
    x = _random(np.random.default_rng(seed), (16, 96), np.float32)
    out = decode_tensors(encode_tensors({"x": x}, compression=Compression.FP16)).tensors["x"]
    assert out.dtype == np.float32
    # float16 keeps 11 significant bits; below its normal range the spacing is 2**-24.
    bound = np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)
    assert np.all(np.abs(out.astype(np.float64) - x) <= bound)


def test_fp16_payload_is_about_half_of_fp32() -> None:
    x = _activation()
    assert wire_size({"h": x}, Compression.FP16) < 0.55 * wire_size({"h": x})


# --------------------------------------------------------------------------- int8


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(5,), (3, 17), (2, 4, 33), ()])
def test_int8_round_trip_error_is_at_most_half_a_scale_step(
    seed: int, dtype: Any, shape: tuple[int, ...]
) -> None:
    x = _random(np.random.default_rng(seed), shape, dtype)
    data = encode_tensors({"x": x}, compression=Compression.INT8)
    out = decode_tensors(data).tensors["x"]
    assert out.dtype == x.dtype
    assert out.shape == x.shape
    stored, _ = _raw(data)
    scale = stored[SCALE_NAME_PREFIX + "x"].astype(np.float64)
    x64 = x.astype(np.float64)
    row_max = np.abs(x64).max(axis=-1, keepdims=True) if shape else np.abs(x64)
    np.testing.assert_allclose(scale, row_max / 127, rtol=1e-6)
    bound = scale / 2 * (1 + 1e-6) + np.finfo(dtype).eps * np.abs(x64)
    assert np.all(np.abs(out.astype(np.float64) - x64) <= bound)


def test_int8_keeps_a_realistic_activation_at_cosine_at_least_0_999() -> None:
    x = _activation(seed=42)
    out = decode_tensors(encode_tensors({"h": x}, compression=Compression.INT8)).tensors["h"]
    a, b = x.ravel().astype(np.float64), out.ravel().astype(np.float64)
    cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert cosine >= 0.999
    per_token = np.sum(x * out, axis=-1) / (
        np.linalg.norm(x, axis=-1) * np.linalg.norm(out, axis=-1)
    )
    assert float(per_token.min()) >= 0.999


def test_int8_payload_is_about_half_of_fp16_and_a_quarter_of_fp32() -> None:
    tensors = {"h": _activation()}
    fp32 = len(encode_tensors(tensors))
    fp16 = len(encode_tensors(tensors, compression=Compression.FP16))
    int8 = len(encode_tensors(tensors, compression=Compression.INT8))
    assert fp32 >= 1 * 128 * 384 * 4
    assert int8 < 0.3 * fp32
    assert int8 < 0.55 * fp16


def test_int8_zero_row_decodes_to_zeros_without_nan() -> None:
    x = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)
    x[1] = 0.0
    out = decode_tensors(encode_tensors({"x": x}, compression=Compression.INT8)).tensors["x"]
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[1], np.zeros(8, dtype=np.float32))
    zeros = np.zeros((2, 5), dtype=np.float64)
    out = decode_tensors(encode_tensors({"z": zeros}, compression=Compression.INT8)).tensors["z"]
    np.testing.assert_array_equal(out, zeros)


def test_int8_empty_tensor_round_trips_to_an_empty_tensor() -> None:
    x = np.zeros((0, 384), dtype=np.float32)
    out = decode_tensors(encode_tensors({"x": x}, compression=Compression.INT8)).tensors["x"]
    assert out.shape == (0, 384)
    assert out.dtype == np.float32


def test_int8_handles_rows_far_outside_the_float32_scale_range() -> None:
    x = np.array([[1e-300, -2e-300], [1e300, 5e299]], dtype=np.float64)
    out = decode_tensors(encode_tensors({"x": x}, compression=Compression.INT8)).tensors["x"]
    half_step = np.abs(x).max(axis=-1, keepdims=True) / 254
    assert np.all(np.abs(out - x) <= half_step * (1 + 1e-9))


def test_int8_scales_of_subnormal_float32_rows_travel_as_float64() -> None:
    x = np.array([[1e-40, -3e-41, 0.0], [1.0, -0.5, 0.25]], dtype=np.float32)
    data = encode_tensors({"x": x}, compression=Compression.INT8)
    assert _raw(data)[0][SCALE_NAME_PREFIX + "x"].dtype == np.float64
    out = decode_tensors(data).tensors["x"]
    assert out.dtype == np.float32
    assert np.all(np.isfinite(out))
    half_step = np.abs(x.astype(np.float64)).max(axis=-1, keepdims=True) / 254
    float32_spacing = float(np.finfo(np.float32).smallest_subnormal)
    assert np.all(np.abs(out.astype(np.float64) - x) <= half_step * (1 + 1e-6) + float32_spacing)


def test_int8_decoding_is_q_times_scale_as_the_module_docstring_says() -> None:
    x = _activation(seed=5)
    data = encode_tensors({"h": x}, compression=Compression.INT8)
    stored, metadata = _raw(data)
    entry = json.loads(metadata[TENSOR_KEY_PREFIX + "h"])
    assert entry == {"dtype": "float32", "codec": "int8", "scale": SCALE_NAME_PREFIX + "h"}
    assert stored["h"].dtype == np.int8
    scale = stored[entry["scale"]]
    assert scale.dtype == np.float32
    assert scale.shape == (1, 128, 1)
    by_hand = stored["h"].astype(np.float32) * scale
    np.testing.assert_array_equal(decode_tensors(data).tensors["h"], by_hand)


# --------------------------------------------------------------------------- exact companions


@pytest.mark.parametrize("compression", list(Compression))
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_integer_and_bool_tensors_are_untouched_by_compression(
    compression: Compression, dtype: Any
) -> None:
    x = _random(np.random.default_rng(11), (2, 9), dtype)
    data = encode_tensors({"x": x}, compression=compression)
    stored, _ = _raw(data)
    assert stored["x"].dtype == x.dtype
    assert list(stored) == ["x"]
    out = decode_tensors(data).tensors["x"]
    assert out.dtype == x.dtype
    assert out.tobytes() == x.tobytes()


@pytest.mark.parametrize("compression", [Compression.FP16, Compression.INT8])
def test_attention_mask_travels_exactly_alongside_a_compressed_hidden_state(
    compression: Compression,
) -> None:
    hidden = _activation()
    mask = np.ones((1, 128), dtype=np.int64)
    mask[0, 100:] = 0
    out = decode_tensors(
        encode_tensors({"hidden_states": hidden, "attention_mask": mask}, compression=compression)
    ).tensors
    assert sorted(out) == ["attention_mask", "hidden_states"]
    assert out["attention_mask"].dtype == np.int64
    np.testing.assert_array_equal(out["attention_mask"], mask)
    assert out["hidden_states"].dtype == np.float32
    np.testing.assert_allclose(out["hidden_states"], hidden, atol=0.05)


# --------------------------------------------------------------------------- input handling


@pytest.mark.parametrize("compression", list(Compression))
def test_non_contiguous_arrays_round_trip(compression: Compression) -> None:
    base = np.arange(6 * 8, dtype=np.float32).reshape(6, 8) / 8
    tensors = {
        "transposed": base.T,
        "strided": base[::2, 1::3],
        "ids": np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2],
    }
    assert not tensors["transposed"].flags.c_contiguous
    out = decode_tensors(encode_tensors(tensors, compression=compression)).tensors
    for name, x in tensors.items():
        np.testing.assert_allclose(out[name], x, atol=0.05, err_msg=name)
        assert out[name].shape == x.shape


def test_big_endian_arrays_round_trip_with_their_values() -> None:
    x = np.arange(12, dtype=">f8").reshape(3, 4)
    ids = np.arange(5, dtype=">i4")
    out = decode_tensors(encode_tensors({"x": x, "ids": ids})).tensors
    np.testing.assert_array_equal(out["x"], x)
    np.testing.assert_array_equal(out["ids"], ids)
    assert out["x"].dtype.name == "float64"


def test_decoded_arrays_are_read_only_views_that_cannot_corrupt_the_payload() -> None:
    data = encode_tensors({"x": np.zeros(3, np.float32), "ids": np.zeros(3, np.int64)})
    out = decode_tensors(data).tensors
    with pytest.raises(ValueError, match="read-only"):
        out["x"][0] = 1.0
    writable = np.array(out["ids"])
    writable[0] = 1
    assert decode_tensors(data).tensors["ids"][0] == 0


@pytest.mark.parametrize("compression", [Compression.NONE, Compression.FP16])
def test_nan_and_infinity_pass_through_without_int8(compression: Compression) -> None:
    x = np.array([[np.nan, np.inf, -np.inf, 1.5]], dtype=np.float32)
    out = decode_tensors(encode_tensors({"x": x}, compression=compression)).tensors["x"]
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_int8_rejects_nan_and_infinity(bad: float) -> None:
    x = np.array([[0.5, bad, 1.0]], dtype=np.float32)
    with pytest.raises(TensorFormatError, match="NaN or infinity"):
        encode_tensors({"x": x}, compression=Compression.INT8)


def test_fp16_rejects_finite_values_beyond_the_float16_range() -> None:
    x = np.array([1.0, 70000.0], dtype=np.float32)
    with pytest.raises(TensorFormatError, match="float16 range"):
        encode_tensors({"x": x}, compression=Compression.FP16)


@pytest.mark.parametrize(
    "value",
    [[1.0, 2.0], 3.0, np.float32(1.0), "tensor", None],
    ids=["list", "float", "numpy-scalar", "str", "none"],
)
def test_values_that_are_not_numpy_arrays_are_rejected(value: object) -> None:
    with pytest.raises(TensorFormatError, match="must be a numpy array"):
        encode_tensors({"x": value})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    "array",
    [
        np.array([{"a": 1}, None], dtype=object),
        np.array(["ab", "cd"]),
        np.zeros(3, dtype=np.complex128),
        np.zeros(2, dtype="datetime64[s]"),
    ],
    ids=["object", "unicode", "complex128", "datetime"],
)
def test_dtypes_the_wire_cannot_carry_are_rejected(array: Array) -> None:
    with pytest.raises(TensorFormatError, match="cannot carry"):
        encode_tensors({"x": array})


def test_a_mapping_is_required() -> None:
    with pytest.raises(TensorFormatError, match="mapping"):
        encode_tensors([("x", np.zeros(1))])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["", "__edgefed_scale__.x", "__edgefed", "__edgefed_other"])
def test_empty_and_reserved_tensor_names_are_rejected(name: str) -> None:
    with pytest.raises(TensorFormatError, match=r"reserved|non-empty"):
        encode_tensors({name: np.zeros(2, dtype=np.float32)})


def test_non_string_tensor_names_are_rejected() -> None:
    with pytest.raises(TensorFormatError, match="non-empty strings"):
        encode_tensors({1: np.zeros(2)})  # type: ignore[dict-item]


def test_unknown_compression_is_rejected() -> None:
    with pytest.raises(TensorFormatError, match="unknown compression"):
        encode_tensors({"x": np.zeros(2)}, compression="int4")  # type: ignore[arg-type]


def test_compression_accepts_its_string_values() -> None:
    data = encode_tensors({"x": np.ones(4, np.float32)}, compression="fp16")  # type: ignore[arg-type]
    assert _raw(data)[0]["x"].dtype == np.float16


def test_wire_size_is_the_length_of_the_encoded_bytes() -> None:
    tensors = {"h": _activation(), "m": np.ones((1, 128), np.int64)}
    for compression in Compression:
        assert wire_size(tensors, compression) == len(
            encode_tensors(tensors, compression=compression)
        )


# --------------------------------------------------------------------------- metadata


def test_user_metadata_round_trips_without_edgefed_bookkeeping() -> None:
    meta = {"request_id": "r-1", "split": "3", "model": "minilm@2", "": "empty key", "ü": "ß"}
    data = encode_tensors(
        {"h": _activation(), "ids": np.arange(4)}, compression=Compression.INT8, metadata=meta
    )
    decoded = decode_tensors(data)
    assert isinstance(decoded, DecodedTensors)
    assert decoded.metadata == meta
    _, raw_meta = _raw(data)
    assert raw_meta[FORMAT_KEY] == "1"
    assert json.loads(raw_meta[TENSOR_KEY_PREFIX + "ids"]) == {"dtype": "int64", "codec": "none"}


def test_decoded_tensors_is_frozen() -> None:
    decoded = decode_tensors(encode_tensors({"x": np.zeros(1)}))
    with pytest.raises(AttributeError):
        decoded.metadata = {}  # type: ignore[misc]


@pytest.mark.parametrize("key", ["edgefed.format", "edgefed.tensor.x", "edgefed.anything"])
def test_metadata_keys_in_the_edgefed_namespace_are_rejected(key: str) -> None:
    with pytest.raises(TensorFormatError, match="reserved"):
        encode_tensors({"x": np.zeros(2)}, metadata={key: "1"})


@pytest.mark.parametrize("metadata", [{"k": 1}, {2: "v"}, {"k": None}])
def test_metadata_must_map_strings_to_strings(metadata: dict[Any, Any]) -> None:
    with pytest.raises(TensorFormatError, match="strings"):
        encode_tensors({"x": np.zeros(2)}, metadata=metadata)


def test_empty_tensor_set_round_trips_with_metadata() -> None:
    decoded = decode_tensors(encode_tensors({}, metadata={"k": "v"}))
    assert decoded.tensors == {}
    assert decoded.metadata == {"k": "v"}


def test_plain_safetensors_from_a_third_party_decode_as_they_are() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    decoded = decode_tensors(_craft({"x": x}, {"note": "hi"}))
    np.testing.assert_array_equal(decoded.tensors["x"], x)
    assert decoded.metadata == {"note": "hi"}


# --------------------------------------------------------------------------- decode rejections


def test_errors_are_payload_errors_that_a_retry_cannot_fix() -> None:
    with pytest.raises(PayloadError) as caught:
        decode_tensors(b"")
    assert isinstance(caught.value, TensorFormatError)
    assert not caught.value.retryable


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"not safetensors at all", "not valid safetensors"),
        (np.random.default_rng(0).bytes(256), "not valid safetensors"),
        (b"\x00" * 7, "not valid safetensors"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......", "not valid safetensors"),
    ],
    ids=["empty", "text", "random", "short", "bad-header"],
)
def test_bytes_that_are_not_safetensors_are_rejected(data: bytes, match: str) -> None:
    with pytest.raises(TensorFormatError, match=match):
        decode_tensors(data)


@pytest.mark.parametrize("cut", [1, 9, 100])
def test_truncated_payloads_are_rejected(cut: int) -> None:
    data = encode_tensors({"h": _activation()}, compression=Compression.FP16)
    with pytest.raises(TensorFormatError, match="not valid safetensors"):
        decode_tensors(data[:-cut])


def test_non_bytes_payload_is_rejected() -> None:
    with pytest.raises(TensorFormatError, match="must be bytes"):
        decode_tensors("text")  # type: ignore[arg-type]


def test_bytearray_and_memoryview_payloads_decode() -> None:
    data = encode_tensors({"x": np.arange(3)})
    for view in (bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(decode_tensors(view).tensors["x"], np.arange(3))


def test_payload_larger_than_max_bytes_is_rejected() -> None:
    data = encode_tensors({"h": _activation()})
    with pytest.raises(TensorFormatError, match="exceeds the limit"):
        decode_tensors(data, max_bytes=len(data) - 1)
    assert "h" in decode_tensors(data, max_bytes=len(data)).tensors


def test_unknown_format_version_is_rejected() -> None:
    stored, meta = _int8_payload()
    meta[FORMAT_KEY] = "2"
    with pytest.raises(TensorFormatError, match="unsupported tensor format version '2'"):
        decode_tensors(_craft(stored, meta))


def test_edgefed_metadata_without_a_format_version_is_rejected() -> None:
    stored, meta = _int8_payload()
    del meta[FORMAT_KEY]
    with pytest.raises(TensorFormatError, match=r"no 'edgefed\.format'"):
        decode_tensors(_craft(stored, meta))


def test_unknown_edgefed_metadata_key_is_rejected() -> None:
    stored, meta = _int8_payload()
    meta["edgefed.surprise"] = "1"
    with pytest.raises(TensorFormatError, match="unknown edgefed metadata key"):
        decode_tensors(_craft(stored, meta))


def test_unknown_codec_is_rejected() -> None:
    stored, meta = _int8_payload()
    meta[TENSOR_KEY_PREFIX + "hidden"] = json.dumps({"dtype": "float32", "codec": "int4"})
    with pytest.raises(TensorFormatError, match="unknown codec 'int4'"):
        decode_tensors(_craft(stored, meta))


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"codec": "int8"}', "lacks string"),
        ('{"codec": "int8", "dtype": "int32", "scale": "__edgefed_scale__.hidden"}', "non-float"),
        ('{"codec": "fp16", "dtype": "float32"}', "must be stored as float16"),
        ('{"codec": "none", "dtype": "float32"}', "stored as int8"),
        ('{"codec": "int8", "dtype": "float32"}', "does not name a reserved scale"),
    ],
    ids=[
        "not-json",
        "not-object",
        "no-dtype",
        "int-dtype",
        "fp16-not-half",
        "none-dtype",
        "no-scale",
    ],
)
def test_malformed_tensor_entries_are_rejected(entry: str, match: str) -> None:
    stored, meta = _int8_payload()
    meta[TENSOR_KEY_PREFIX + "hidden"] = entry
    with pytest.raises(TensorFormatError, match=match):
        decode_tensors(_craft(stored, meta))


def test_entry_for_a_tensor_that_is_not_in_the_payload_is_rejected() -> None:
    stored, meta = _int8_payload()
    meta[TENSOR_KEY_PREFIX + "ghost"] = json.dumps({"dtype": "float32", "codec": "none"})
    with pytest.raises(TensorFormatError, match="'ghost' which is not in the payload"):
        decode_tensors(_craft(stored, meta))


def test_int8_tensor_whose_scale_is_missing_is_rejected() -> None:
    stored, meta = _int8_payload()
    del stored[SCALE_NAME_PREFIX + "hidden"]
    with pytest.raises(TensorFormatError, match=r"scale tensor .* is missing"):
        decode_tensors(_craft(stored, meta))


@pytest.mark.parametrize("shape", [(2, 3), (2, 3, 2), (1, 3, 1), (6, 1), ()])
def test_int8_scale_of_the_wrong_shape_is_rejected(shape: tuple[int, ...]) -> None:
    stored, meta = _int8_payload()
    stored[SCALE_NAME_PREFIX + "hidden"] = np.ones(shape, dtype=np.float32)
    with pytest.raises(TensorFormatError, match=r"has shape .* expected \(2, 3, 1\)"):
        decode_tensors(_craft(stored, meta))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, -0.5])
def test_int8_scales_that_are_not_finite_or_negative_are_rejected(bad: float) -> None:
    stored, meta = _int8_payload()
    scale = stored[SCALE_NAME_PREFIX + "hidden"].copy()
    scale[1, 2, 0] = bad
    stored[SCALE_NAME_PREFIX + "hidden"] = scale
    with pytest.raises(TensorFormatError, match="negative or non-finite"):
        decode_tensors(_craft(stored, meta))


def test_int8_scale_of_integer_dtype_is_rejected() -> None:
    stored, meta = _int8_payload()
    stored[SCALE_NAME_PREFIX + "hidden"] = np.ones((2, 3, 1), dtype=np.int32)
    with pytest.raises(TensorFormatError, match="non-floating dtype"):
        decode_tensors(_craft(stored, meta))


def test_int8_scale_that_overflows_the_original_dtype_is_rejected() -> None:
    x = np.ones((1, 4), dtype=np.float16)
    stored, meta = _raw(encode_tensors({"x": x}, compression=Compression.INT8))
    stored[SCALE_NAME_PREFIX + "x"] = np.full((1, 1), 1e6, dtype=np.float32)
    with pytest.raises(TensorFormatError, match="overflows float16"):
        decode_tensors(_craft(stored, meta))


def test_unexpected_reserved_tensors_are_rejected() -> None:
    stored, meta = _int8_payload()
    stored["__edgefed_scale__.stray"] = np.ones(1, dtype=np.float32)
    with pytest.raises(TensorFormatError, match="unexpected reserved tensor"):
        decode_tensors(_craft(stored, meta))
    with pytest.raises(TensorFormatError, match="reserved tensor"):
        decode_tensors(_craft({"__edgefed_x": np.ones(1)}, {}))


def test_one_scale_claimed_by_two_tensors_is_rejected() -> None:
    stored, meta = _int8_payload()
    stored["other"] = stored["hidden"].copy()
    meta[TENSOR_KEY_PREFIX + "other"] = meta[TENSOR_KEY_PREFIX + "hidden"]
    with pytest.raises(TensorFormatError, match="claimed by two tensors"):
        decode_tensors(_craft(stored, meta))


# --------------------------------------------------------------------------- import hygiene


def test_importing_the_module_pulls_no_torch() -> None:
    code = (
        "import sys, edgefed.common.tensors; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_edgefed_reader_agrees_with_the_safetensors_library_on_mutated_payloads() -> None:
    """edgefed parses safetensors itself (zero-copy); on every byte-level mutation of a valid
    payload it must either refuse with TensorFormatError or read what the library reads."""
    import safetensors
    import safetensors.numpy

    rng = np.random.default_rng(7)
    good = safetensors.numpy.save(
        {
            "a": rng.standard_normal((2, 3)).astype(np.float32),
            "ids": np.arange(4, dtype=np.int64),
            "m": np.ones((1, 4), dtype=np.bool_),
        },
        metadata={"k": "v"},
    )
    agreed = refused = 0
    for _ in range(400):
        mutated = bytearray(good)
        for _ in range(int(rng.integers(1, 4))):
            mutated[int(rng.integers(0, len(mutated)))] = int(rng.integers(0, 256))
        data = bytes(mutated)
        try:
            ours = decode_tensors(data).tensors
        except TensorFormatError:
            refused += 1
            continue
        try:
            theirs = safetensors.numpy.load(data)
        except (safetensors.SafetensorError, ValueError, TypeError) as exc:
            pytest.fail(f"edgefed accepted a payload the safetensors library refuses: {exc}")
        assert set(ours) == set(theirs)
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name])
        agreed += 1
    assert agreed > 0
    assert refused > 0
