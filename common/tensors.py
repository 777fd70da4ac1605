"""The tensor wire format of edgefed: named numpy arrays as safetensors bytes.

A payload is one ordinary `safetensors <https://github.com/huggingface/safetensors>`_ buffer
(8-byte little-endian header length, JSON header, raw little-endian data); nothing is pickled.
Any safetensors reader can open it. Floating tensors may be compressed; integer and bool tensors
(``input_ids``, ``attention_mask``) always travel exactly.

The header's ``__metadata__`` (string to string) holds the sender's own keys plus edgefed's
bookkeeping, every key of which starts with ``edgefed.``:

``edgefed.format``
    ``"1"``, the version of this format.
``edgefed.tensor.<name>``
    JSON describing tensor ``<name>``: ``{"dtype": "float32", "codec": "none"}``. ``dtype`` is the
    dtype the receiver restores; ``codec`` is one of

    * ``none``: stored as it is;
    * ``fp16``: stored as float16, cast back to ``dtype``;
    * ``int8``: symmetric per-token quantisation. The entry names the scale tensor
      (``"scale": "__edgefed_scale__.<name>"``): float32 (float64 for a float64 tensor or where
      a scale does not fit float32), of shape ``shape[:-1] + (1,)`` (``()`` for a 0-d tensor),
      one scale per row of the last axis. Decode with ``x = q * scale`` (in the scale's dtype),
      then cast to ``dtype``. The sender chose ``scale = max(|row|) / 127`` (1 for an all-zero
      row) and ``q = clip(round(x / scale), -127, 127)``, so each element is off by at most
      ``scale / 2``.

Tensor names starting with ``__edgefed`` and metadata keys starting with ``edgefed.`` are
reserved. A plain safetensors buffer without any ``edgefed.`` key is accepted too: its tensors
are taken as they are.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import safetensors

from edgefed.common.errors import TensorFormatError

__all__ = [
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "METADATA_PREFIX",
    "RESERVED_NAME_PREFIX",
    "SCALE_NAME_PREFIX",
    "TENSOR_KEY_PREFIX",
    "Compression",
    "DecodedTensors",
    "decode_tensors",
    "encode_tensors",
    "wire_size",
]

FORMAT_VERSION = "1"
METADATA_PREFIX = "edgefed."
FORMAT_KEY = "edgefed.format"
TENSOR_KEY_PREFIX = "edgefed.tensor."
RESERVED_NAME_PREFIX = "__edgefed"
SCALE_NAME_PREFIX = "__edgefed_scale__."

_INT8_MAX = 127
_FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})
_EXACT_DTYPES = frozenset(
    {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64"}
)
_SUPPORTED_DTYPES = _FLOAT_DTYPES | _EXACT_DTYPES
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)

Array = npt.NDArray[Any]

# numpy's dtype.name is a Python-level property that costs microseconds per call; this table
# answers the same question with one dict lookup (big-endian dtypes are added on first sight).
_DTYPE_NAMES: dict[np.dtype[Any], str] = {np.dtype(n): n for n in _SUPPORTED_DTYPES}


def _dtype_name(dtype: np.dtype[Any]) -> str:
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


class Compression(enum.StrEnum):
    """How floating tensors travel; integer and bool tensors always travel exactly."""

    NONE = "none"
    FP16 = "fp16"
    INT8 = "int8"


@dataclass(frozen=True, slots=True)
class DecodedTensors:
    """What :func:`decode_tensors` returns: the tensors in their original dtypes and the
    sender's own metadata (edgefed's ``edgefed.*`` keys removed).

    Uncompressed tensors are read-only views of the payload (no copy); ``np.array(t)`` gives a
    writable copy."""

    tensors: dict[str, Array]
    metadata: dict[str, str]


# --------------------------------------------------------------------------- encode


def encode_tensors(
    tensors: Mapping[str, Array],
    *,
    compression: Compression = Compression.NONE,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Serialise named arrays to safetensors bytes, compressing floating tensors.

    Raises :class:`TensorFormatError` for a value that is not a numpy array, a dtype the format
    cannot carry, an empty or reserved name, a reserved metadata key, NaN or infinity under
    ``INT8``, or finite values beyond the float16 range under ``FP16``.
    """
    if not isinstance(tensors, Mapping):
        raise TensorFormatError(
            f"tensors must be a mapping of names to arrays, not {_kind(tensors)}"
        )
    codec = _compression(compression)
    header = _user_metadata(metadata)
    header[FORMAT_KEY] = FORMAT_VERSION
    out: dict[str, Array] = {}
    for name, value in tensors.items():
        array = _checked_array(name, value)
        dtype = _dtype_name(array.dtype)
        entry: dict[str, str] = {"dtype": dtype, "codec": Compression.NONE.value}
        if dtype in _FLOAT_DTYPES and codec is Compression.FP16:
            out[name] = _to_fp16(name, array)
            entry["codec"] = Compression.FP16.value
        elif dtype in _FLOAT_DTYPES and codec is Compression.INT8:
            q, scale = _quantise_int8(name, array)
            scale_name = SCALE_NAME_PREFIX + name
            out[name] = q
            out[scale_name] = scale
            entry["codec"] = Compression.INT8.value
            entry["scale"] = scale_name
        else:
            out[name] = array
        header[TENSOR_KEY_PREFIX + name] = json.dumps(entry, separators=(",", ":"))
    try:
        return _save(out, header)
    except (safetensors.SafetensorError, ValueError, TypeError) as exc:
        raise TensorFormatError(f"cannot serialise tensors: {exc}") from exc


