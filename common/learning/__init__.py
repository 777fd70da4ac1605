"""Light pieces of federated learning (pure Python + numpy): local data sets and their errors."""

from edgefed.common.learning.data import (
    TASKS,
    LocalExample,
    read_local_dataset,
    write_local_dataset,
)
from edgefed.common.learning.errors import LearningError, TrainingDataError

__all__ = [
    "TASKS",
    "LearningError",
    "LocalExample",
    "TrainingDataError",
    "read_local_dataset",
    "write_local_dataset",
]
