"""Cut a Hugging Face transformer into a head (embeddings + layers[0:k]) and a tail
(layers[k:] + final norm / pooling / task head), each exported as its own ONNX graph.

Split points: ``k = 0`` is all-cloud and ``k = num_layers`` all-edge; both use the full model and
need no split graphs. Every ``1 <= k < num_layers`` gives a pair of graphs:

==========  ================================================  ===================================
family      head graph (runs on the device)                   tail graph (runs in the cloud)
==========  ================================================  ===================================
encoder     ``input_ids``, ``attention_mask``                 ``hidden_states``, ``attention_mask``
(BERT)      [, ``token_type_ids``] → ``hidden_states``        → ``last_hidden_state`` (feature
            ``(batch, sequence, hidden)``                     extraction) or ``logits``
                                                              (classification), as the full export
decoder     ``input_ids``, ``attention_mask`` (past + new),   ``hidden_states``, ``attention_mask``
(GPT-2,     ``position_ids``, ``past_key_values.{i}.key|      [, ``position_ids``], its own
Llama)      value`` for its layers → ``hidden_states``,       ``past_key_values.{i}.*`` →
            ``present.{i}.key|value``                         ``logits``, ``present.{i}.*``
==========  ================================================  ===================================

Layer indices ``i`` in cache names are the model's own (the tail's first layer is ``k``). After a
decoder's prompt, one hidden vector ``(batch, 1, hidden)`` per generated token crosses the link
(with the attention mask); see :mod:`.partition_generate`.

Graphs are exported with torch's legacy (TorchScript) exporter, ``dynamo=False`` (STACK.md: both
exporters work with torch 2.13; the legacy one needs no ``onnxscript`` and is several times faster
on these small wrappers), opset 18, dynamic batch and sequence axes.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edgefed.cloud.compress.config import TASKS, Task
from edgefed.cloud.compress.export import TOKENIZER_FILES
from edgefed.cloud.split.errors import (
    NotAModelError,
    SplitPointError,
    UnsupportedModelError,
)

log = logging.getLogger(__name__)

__all__ = [
    "DECODER_TYPES",
    "ENCODER_TYPES",
    "HEAD_DIR",
    "SPLIT_CONFIG_KEY",
    "TAIL_DIR",
    "ModelShape",
    "SplitPair",
    "candidate_points",
    "check_split_point",
    "export_split",
    "inspect_model",
]

Family = Literal["encoder", "decoder"]
Role = Literal["head", "tail"]

#: ``config.model_type`` values whose encoders can be split (embeddings + ``encoder.layer``).
ENCODER_TYPES: frozenset[str] = frozenset({"bert"})
#: ``config.model_type`` values whose decoders can be split with a KV cache on each side.
DECODER_TYPES: frozenset[str] = frozenset({"gpt2", "llama"})
#: Sub-folders :func:`export_split` writes below its output directory.
HEAD_DIR = "head"
TAIL_DIR = "tail"
#: Key added to each side's ``config.json``: ``{"role", "split_point", "num_layers", ...}``.
SPLIT_CONFIG_KEY = "edgefed_split"
#: Opset of the exported graphs (the project's default, STACK.md).
OPSET = 18
_FAMILY_TASKS: dict[Family, tuple[Task, ...]] = {
    "encoder": ("feature-extraction", "text-classification"),
    "decoder": ("text-generation",),
}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the partitioner needs to know about a model directory."""

    model_type: str
    family: Family
    num_layers: int
    hidden_size: int


@dataclass(frozen=True, slots=True)
class SplitPair:
    """A head and a tail graph cut at layer ``k`` (each folder holds ``model.onnx`` and a
    ``config.json``; the head also the tokenizer files)."""

    head_dir: Path
    tail_dir: Path
    k: int
    num_layers: int
    hidden_size: int
    task: Task
    family: Family


def _read_config(model_dir: Path) -> dict[str, Any]:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise NotAModelError(f"model directory {model_dir} does not exist")
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise NotAModelError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotAModelError(f"{config_file} is not readable JSON: {exc}") from exc
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise NotAModelError(f"{config_file} names no model_type; not a Hugging Face config")
    return config


def _int_field(config: dict[str, Any], names: tuple[str, ...], where: Path) -> int:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise NotAModelError(f"{where}/config.json has none of {', '.join(names)}")


