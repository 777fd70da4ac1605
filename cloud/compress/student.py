"""The student: the teacher with fewer transformer layers, each initialised from the teacher layer
it replaces; embeddings, final norms, poolers and task heads are copied unchanged.

Which teacher layer each student layer came from is recorded in the student's config as
``edgefed_teacher_layers`` (a plain config attribute, so it survives ``save_pretrained`` and
``from_pretrained``); distillation aligns hidden states along that mapping.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from edgefed.cloud.compress.config import StudentSpec
from edgefed.cloud.compress.errors import StudentError

log = logging.getLogger(__name__)

TEACHER_LAYERS_ATTR = "edgefed_teacher_layers"
"""Config attribute listing, per student layer, the teacher layer index it was initialised from."""

_STACK_PATHS: tuple[tuple[str, ...], ...] = (
    ("encoder", "layer"),  # BERT, RoBERTa, XLM-R, MiniLM, ELECTRA
    ("transformer", "layer"),  # DistilBERT
    ("h",),  # GPT-2 (GPT2Model)
    ("layers",),  # Llama, Qwen2/3, Mistral, SmolLM (LlamaModel & co.)
    ("transformer", "h"),  # GPT-2 head models, when reached from the top
    ("model", "layers"),  # Llama-family head models, when reached from the top
)

_PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")
"""Config attributes holding one entry per layer (newer Llama/Qwen configs)."""


# --------------------------------------------------------------------------- layer choice


def select_layers(n_teacher: int, spec: StudentSpec) -> list[int]:
    """Teacher layer indices the student keeps.

    Explicit ``spec.layers`` are validated (in range, strictly increasing, non-empty). A
    ``spec.depth`` spreads that many layers evenly from the first to the last teacher layer,
    ``round(i * (n - 1) / (depth - 1))`` (3 of 6 gives ``[0, 2, 5]``, 2 of 6 ``[0, 5]``); depth 1
    keeps layer 0, the one trained on the embeddings' output. Neither: half the teacher's depth.
    """
    if n_teacher < 1:
        raise StudentError(f"the teacher has no transformer layers ({n_teacher})")
    if spec.layers is not None:
        layers = list(spec.layers)
        _check_layers(layers, n_teacher)
        return layers
    depth = spec.depth if spec.depth is not None else max(1, n_teacher // 2)
    _check_depth(depth, n_teacher)
    if depth == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (depth - 1)) for i in range(depth)]


def _check_depth(depth: int, n_teacher: int) -> None:
    if depth > n_teacher:
        raise StudentError(f"student has more layers than the teacher ({depth} > {n_teacher})")
    if depth < 1:
        raise StudentError(f"student needs at least one layer, got depth {depth}")


def _check_layers(layers: Sequence[int], n_teacher: int) -> None:
    if not layers:
        raise StudentError("student layer list is empty: keep at least one teacher layer")
    _check_depth(len(layers), n_teacher)
    outside = [i for i in layers if not 0 <= i < n_teacher]
    if outside:
        raise StudentError(
            f"student layer indices {outside} are outside the teacher's layers 0..{n_teacher - 1}"
        )
    if any(b <= a for a, b in itertools.pairwise(layers)):
        raise StudentError(f"student layer indices must be strictly increasing, got {list(layers)}")


# --------------------------------------------------------------------------- model surgery


def layer_stack(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The list of transformer layers of a base model or a task-head model of a supported
    family (BERT-like encoders, DistilBERT, GPT-2, Llama/Qwen/SmolLM decoders)."""
    parent, attr = _locate_stack(model)
    stack = getattr(parent, attr)
    assert isinstance(stack, torch.nn.ModuleList)  # checked by _locate_stack
    return stack


def _locate_stack(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """The module holding the layer list and the list's attribute name."""
    base = getattr(model, "base_model", model)
    for root in (base, model):
        for path in _STACK_PATHS:
            parent: object = root
            for name in path[:-1]:
                parent = getattr(parent, name, None)
            if isinstance(parent, torch.nn.Module) and isinstance(
                getattr(parent, path[-1], None), torch.nn.ModuleList
            ):
                return parent, path[-1]
    raise StudentError(
        f"unsupported architecture {type(model).__name__}: cannot find its transformer layers "
        "(supported: BERT-like encoders, DistilBERT, GPT-2, Llama/Qwen/SmolLM decoders)"
    )


def build_student(teacher_model: PreTrainedModel, layers: Sequence[int]) -> PreTrainedModel:
    """A copy of ``teacher_model`` that keeps only the teacher layers ``layers``, in that order.

    The teacher is not changed. The copy's config says how many layers it has, per-layer config
    lists (``layer_types``) and per-layer ``layer_idx`` attributes (KV cache slots) are renumbered,
    and ``config.edgefed_teacher_layers`` records the mapping for distillation.
    """
    parent, attr = _locate_stack(teacher_model)
    full = layer_stack(teacher_model)
    kept_layers = list(layers)
    _check_layers(kept_layers, len(full))
    # Copy with only the kept layers attached, so the dropped ones are never copied.
    setattr(parent, attr, torch.nn.ModuleList([full[i] for i in kept_layers]))
    try:
        student = copy.deepcopy(teacher_model)
    finally:
        setattr(parent, attr, full)
    _renumber_layers(layer_stack(student))
    _update_config(student, kept_layers)
    return student


def _renumber_layers(stack: torch.nn.ModuleList) -> None:
    """Give every module of layer j ``layer_idx = j`` where it has one (attention modules use it
    as their slot in the KV cache, and a reloaded model numbers its layers this way)."""
    for index, layer in enumerate(stack):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                setattr(module, "layer_idx", index)  # noqa: B010 - typed Module attribute


def _update_config(student: PreTrainedModel, layers: list[int]) -> None:
    config = student.config
    # num_hidden_layers maps to n_layer (GPT-2) or n_layers (DistilBERT) through attribute_map.
    config.num_hidden_layers = len(layers)
    for name in _PER_LAYER_CONFIG_LISTS:
        values = getattr(config, name, None)
        if isinstance(values, list | tuple) and values:
            setattr(config, name, [values[i] for i in layers])
    setattr(config, TEACHER_LAYERS_ATTR, list(layers))


def teacher_layer_map(student: PreTrainedModel, n_teacher: int) -> list[int]:
    """For each student layer, the teacher layer it stands for: the mapping recorded by
    :func:`build_student`, or (for a student built elsewhere) an even spread."""
    n_student = len(layer_stack(student))
    recorded = getattr(student.config, TEACHER_LAYERS_ATTR, None)
    if isinstance(recorded, list) and all(isinstance(i, int) for i in recorded):
        try:
            _check_layers(recorded, n_teacher)
        except StudentError as exc:
            log.warning("ignoring the student's recorded teacher layers: %s", exc)
        else:
            if len(recorded) == n_student:
                return list(recorded)
            log.warning(
                "the student records %d teacher layers but has %d; mapping evenly",
                len(recorded),
                n_student,
            )
    return select_layers(n_teacher, StudentSpec(depth=n_student))


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights such as GPT-2's input/output embedding count once)."""
    return sum(p.numel() for p in model.parameters())
