"""Fixtures of the edge agent's tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .tiny_artifacts import TinyArtifacts


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> TinyArtifacts:
    """Three tiny models (embeddings, 3-label classifier, GPT-2 with a KV cache) exported to ONNX
    and signed as artifacts, built once per test session (~10 s). Imported here, not at the top,
    so that tests that do not need them do not import torch."""
    from .tiny_artifacts import build_tiny_artifacts

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return build_tiny_artifacts(tmp_path_factory.mktemp("tiny-artifacts"))