def inspect_model(model_dir: Path) -> ModelShape:
    """Family, depth and width of the model in ``model_dir``, read from its ``config.json``.

    Raises :class:`NotAModelError` for a missing directory or config, and
    :class:`UnsupportedModelError` for a model type that cannot be split.
    """
    config = _read_config(Path(model_dir))
    model_type = config["model_type"]
    family: Family
    if model_type in ENCODER_TYPES:
        family = "encoder"
    elif model_type in DECODER_TYPES:
        family = "decoder"
    else:
        known = ", ".join(sorted(ENCODER_TYPES | DECODER_TYPES))
        raise UnsupportedModelError(
            f"cannot split a {model_type!r} model ({model_dir}); supported model types: {known}"
        )
    return ModelShape(
        model_type=model_type,
        family=family,
        num_layers=_int_field(config, ("num_hidden_layers", "n_layer"), Path(model_dir)),
        hidden_size=_int_field(config, ("hidden_size", "n_embd"), Path(model_dir)),
    )


def candidate_points(num_layers: int) -> tuple[int, ...]:
    """Every split option of a ``num_layers``-layer model: ``0`` (all-cloud), ``1 ..
    num_layers - 1`` (head + tail graphs) and ``num_layers`` (all-edge)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise SplitPointError(f"a model needs at least one layer, got num_layers={num_layers!r}")
    return tuple(range(num_layers + 1))


def check_split_point(k: int, num_layers: int) -> None:
    """Raise :class:`SplitPointError` unless ``1 <= k < num_layers`` (a point with two graphs)."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise SplitPointError(f"split point must be an integer, got {k!r}")
    if k == 0:
        raise SplitPointError(
            "split point k=0 is all-cloud: serve the full model in the cloud, no split graphs"
        )
    if k == num_layers:
        raise SplitPointError(
            f"split point k={k} is all-edge (the model has {num_layers} layers): "
            "serve the full model on the device, no split graphs"
        )
    if not 0 < k < num_layers:
        raise SplitPointError(
            f"split point k={k} is out of range: the model has {num_layers} layers, "
            f"so a split needs 1 <= k <= {num_layers - 1}"
        )


def _write_side(
    model_dir: Path, side_dir: Path, role: Role, k: int, shape: ModelShape, task: Task
) -> None:
    """config.json with the split section; tokenizer and generation files for the head."""
    config = _read_config(model_dir)
    config[SPLIT_CONFIG_KEY] = {
        "role": role,
        "split_point": k,
        "num_layers": shape.num_layers,
        "hidden_size": shape.hidden_size,
        "task": task,
        "family": shape.family,
    }
    (side_dir / "config.json").write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    wanted = TOKENIZER_FILES if role == "head" else ("generation_config.json",)
    for name in wanted:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, side_dir / name)


def _as_task(task: str) -> Task:
    for known in TASKS:
        if known == task:
            return known
    raise UnsupportedModelError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def export_split(model_dir: Path, out_dir: Path, k: int, *, task: str) -> SplitPair:
    """Export the head (layers[0:k]) and tail (layers[k:]) of the model in ``model_dir`` to
    ``out_dir/head`` and ``out_dir/tail`` (see the module table for inputs and outputs).

    ``task`` is ``feature-extraction`` or ``text-classification`` for encoders,
    ``text-generation`` for decoders. Raises :class:`NotAModelError`,
    :class:`UnsupportedModelError` (model type or task), :class:`SplitPointError` (``k``) or
    :class:`~edgefed.cloud.split.errors.SplitExportError`.
    """
    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    checked = _as_task(task)
    shape = inspect_model(model_dir)
    if checked not in _FAMILY_TASKS[shape.family]:
        raise UnsupportedModelError(
            f"a {shape.model_type} {shape.family} cannot be split for task {checked!r}; "
            f"its tasks: {', '.join(_FAMILY_TASKS[shape.family])}"
        )
    check_split_point(k, shape.num_layers)
    head_dir, tail_dir = out_dir / HEAD_DIR, out_dir / TAIL_DIR
    for side in (head_dir, tail_dir):
        side.mkdir(parents=True, exist_ok=True)
        for stale in side.glob("model.onnx*"):
            stale.unlink()
    log.debug("splitting %s (%s) at k=%d into %s", model_dir, checked, k, out_dir)
    if shape.family == "encoder":
        from edgefed.cloud.split.partition_encoder import export_encoder_split

        export_encoder_split(model_dir, head_dir, tail_dir, k, task=checked)
    else:
        from edgefed.cloud.split.partition_decoder import export_decoder_split

        export_decoder_split(model_dir, head_dir, tail_dir, k)
    _write_side(model_dir, head_dir, "head", k, shape, checked)
    _write_side(model_dir, tail_dir, "tail", k, shape, checked)
    return SplitPair(
        head_dir=head_dir,
        tail_dir=tail_dir,
        k=k,
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        task=checked,
        family=shape.family,
    )
