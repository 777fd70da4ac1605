"""What a training mode makes trainable, and LoRA adapters that merge back into the base weights.

``full`` trains everything. ``top-layers`` freezes the embeddings and all but the last ``k``
transformer layers: the cheap option on a Jetson, since no gradient flows into the frozen bottom.
``head`` is ``top-layers`` with no layers, i.e. the classifier (and its pooler). ``lora`` trains
rank-``r`` adapters on the attention query/value projections (plus a classifier's head, which
LoRA alone cannot learn) and merges them into the base weights afterwards, so the update has the
model's own keys and shapes and any strategy can aggregate it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from edgefed.common.training.errors import TrainingError
from edgefed.common.training.model import encoder_layers

if TYPE_CHECKING:
    from edgefed.common.training.model import FederatedModel
    from edgefed.common.training.settings import TrainSettings

# Path components that mark input embeddings (word, position, token-type tables and their norm).
_EMBEDDING_PARTS = frozenset(
    {"embeddings", "word_embeddings", "embed_tokens", "embed_positions", "wte", "wpe"}
)
# Attention query/value projections by architecture family (BERT-likes, DistilBERT, most others).
_LORA_TARGETS = (("query", "value"), ("q_lin", "v_lin"), ("q_proj", "v_proj"))


def select_trainable(fm: FederatedModel, settings: TrainSettings) -> list[str]:
    """Set ``requires_grad`` on ``fm.model`` for ``settings.mode`` (not ``lora``: see
    :func:`add_lora`) and return the names of the trainable parameters."""
    model = fm.model
    if settings.mode == "full":
        names = [name for name, _ in model.named_parameters()]
    else:
        keep = settings.top_layers if settings.mode == "top-layers" else 0
        names = _above_layers(fm, keep)
    _set_trainable(model, set(names))
    if not names:
        raise TrainingError(
            f"train-mode {settings.mode!r} leaves nothing to train in this {fm.task} model "
            "(mean pooling uses no head); use top-layers, lora or full"
        )
    return names


def _above_layers(fm: FederatedModel, keep: int) -> list[str]:
    """Parameters of the last ``keep`` layers and of everything above the layer stack."""
    layers = encoder_layers(fm.model)
    if not layers:
        raise TrainingError(f"cannot find the transformer layers of {type(fm.model).__name__}")
    if keep > len(layers):
        raise TrainingError(
            f"top-layers {keep} exceeds the model's {len(layers)} transformer layers"
        )
    frozen_layers = layers[: len(layers) - keep]
    frozen = {id(p) for layer in frozen_layers for p in layer.parameters()}
    names = []
    for name, param in fm.model.named_parameters():
        parts = set(name.split("."))
        if id(param) in frozen or parts & _EMBEDDING_PARTS:
            continue
        if fm.task == "feature-extraction" and "pooler" in parts:
            continue  # mean pooling never uses the pooler: it would get no gradient
        names.append(name)
    return names


def _set_trainable(model: torch.nn.Module, names: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)


def make_all_trainable(model: torch.nn.Module) -> None:
    """Undo a mode's freezing, so the next caller starts from a plain model."""
    for param in model.parameters():
        param.requires_grad_(True)


def add_lora(fm: FederatedModel, settings: TrainSettings) -> torch.nn.Module:
    """Wrap ``fm.model`` with LoRA adapters (the classifier head stays trainable) and return the
    wrapped model; :func:`merge_lora` undoes it."""
    from peft import LoraConfig, get_peft_model  # heavy; only the lora mode needs it

    targets = _lora_targets(fm.model)
    head = set(_above_layers(fm, 0)) if fm.task == "text-classification" else set()
    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=2 * settings.lora_rank,
        lora_dropout=0.0,
        target_modules=list(targets),
        bias="none",
    )
    peft_model = get_peft_model(fm.model, config)
    # peft froze every base weight; the head is trained in full (LoRA alone cannot learn labels).
    for name, param in fm.model.named_parameters():
        if name in head:
            param.requires_grad_(True)
    wrapped: torch.nn.Module = peft_model
    return wrapped


def merge_lora(wrapped: torch.nn.Module) -> torch.nn.Module:
    """Merge the adapters into the base weights and return the plain model (original keys)."""
    merged: torch.nn.Module = wrapped.merge_and_unload()  # type: ignore[operator]
    return merged


def _lora_targets(model: torch.nn.Module) -> tuple[str, str]:
    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)}
    for pair in _LORA_TARGETS:
        if set(pair) <= leaves:
            return pair
    raise TrainingError(
        f"cannot find attention query/value projections in {type(model).__name__} for LoRA "
        f"(looked for {', '.join('/'.join(p) for p in _LORA_TARGETS)})"
    )


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear)
