"""The error of the torch task: a model or settings that cannot be trained as asked."""

from __future__ import annotations

from edgefed.common.learning.errors import LearningError


class TrainingError(LearningError):
    """A bad model config, tokenizer, training setting or array set; the message names the
    offending keys, shapes or values."""
