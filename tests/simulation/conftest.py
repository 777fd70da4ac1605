"""Fixtures of the simulation harness's tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported (unsigned) tiny embedding model: the end-to-end world's ``good`` source.
    Imported here so that tests without it do not import torch."""
    from tests.cloud.e2e.world import build_sources

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return build_sources(tmp_path_factory.mktemp("sim-sources"))["good"]
