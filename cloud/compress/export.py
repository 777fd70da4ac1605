"""Export a Hugging Face model directory to ONNX with Optimum, and check the export against torch.

The export is the plain (unoptimised) graph: quantization needs it (quantizing an O2-optimised
graph fails), and ONNX Runtime applies its own graph optimisations when it loads a session.
Decoders are exported with a KV cache (``text-generation-with-past``), so the same graph serves
the first pass (empty past) and every later token.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edgefed.cloud.compress.config import Task
from edgefed.cloud.compress.errors import ExportError
from edgefed.cloud.compress.runtime import OnnxRunner, TorchRunner, find_onnx_model, tokenize

log = logging.getLogger(__name__)

__all__ = [
    "OPTIMUM_TASKS",
    "TOKENIZER_FILES",
    "ParityReport",
    "check_parity",
    "export_onnx",
    "require_parity",
]

#: Optimum's export task for each edgefed task.
OPTIMUM_TASKS: dict[Task, str] = {
    "feature-extraction": "feature-extraction",
    "text-classification": "text-classification",
    "text-generation": "text-generation-with-past",
}

#: Files next to a model that the tokenizer (and generation) need at inference time.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
    "generation_config.json",
)


@contextlib.contextmanager
def _quiet_optimum() -> Iterator[None]:
    """Silence the tracer warnings and Optimum/transformers chatter of an export (restored after).

    Errors still surface as exceptions; only warnings and info messages are dropped.
    """
    loggers = [logging.getLogger(name) for name in ("optimum", "transformers", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def export_onnx(model_dir: Path, out_dir: Path, task: Task, *, opset: int = 18) -> Path:
    """Export the model in ``model_dir`` for ``task`` to ``out_dir/model.onnx`` (opset ``opset``).

    Uses ``optimum.exporters.onnx.main_export`` from local files only, with Optimum's own
    validation off (:func:`check_parity` does that against our runners). Large models get their
    weights in ``model.onnx_data`` next to the graph. Config and tokenizer files are copied, so
    ``out_dir`` is a complete model folder. Returns ``out_dir``.

    Raises :class:`ExportError` naming the task and the cause for anything that goes wrong: a
    directory that does not exist or holds no ``config.json``, an unknown task, an architecture
    Optimum cannot export, an export that produced no ``model.onnx``.
    """
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    if task not in OPTIMUM_TASKS:
        raise ExportError(
            f"cannot export for task {task!r}; known tasks: {', '.join(OPTIMUM_TASKS)}"
        )
    optimum_task = OPTIMUM_TASKS[task]
    if not model_dir.is_dir():
        raise ExportError(f"{task} export: model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise ExportError(
            f"{task} export: {model_dir} is not a Hugging Face model directory (no config.json)"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("model.onnx", "model.onnx_data"):
        (out_dir / stale).unlink(missing_ok=True)

    log.debug("exporting %s (%s) to ONNX opset %d in %s", model_dir, optimum_task, opset, out_dir)
    try:
        from optimum.exporters.onnx import main_export  # type: ignore[import-untyped]

        with _quiet_optimum():
            main_export(
                str(model_dir),
                output=out_dir,
                task=optimum_task,
                opset=opset,
                local_files_only=True,
                do_validation=False,
                library_name="transformers",
            )
    except Exception as exc:  # Optimum/torch raise anything from KeyError to RuntimeError
        raise ExportError(
            f"{task} export of {model_dir} failed: {type(exc).__name__}: {exc}"
        ) from exc
    if not (out_dir / "model.onnx").is_file():
        produced = ", ".join(sorted(p.name for p in out_dir.iterdir())) or "nothing"
        raise ExportError(f"{task} export of {model_dir} produced no model.onnx (got {produced})")
    _copy_tokenizer_files(model_dir, out_dir)
    if not (out_dir / "config.json").exists():
        shutil.copy2(model_dir / "config.json", out_dir / "config.json")
    return out_dir


@dataclass
class ParityReport:
    """How closely an ONNX export reproduces the torch model on a few texts."""

    max_abs_diff: float
    """Largest absolute difference over all compared values."""
    cosine_min: float
    """Smallest cosine similarity between a torch row and its ONNX row (per example for
    embeddings and classification logits, per real token for decoder logits)."""
    passed: bool
    detail: str
    """One line with the numbers and the thresholds."""


def _comparable_rows(
    out: npt.NDArray[np.float32], mask: npt.NDArray[np.int64], task: Task
) -> npt.NDArray[np.float64]:
    """2-D rows to compare: examples, or for decoder logits the real (unpadded) tokens."""
    arr = np.asarray(out, dtype=np.float64)
    if task == "text-generation" and arr.ndim == 3:
        rows: npt.NDArray[np.float64] = arr[mask.astype(bool)]
        return rows
    return arr.reshape(arr.shape[0], -1)


def _row_cosines(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    # Two all-zero rows are identical; one zero row against a non-zero one is not.
    both_zero = den == 0
    cos = np.where(both_zero, 1.0, num / np.where(both_zero, 1.0, den))
    return np.asarray(cos, dtype=np.float64)


def check_parity(
    torch_model: Any,
    tokenizer: Any,
    onnx_dir: Path,
    task: Task,
    texts: Sequence[str],
    *,
    atol: float = 1e-4,
    min_cosine: float = 0.9999,
    max_length: int = 64,
) -> ParityReport:
    """Compare the torch model with its ONNX export on ``texts`` (one padded batch).

    ``passed`` when every value is within ``atol`` or every row's cosine is at least
    ``min_cosine`` (large logits can differ by more than ``atol`` while still agreeing to many
    digits). Raises :class:`ExportError` only when the ONNX model cannot be loaded or run.
    """
    if not texts:
        raise ExportError("parity check needs at least one text")
    ids, mask = tokenize(tokenizer, texts, max_length=max_length)
    expected = TorchRunner(torch_model, task).outputs(ids, mask)
    runner = OnnxRunner(Path(onnx_dir), task)
    try:
        got = runner.outputs(ids, mask)
    except Exception as exc:  # ORT's runtime errors are untyped
        raise ExportError(
            f"{task}: ONNX model {runner.model_path} failed to run: {type(exc).__name__}: {exc}"
        ) from exc
    if got.shape != expected.shape:
        return ParityReport(
            max_abs_diff=float("inf"),
            cosine_min=-1.0,
            passed=False,
            detail=f"{task}: output shape {got.shape} (onnx) != {expected.shape} (torch)",
        )
    a = _comparable_rows(expected, mask, task)
    b = _comparable_rows(got, mask, task)
    finite = bool(np.isfinite(b).all())
    max_abs = float(np.abs(a - b).max()) if finite else float("inf")
    cos_min = float(_row_cosines(a, b).min()) if finite else -1.0
    passed = finite and (max_abs <= atol or cos_min >= min_cosine)
    detail = (
        f"{task}: max |torch - onnx| = {max_abs:.3g} (atol {atol:g}), min row cosine = "
        f"{cos_min:.6f} (min {min_cosine:g}) over {a.shape[0]} rows of {len(texts)} texts: "
        f"{'passed' if passed else 'FAILED'}"
    )
    log.debug("parity %s", detail)
    return ParityReport(max_abs_diff=max_abs, cosine_min=cos_min, passed=passed, detail=detail)


def require_parity(
    torch_model: Any,
    tokenizer: Any,
    onnx_dir: Path,
    task: Task,
    texts: Sequence[str],
    *,
    atol: float = 1e-4,
    min_cosine: float = 0.9999,
    max_length: int = 64,
) -> ParityReport:
    """:func:`check_parity`, raising :class:`ExportError` with the report's numbers on failure."""
    report = check_parity(
        torch_model,
        tokenizer,
        onnx_dir,
        task,
        texts,
        atol=atol,
        min_cosine=min_cosine,
        max_length=max_length,
    )
    if not report.passed:
        raise ExportError(
            f"ONNX export in {find_onnx_model(Path(onnx_dir)).parent} does not match torch: "
            f"{report.detail}"
        )
    return report