def _save(arrays: Mapping[str, Array], metadata: dict[str, str]) -> bytes:
    """``safetensors.numpy.save`` without its per-tensor ``ndarray.ctypes`` cost (the arrays are
    already contiguous little-endian, see :func:`_checked_array`)."""
    specs = {
        name: safetensors.TensorSpec(
            dtype=_dtype_name(a.dtype),
            shape=a.shape,
            data_ptr=a.__array_interface__["data"][0],
            data_len=a.nbytes,
        )
        for name, a in arrays.items()
    }
    return bytes(safetensors.serialize(specs, metadata=metadata))


_NUMPY_OF: dict[str, np.dtype[Any]] = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype(np.bool_),
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself applies


def _not_safetensors(detail: str) -> TensorFormatError:
    return TensorFormatError(f"tensor payload is not valid safetensors: {detail}")


def _load(raw: bytes) -> tuple[dict[str, Array], dict[str, Any]]:
    """Parse a safetensors buffer into read-only arrays that view ``raw`` (no copy).

    Checks what the safetensors reader checks: header length within the buffer, a JSON object,
    known dtypes, shapes of non-negative integers, data offsets that tile the data section
    exactly (no gaps, overlaps or trailing bytes) and match each tensor's size.
    """
    if len(raw) < 8:
        raise _not_safetensors(f"tensor payload of {len(raw)} bytes is too short for safetensors")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len > min(len(raw) - 8, _MAX_HEADER_BYTES):
        raise _not_safetensors(
            f"safetensors header length {header_len} exceeds the payload ({len(raw)} bytes)"
        )
    try:
        header = json.loads(raw[8 : 8 + header_len])
    except (ValueError, UnicodeDecodeError) as exc:
        raise _not_safetensors(f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise _not_safetensors("safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    body = memoryview(raw)[8 + header_len :]
    entries: list[tuple[int, int, str, np.dtype[Any], tuple[int, ...]]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _not_safetensors(f"safetensors entry {name!r} is not an object")
        dtype = _NUMPY_OF.get(info.get("dtype"))  # type: ignore[arg-type]
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if dtype is None:
            raise _not_safetensors(
                f"tensor {name!r} has dtype {info.get('dtype')!r} edgefed cannot read"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _not_safetensors(f"tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise _not_safetensors(f"tensor {name!r} has invalid data offsets {offsets!r}")
        entries.append((offsets[0], offsets[1], name, dtype, tuple(shape)))
    entries.sort(key=lambda e: (e[0], e[1]))
    arrays: dict[str, Array] = {}
    position = 0
    for begin, end, name, dtype, shape in entries:
        count = math.prod(shape)
        if begin != position or end - begin != count * dtype.itemsize:
            raise _not_safetensors(
                f"tensor {name!r}: data offsets [{begin}, {end}] do not match its shape "
                f"{list(shape)} and dtype, or overlap or leave a gap"
            )
        if end > len(body):
            raise _not_safetensors(f"tensor {name!r} runs past the end of the payload (truncated)")
        arrays[name] = np.frombuffer(body, dtype=dtype, count=count, offset=begin).reshape(shape)
        position = end
    if position != len(body):
        raise _not_safetensors(
            f"safetensors data section has {len(body) - position} bytes no tensor accounts for"
        )
    return arrays, meta


def wire_size(tensors: Mapping[str, Array], compression: Compression = Compression.NONE) -> int:
    """Bytes that :func:`encode_tensors` produces for ``tensors`` (it encodes them)."""
    return len(encode_tensors(tensors, compression=compression))


def _compression(value: object) -> Compression:
    if isinstance(value, str):
        try:
            return Compression(value)
        except ValueError:
            pass
    known = ", ".join(c.value for c in Compression)
    raise TensorFormatError(f"unknown compression {value!r} (known: {known})")


def _user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TensorFormatError(f"metadata must be a mapping of strings, not {_kind(metadata)}")
    header: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TensorFormatError(
                f"metadata keys and values must be strings, got {key!r}: {_kind(value)}"
            )
        if key.startswith(METADATA_PREFIX):
            raise TensorFormatError(
                f"metadata key {key!r} is reserved: keys starting with {METADATA_PREFIX!r} "
                "belong to edgefed"
            )
        header[key] = value
    return header


def _checked_array(name: object, value: object) -> Array:
    if not isinstance(name, str) or not name:
        raise TensorFormatError(f"tensor names must be non-empty strings, got {name!r}")
    if name.startswith(RESERVED_NAME_PREFIX):
        raise TensorFormatError(
            f"tensor name {name!r} is reserved: names starting with {RESERVED_NAME_PREFIX!r} "
            "belong to edgefed"
        )
    if not isinstance(value, np.ndarray):
        raise TensorFormatError(f"tensor {name!r} must be a numpy array, not {_kind(value)}")
    array = np.asarray(value)
    if _dtype_name(array.dtype) not in _SUPPORTED_DTYPES:
        raise TensorFormatError(
            f"tensor {name!r} has dtype {array.dtype} which the wire format cannot carry "
            f"(supported: {', '.join(sorted(_SUPPORTED_DTYPES))})"
        )
    # Contiguous, little-endian: safetensors copies raw memory from the data pointer.
    # (np.ascontiguousarray would turn a 0-d array into a 1-d one.)
    return array.astype(array.dtype.newbyteorder("<"), order="C", copy=False)


def _to_fp16(name: str, array: Array) -> Array:
    with np.errstate(over="ignore"):
        half = array.astype(np.float16)
    overflow = np.isinf(half) & np.isfinite(array)
    if np.any(overflow):
        raise TensorFormatError(
            f"tensor {name!r} holds finite values beyond the float16 range "
            f"(±{float(np.finfo(np.float16).max):g}); send it with int8 or no compression"
        )
    return half


def _quantise_int8(name: str, array: Array) -> tuple[Array, Array]:
    if not np.all(np.isfinite(array)):
        raise TensorFormatError(
            f"tensor {name!r} holds NaN or infinity and cannot be quantised to int8; "
            "send it with fp16 or no compression"
        )
    wide = array.astype(np.float64)
    if wide.ndim == 0:
        amax = np.abs(wide)
    else:
        amax = np.max(np.abs(wide), axis=-1, keepdims=True, initial=0.0)
    scale = np.asarray(np.where(amax == 0, 1.0, amax / _INT8_MAX), dtype=np.float64)
    # float32 carries the scale, float64 where the original is float64 or a scale would leave
    # float32's normal range.
    narrow = array.dtype != np.float64 and bool(
        np.all((scale >= _FLOAT32_TINY) & (scale <= _FLOAT32_MAX))
    )
    sent = scale.astype(np.float32) if narrow else scale
    q = np.clip(np.rint(wide / sent.astype(np.float64)), -_INT8_MAX, _INT8_MAX)
    return np.asarray(q, dtype=np.int8), np.asarray(sent)


# --------------------------------------------------------------------------- decode


def decode_tensors(
    data: bytes | bytearray | memoryview, *, max_bytes: int | None = None
) -> DecodedTensors:
    """Parse safetensors bytes made by :func:`encode_tensors` (or any plain safetensors buffer).

    Compressed tensors come back in their original dtype. Raises :class:`TensorFormatError` when
    the bytes are not safetensors, exceed ``max_bytes``, carry an unknown format version or
    codec, or a quantised tensor's scale is missing, mis-shaped or not finite.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TensorFormatError(f"tensor payload must be bytes, not {_kind(data)}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if max_bytes is not None and size > max_bytes:
        raise TensorFormatError(
            f"tensor payload of {size} bytes exceeds the limit of {max_bytes} bytes"
        )
    raw = bytes(data)
    if not raw:
        raise TensorFormatError("tensor payload is empty")
    stored, meta = _load(raw)
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise TensorFormatError("tensor payload metadata is not a mapping of strings")

    own = {k: v for k, v in meta.items() if k.startswith(METADATA_PREFIX)}
    user = {k: v for k, v in meta.items() if not k.startswith(METADATA_PREFIX)}
    if not own:
        return DecodedTensors(tensors=_plain(stored), metadata=user)
    version = own.pop(FORMAT_KEY, None)
    if version is None:
        raise TensorFormatError(f"tensor payload has edgefed metadata but no {FORMAT_KEY!r}")
    if version != FORMAT_VERSION:
        raise TensorFormatError(
            f"unsupported tensor format version {version!r} (this side speaks {FORMAT_VERSION!r})"
        )

    tensors: dict[str, Array] = {}
    used_scales: set[str] = set()
    for key, text in own.items():
        if not key.startswith(TENSOR_KEY_PREFIX):
            raise TensorFormatError(f"unknown edgefed metadata key {key!r}")
        name = key[len(TENSOR_KEY_PREFIX) :]
        tensors[name] = _restore(name, text, stored, used_scales)
    for name, array in stored.items():
        if name.startswith(RESERVED_NAME_PREFIX):
            if name not in used_scales:
                raise TensorFormatError(f"unexpected reserved tensor {name!r} in payload")
        elif name not in tensors:
            tensors[name] = array
    return DecodedTensors(tensors=dict(sorted(tensors.items())), metadata=user)


def _plain(stored: Mapping[str, Array]) -> dict[str, Array]:
    for name in stored:
        if name.startswith(RESERVED_NAME_PREFIX):
            raise TensorFormatError(f"reserved tensor {name!r} in a payload without {FORMAT_KEY!r}")
    return {name: stored[name] for name in sorted(stored)}


def _restore(name: str, text: str, stored: Mapping[str, Array], used_scales: set[str]) -> Array:
    if not name or name.startswith(RESERVED_NAME_PREFIX):
        raise TensorFormatError(f"metadata describes reserved or empty tensor name {name!r}")
    try:
        entry = json.loads(text)
    except ValueError as exc:
        raise TensorFormatError(f"metadata of tensor {name!r} is not JSON: {exc}") from exc
    if not isinstance(entry, dict):
        raise TensorFormatError(f"metadata of tensor {name!r} is not a JSON object")
    codec_name, dtype = entry.get("codec"), entry.get("dtype")
    if not isinstance(codec_name, str) or not isinstance(dtype, str):
        raise TensorFormatError(f"metadata of tensor {name!r} lacks string 'codec' and 'dtype'")
    try:
        codec = Compression(codec_name)
    except ValueError as exc:
        raise TensorFormatError(f"tensor {name!r} uses unknown codec {codec_name!r}") from exc
    array = stored.get(name)
    if array is None:
        raise TensorFormatError(f"metadata describes tensor {name!r} which is not in the payload")

    if codec is Compression.NONE:
        if _dtype_name(array.dtype) != dtype:
            raise TensorFormatError(
                f"tensor {name!r} is stored as {array.dtype} but metadata says {dtype}"
            )
        return array
    if dtype not in _FLOAT_DTYPES:
        raise TensorFormatError(
            f"tensor {name!r} uses codec {codec} for non-floating dtype {dtype!r}"
        )
    if codec is Compression.FP16:
        _expect_dtype(name, array, "float16", codec)
        return array.astype(dtype)

    _expect_dtype(name, array, "int8", codec)
    scale_name = entry.get("scale")
    if not isinstance(scale_name, str) or not scale_name.startswith(RESERVED_NAME_PREFIX):
        raise TensorFormatError(f"int8 tensor {name!r} does not name a reserved scale tensor")
    scale = stored.get(scale_name)
    if scale is None:
        raise TensorFormatError(f"scale tensor {scale_name!r} of int8 tensor {name!r} is missing")
    if scale_name in used_scales:
        raise TensorFormatError(f"scale tensor {scale_name!r} is claimed by two tensors")
    used_scales.add(scale_name)
    expected = (*array.shape[:-1], 1) if array.ndim else ()
    if scale.shape != expected:
        raise TensorFormatError(
            f"scale tensor {scale_name!r} has shape {scale.shape}, expected {expected} "
            f"for int8 tensor {name!r} of shape {array.shape}"
        )
    if _dtype_name(scale.dtype) not in _FLOAT_DTYPES:
        raise TensorFormatError(f"scale tensor {scale_name!r} has non-floating dtype {scale.dtype}")
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise TensorFormatError(
            f"scale tensor {scale_name!r} of int8 tensor {name!r} holds negative or non-finite "
            "values"
        )
    work = np.result_type(scale.dtype, np.dtype(dtype), np.float32)
    with np.errstate(over="ignore"):
        restored = np.asarray((array.astype(work) * scale.astype(work)).astype(dtype))
    if not np.all(np.isfinite(restored)):
        raise TensorFormatError(f"int8 tensor {name!r} overflows {dtype} when restored")
    return restored


def _expect_dtype(name: str, array: Array, dtype: str, codec: Compression) -> None:
    if _dtype_name(array.dtype) != dtype:
        raise TensorFormatError(
            f"tensor {name!r} with codec {codec} must be stored as {dtype}, not {array.dtype}"
        )


def _kind(value: object) -> str:
    return type(value).__name__
