"""A session's KV cache in memory and on the wire.

A holder keeps, per session, the keys and values the decoder computed for the tokens of the last
turn (:class:`KvCache`), so that the next turn only prefills what is new
(:meth:`edgefed.common.serving.runtime.OnnxModel.generate_turn`). At a handoff the cache may
travel with the context (:func:`kv_to_wire` / :func:`kv_from_wire`) instead of being recomputed
by the new holder; :mod:`edgefed.common.sessions.handoff` decides which is cheaper.

Wire layout: one tensor ``kv.<name>`` per cache tensor (``<name>`` is the graph's input name,
``past_key_values.<i>.key`` / ``.value``), shaped ``(1, heads, tokens, head_dim)``:

- ``fp16``: the values as float16;
- ``int8``: symmetric quantisation with one float16 scale per (head, position):
  ``kv.<name>.scale`` shaped ``(1, heads, tokens)``, ``scale = max(|x|) / 127`` over ``head_dim``
  and ``q = clip(round(x / scale), -127, 127)``; decode ``x = q * scale``. Each element is off by
  at most ``scale / 2`` (plus the float16 rounding of the values themselves).

The metadata (JSON, in the ``SessionRequest``/``SessionReply`` field ``kv``) says
``{"format", "dtype", "token_ids", "names"}``: the format, the dtype of the original cache, the
tokens it covers and the cache tensor names, so that a missing or extra tensor is noticed.

numpy only: this module runs on the agent (no torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt

from edgefed.common.errors import PayloadError

__all__ = [
    "KV_FORMATS",
    "KV_PREFIX",
    "SCALE_SUFFIX",
    "KvCache",
    "KvWireFormat",
    "kv_from_wire",
    "kv_to_wire",
]

KvWireFormat = Literal["fp16", "int8"]
KV_FORMATS: tuple[KvWireFormat, ...] = get_args(KvWireFormat)
KV_PREFIX = "kv."
SCALE_SUFFIX = ".scale"
_INT8_MAX = 127
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})

Array = npt.NDArray[Any]


@dataclass
class KvCache:
    """The keys and values a decoder computed for ``token_ids`` (batch of one).

    ``tensors`` maps the graph's cache input names (``past_key_values.<i>.key`` / ``.value``) to
    arrays ``(1, heads, len(token_ids), head_dim)``. Treat both as immutable: the methods return
    new caches and never write into the arrays.
    """

    token_ids: list[int]
    tensors: dict[str, Array]

    def __post_init__(self) -> None:
        for name, value in self.tensors.items():
            if value.ndim != 4 or value.shape[0] != 1:
                raise ValueError(
                    f"cache tensor {name!r} must be (1, heads, tokens, head_dim), "
                    f"not {list(value.shape)}"
                )
            if value.shape[2] != len(self.token_ids):
                raise ValueError(
                    f"cache tensor {name!r} covers {value.shape[2]} positions, "
                    f"but the cache has {len(self.token_ids)} token ids"
                )

    @property
    def length(self) -> int:
        """Tokens (positions) the cache covers."""
        return len(self.token_ids)

    def truncated(self, n: int) -> KvCache:
        """The cache of the first ``n`` positions (``0 <= n <= length``)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        if n == self.length:
            return KvCache(list(self.token_ids), dict(self.tensors))
        return KvCache(
            self.token_ids[:n],
            {name: np.ascontiguousarray(t[:, :, :n, :]) for name, t in self.tensors.items()},
        )

    def common_prefix(self, ids: Sequence[int]) -> int:
        """How many leading tokens of ``ids`` the cache covers (the reusable positions)."""
        n = 0
        for cached, wanted in zip(self.token_ids, ids, strict=False):
            if cached != wanted:
                break
            n += 1
        return n

    def nbytes(self, fmt: KvWireFormat) -> int:
        """Bytes of the tensors :func:`kv_to_wire` makes in ``fmt`` (before any encoding)."""
        _check_format(fmt)
        total = 0
        for t in self.tensors.values():
            if fmt == "fp16":
                total += t.size * 2
            else:
                total += t.size + (t.size // t.shape[3] if t.shape[3] else 0) * 2
        return total


def kv_to_wire(cache: KvCache, fmt: KvWireFormat) -> tuple[dict[str, Array], dict[str, Any]]:
    """The tensors (``kv.<name>`` [+ ``kv.<name>.scale``]) and the metadata of ``cache`` in
    ``fmt`` (see the module doc). Raises :class:`ValueError` for a cache holding NaN, infinity
    or values beyond the float16 range (no sane decoder produces them)."""
    _check_format(fmt)
    tensors: dict[str, Array] = {}
    dtypes = {t.dtype.name for t in cache.tensors.values()}
    if len(dtypes) > 1:
        raise ValueError(f"cache tensors mix dtypes {sorted(dtypes)}")
    dtype = dtypes.pop() if dtypes else "float32"
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"cache tensors have dtype {dtype}, not a float type")
    for name, t in cache.tensors.items():
        values = np.asarray(t)
        peak = float(np.abs(values).max()) if values.size else 0.0
        if not np.isfinite(peak) or peak > _FLOAT16_MAX:
            raise ValueError(
                f"cache tensor {name!r} holds NaN, infinity or values beyond the float16 range"
            )
        if fmt == "fp16":
            tensors[KV_PREFIX + name] = values.astype(np.float16)
        else:
            q, scale = _quantise(values)
            tensors[KV_PREFIX + name] = q
            tensors[KV_PREFIX + name + SCALE_SUFFIX] = scale
    meta: dict[str, Any] = {
        "format": fmt,
        "dtype": dtype,
        "token_ids": [int(i) for i in cache.token_ids],
        "names": sorted(cache.tensors),
    }
    return tensors, meta


