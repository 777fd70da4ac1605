"""Errors of federated learning's light side. Both are permanent: the same data set or the same
configuration fails the same way again, so a client refuses instead of retrying."""

from __future__ import annotations

from edgefed.common.errors import PermanentError


class LearningError(PermanentError):
    """Base of the errors of local training and its data (``common.learning``,
    ``common.training`` and the Flower client)."""


class TrainingDataError(LearningError):
    """A local data set is missing, empty or malformed; the message names ``file:line`` and what
    was wrong, so the device's owner can fix the file."""

    exit_code = 65  # EX_DATAERR
