"""torch helpers shared by the encoder and decoder partitioners: loading the model for a task and
exporting one wrapper module with the legacy ONNX exporter."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgefed.cloud.compress.config import Task
from edgefed.cloud.split.errors import SplitExportError, UnsupportedModelError

MODEL_FILE = "model.onnx"


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Drop tracer warnings and transformers/torch.onnx chatter during an export (restored)."""
    loggers = [logging.getLogger(name) for name in ("transformers", "torch.onnx")]
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


def load_model(model_dir: Path, task: Task) -> Any:
    """The model for ``task`` in float32 eval mode with eager attention (the wrappers call its
    submodules; eager attention takes the additive 4-D mask they build)."""
    import torch
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    architectures = list(getattr(config, "architectures", None) or [])
    if task == "text-classification" and not any(
        a.endswith("ForSequenceClassification") for a in architectures
    ):
        raise UnsupportedModelError(
            f"{model_dir} has no sequence-classification head (architectures: "
            f"{', '.join(architectures) or 'none'}); split it for feature-extraction instead"
        )
    loader: Any = {
        "feature-extraction": AutoModel,
        "text-classification": AutoModelForSequenceClassification,
        "text-generation": AutoModelForCausalLM,
    }[task]
    try:
        with quiet_export():
            model = loader.from_pretrained(
                model_dir,
                local_files_only=True,
                torch_dtype=torch.float32,
                attn_implementation="eager",
            )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise SplitExportError(
            f"cannot load {model_dir} for {task}: {type(exc).__name__}: {exc}"
        ) from exc
    model.eval()
    return model


def export_module(
    module: Any,
    args: tuple[Any, ...],
    out_dir: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int,
    what: str,
) -> Path:
    """Export ``module(*args)`` to ``out_dir/model.onnx`` (legacy exporter, constant folding on)."""
    import torch

    path = out_dir / MODEL_FILE
    try:
        with quiet_export(), torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                input_names=list(input_names),
                output_names=list(output_names),
                dynamic_axes={name: dict(axes) for name, axes in dynamic_axes.items()},
                opset_version=opset,
                do_constant_folding=True,
            )
    except Exception as exc:  # the tracer raises anything from RuntimeError to TypeError
        raise SplitExportError(f"{what}: ONNX export failed: {type(exc).__name__}: {exc}") from exc
    if not path.is_file():
        raise SplitExportError(f"{what}: the exporter wrote no {path}")
    return path
