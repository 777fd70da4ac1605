"""Head and tail wrappers for BERT-family encoders (``embeddings`` + ``encoder.layer``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgefed.cloud.compress.config import Task
from edgefed.cloud.split.partition_torch import export_module, load_model

#: Names of the tensors that cross the link between head and tail.
HIDDEN = "hidden_states"


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(batch, seq)`` 0/1 mask → ``(batch, 1, 1, seq)`` additive mask, as BERT's eager path."""
    mask = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def _run_layers(layers: nn.ModuleList, hidden: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    bias = _additive_mask(attention_mask, hidden.dtype)
    for layer in layers:
        hidden = layer(hidden, attention_mask=bias)[0]
    return hidden


class EncoderHead(nn.Module):
    """embeddings + layers[0:k] → hidden states ``(batch, seq, hidden)``."""

    def __init__(self, encoder_model: Any, k: int, *, token_types: bool) -> None:
        super().__init__()
        self.embeddings = encoder_model.embeddings
        self.layers = nn.ModuleList(list(encoder_model.encoder.layer[:k]))
        self.token_types = token_types

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> Any:
        if self.token_types:
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        else:
            hidden = self.embeddings(input_ids=input_ids)
        return _run_layers(self.layers, hidden, attention_mask)


class EncoderTail(nn.Module):
    """layers[k:] → last hidden state, or (with a classifier) pooler + classifier → logits."""

    def __init__(self, model: Any, k: int, *, task: Task) -> None:
        super().__init__()
        encoder_model = model.base_model
        self.layers = nn.ModuleList(list(encoder_model.encoder.layer[k:]))
        self.task = task
        if task == "text-classification":
            self.pooler = encoder_model.pooler
            self.dropout = model.dropout
            self.classifier = model.classifier

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        hidden = _run_layers(self.layers, hidden_states, attention_mask)
        if self.task != "text-classification":
            return hidden
        return self.classifier(self.dropout(self.pooler(hidden)))


def export_encoder_split(
    model_dir: Path, head_dir: Path, tail_dir: Path, k: int, *, task: Task, opset: int = 18
) -> None:
    """Write ``head_dir/model.onnx`` and ``tail_dir/model.onnx`` for the encoder split at ``k``."""
    model = load_model(model_dir, task)
    base = model.base_model
    token_types = getattr(base.embeddings, "token_type_embeddings", None) is not None
    batch, seq = 2, 5
    ids = torch.ones((batch, seq), dtype=torch.long)
    mask = torch.ones((batch, seq), dtype=torch.long)
    mask[1, -2:] = 0
    axes = {0: "batch", 1: "sequence"}
    head = EncoderHead(base, k, token_types=token_types).eval()
    head_inputs = ["input_ids", "attention_mask"]
    head_args: tuple[Any, ...] = (ids, mask)
    if token_types:
        head_inputs.append("token_type_ids")
        head_args = (ids, mask, torch.zeros_like(ids))
    what = f"{model_dir} split at k={k}"
    export_module(
        head,
        head_args,
        head_dir,
        input_names=head_inputs,
        output_names=[HIDDEN],
        dynamic_axes={name: axes for name in [*head_inputs, HIDDEN]},
        opset=opset,
        what=f"{what} (head)",
    )
    with torch.no_grad():
        hidden = head(*head_args)
    output = "logits" if task == "text-classification" else "last_hidden_state"
    export_module(
        EncoderTail(model, k, task=task).eval(),
        (hidden, mask),
        tail_dir,
        input_names=[HIDDEN, "attention_mask"],
        output_names=[output],
        dynamic_axes={
            HIDDEN: axes,
            "attention_mask": axes,
            output: {0: "batch"} if output == "logits" else axes,
        },
        opset=opset,
        what=f"{what} (tail)",
    )
