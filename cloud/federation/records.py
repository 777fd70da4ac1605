"""Conversions between Flower records and plain numpy mappings.

The strategies, the validator and the torch task speak ``dict[str, np.ndarray]`` (state-dict
order); Flower speaks :class:`~flwr.app.ArrayRecord`. Arrays are never pickled: Flower's
``Array`` serialises with ``np.save(allow_pickle=False)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from edgefed.cloud.federation.errors import FederationError

NDArray = np.ndarray


def to_numpy(record: ArrayRecord) -> dict[str, NDArray]:
    """Decode every array of ``record``, keeping its key order."""
    try:
        return {key: value.numpy() for key, value in record.items()}
    except (TypeError, ValueError) as exc:
        raise FederationError(f"an ArrayRecord could not be decoded: {exc}") from exc


def to_record(arrays: Mapping[str, NDArray]) -> ArrayRecord:
    """Encode ``arrays`` (in their order) as an ArrayRecord."""
    record = ArrayRecord()
    for key, value in arrays.items():
        record[key] = Array(np.ascontiguousarray(value))
    return record


def flatten(arrays: Mapping[str, NDArray], keys: list[str] | None = None) -> NDArray:
    """All values of ``arrays`` (in ``keys`` order when given) as one float64 vector."""
    names = list(arrays) if keys is None else keys
    if not names:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(arrays[k], dtype=np.float64).ravel() for k in names])


def unflatten(vector: NDArray, like: Mapping[str, NDArray]) -> dict[str, NDArray]:
    """Split ``vector`` into arrays with the keys, shapes and dtypes of ``like``."""
    out: dict[str, NDArray] = {}
    offset = 0
    for key, ref in like.items():
        size = int(np.prod(ref.shape, dtype=np.int64))
        out[key] = vector[offset : offset + size].reshape(ref.shape).astype(ref.dtype)
        offset += size
    if offset != vector.size:
        raise FederationError(f"vector of {vector.size} values does not fit {offset} parameters")
    return out
