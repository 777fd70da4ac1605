"""Named numpy arrays <-> Flower ArrayRecords (the server side keeps its own copy)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding ``arrays`` under their names, in their order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The named numpy arrays of ``record``, in its order."""
    return {name: array.numpy() for name, array in record.items()}