def _quantise(values: Array) -> tuple[Array, Array]:
    x = values.astype(np.float32)
    peak = np.abs(x).max(axis=-1) if x.shape[-1] else np.zeros(x.shape[:-1], np.float32)
    # The scale travels as float16: quantise with the rounded scale the receiver will use.
    scale = (peak / _INT8_MAX).astype(np.float16)
    usable = scale.astype(np.float32)
    safe = np.where(usable > 0, usable, 1.0)[..., None]
    q = np.clip(np.rint(x / safe), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    q[np.broadcast_to((usable == 0)[..., None], q.shape)] = 0
    return q, scale


def kv_from_wire(
    tensors: Mapping[str, Array],
    meta: Mapping[str, Any],
    *,
    dtype: npt.DTypeLike | None = None,
) -> KvCache:
    """The cache that :func:`kv_to_wire` sent, in ``dtype`` (default: the original's, from the
    metadata). Raises :class:`PayloadError` naming what is inconsistent: unknown format, missing
    or unexpected tensor, wrong dtype, tensors of different shapes or a token count that does
    not match their positions."""
    if not isinstance(meta, Mapping):
        raise PayloadError("kv metadata must be an object")
    fmt = meta.get("format")
    if fmt not in KV_FORMATS:
        raise PayloadError(f"kv format must be one of {', '.join(KV_FORMATS)}, not {fmt!r}")
    token_ids = meta.get("token_ids")
    if not isinstance(token_ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in token_ids
    ):
        raise PayloadError("kv token_ids must be a list of non-negative integers")
    names = meta.get("names")
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise PayloadError("kv names must be a non-empty list of distinct tensor names")
    original = meta.get("dtype")
    if original not in _FLOAT_DTYPES:
        raise PayloadError(f"kv dtype must be one of {', '.join(sorted(_FLOAT_DTYPES))}")
    target = np.dtype(original if dtype is None else dtype)
    if target.name not in _FLOAT_DTYPES:
        raise PayloadError(f"cannot restore a kv cache as {target.name}")

    expected = {KV_PREFIX + n for n in names}
    if fmt == "int8":
        expected |= {KV_PREFIX + n + SCALE_SUFFIX for n in names}
    missing = sorted(expected - set(tensors))
    if missing:
        raise PayloadError(f"kv cache is missing tensor(s) {', '.join(missing)}")
    extra = sorted(set(tensors) - expected)
    if extra:
        raise PayloadError(f"unexpected tensor(s) with the kv cache: {', '.join(extra)}")

    shape: tuple[int, ...] | None = None
    restored: dict[str, Array] = {}
    for name in names:
        wire_name = KV_PREFIX + name
        value = tensors[wire_name]
        if not isinstance(value, np.ndarray):
            raise PayloadError(f"kv tensor {wire_name!r} is not an array")
        want = np.dtype(np.float16 if fmt == "fp16" else np.int8)
        if value.dtype != want:
            raise PayloadError(
                f"kv tensor {wire_name!r} has dtype {value.dtype.name}, "
                f"format {fmt} sends {want.name}"
            )
        if value.ndim != 4 or value.shape[0] != 1:
            raise PayloadError(
                f"kv tensor {wire_name!r} must be (1, heads, tokens, head_dim), "
                f"not {list(value.shape)}"
            )
        if shape is None:
            shape = value.shape
        elif value.shape != shape:
            raise PayloadError(
                f"kv tensor {wire_name!r} has shape {list(value.shape)}, the others {list(shape)}"
            )
        if value.shape[2] != len(token_ids):
            raise PayloadError(
                f"kv tensor {wire_name!r} covers {value.shape[2]} positions, "
                f"the metadata lists {len(token_ids)} token ids"
            )
        if fmt == "fp16":
            if not np.isfinite(value).all():
                raise PayloadError(f"kv tensor {wire_name!r} holds NaN or infinity")
            restored[name] = value.astype(target)
            continue
        scale = tensors[wire_name + SCALE_SUFFIX]
        if not isinstance(scale, np.ndarray) or scale.dtype != np.float16:
            raise PayloadError(f"kv scale {wire_name + SCALE_SUFFIX!r} must be float16")
        if scale.shape != value.shape[:3]:
            raise PayloadError(
                f"kv scale {wire_name + SCALE_SUFFIX!r} has shape {list(scale.shape)}, "
                f"expected {list(value.shape[:3])}"
            )
        if not np.isfinite(scale).all() or (scale < 0).any():
            raise PayloadError(f"kv scale {wire_name + SCALE_SUFFIX!r} is negative or not finite")
        x = value.astype(np.float32) * scale.astype(np.float32)[..., None]
        restored[name] = x.astype(target)
    return KvCache([int(i) for i in token_ids], restored)


def _check_format(fmt: object) -> None:
    if fmt not in KV_FORMATS:
        raise ValueError(f"kv format must be one of {', '.join(KV_FORMATS)}, not {fmt!r}")
