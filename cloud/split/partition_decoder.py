"""Head and tail wrappers for decoder LMs, each side with the KV cache of its own layers.

The wrappers call the model's own submodules (embeddings, projections, norms, MLPs) and do the
attention arithmetic themselves, the way the model's eager attention does it, so the cache is
plain tensors in and out (``past_key_values.{i}.key|value`` → ``present.{i}.key|value``, shaped
``(batch, kv_heads, sequence, head_dim)``) instead of a transformers ``Cache`` object.

The causal mask is built inside the graph from the attention mask (past + new tokens) with tensor
operations only, so batch, new-token count and cache length are all dynamic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from edgefed.cloud.split.errors import UnsupportedModelError
from edgefed.cloud.split.partition_torch import export_module, load_model

Role = Literal["head", "tail"]
HIDDEN = "hidden_states"


def past_names(layers: range) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")]


def present_names(layers: range) -> list[str]:
    return [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")]


def _allowed(attention_mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``(batch, 1, new, total)``: key j is visible to new token q when j <= its position and
    the mask keeps j. Built from tensor ops only (no Python ints from shapes)."""
    total_idx = torch.cumsum(torch.ones_like(attention_mask[0]), 0) - 1  # (total,)
    new_idx = torch.cumsum(torch.ones_like(hidden[0, :, 0], dtype=torch.long), 0) - 1  # (new,)
    offset = torch.ones_like(total_idx).sum() - torch.ones_like(new_idx).sum()
    causal = total_idx[None, :] <= (new_idx + offset)[:, None]  # (new, total)
    return causal[None, None, :, :] & attention_mask[:, None, None, :].bool()


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float
) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    floor = torch.full([], torch.finfo(scores.dtype).min, dtype=scores.dtype)
    scores = torch.where(allowed, scores, floor)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``(batch, seq, heads * head_dim)`` → ``(batch, heads, seq, head_dim)``."""
    return x.view(x.shape[0], x.shape[1], -1, head_dim).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


def _gpt2_block(
    block: Any, x: torch.Tensor, allowed: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attn = block.attn
    q, k, v = attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=2)
    q, k, v = _heads(q, attn.head_dim), _heads(k, attn.head_dim), _heads(v, attn.head_dim)
    k = torch.cat([past_k, k], dim=2)
    v = torch.cat([past_v, v], dim=2)
    scale = attn.head_dim**-0.5 if attn.scale_attn_weights else 1.0
    if attn.scale_attn_by_inverse_layer_idx:
        scale /= float(attn.layer_idx + 1)
    x = x + attn.c_proj(_merge(_attend(q, k, v, allowed, scale)))
    x = x + block.mlp(block.ln_2(x))
    return x, k, v


def _llama_block(
    layer: Any,
    x: torch.Tensor,
    allowed: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    past_k: torch.Tensor,
    past_v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from transformers.models.llama import modeling_llama

    rotate: Any = modeling_llama.apply_rotary_pos_emb
    repeat_kv: Any = modeling_llama.repeat_kv

    attn = layer.self_attn
    h = layer.input_layernorm(x)
    q = _heads(attn.q_proj(h), attn.head_dim)
    k = _heads(attn.k_proj(h), attn.head_dim)
    v = _heads(attn.v_proj(h), attn.head_dim)
    cos, sin = rope
    q, k = rotate(q, k, cos, sin)
    k = torch.cat([past_k, k], dim=2)
    v = torch.cat([past_v, v], dim=2)
    groups = attn.num_key_value_groups
    ctx = _attend(q, repeat_kv(k, groups), repeat_kv(v, groups), allowed, attn.scaling)
    x = x + attn.o_proj(_merge(ctx))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, k, v


class DecoderPart(nn.Module):
    """Head (embeddings + blocks[0:k]) or tail (blocks[k:] + final norm + LM head) with a cache.

    ``forward(first, attention_mask[, position_ids], *past)``: ``first`` is ``input_ids`` for a
    head and ``hidden_states`` for a tail; ``position_ids`` is taken by every head and by tails
    of rotary models; returns ``(hidden_states or logits, *presents)``.
    """

    def __init__(self, model: Any, k: int, role: Role) -> None:
        super().__init__()
        self.model_type: str = model.config.model_type
        self.role: Role = role
        if self.model_type == "gpt2":
            body = model.transformer
            blocks, self.final_norm = body.h, body.ln_f
            if role == "head":
                self.wte, self.wpe = body.wte, body.wpe
            if any(b.attn.reorder_and_upcast_attn for b in blocks):
                raise UnsupportedModelError("GPT-2 with reorder_and_upcast_attn cannot be split")
        elif self.model_type == "llama":
            body = model.model
            blocks, self.final_norm = body.layers, body.norm
            self.rotary = body.rotary_emb
            if role == "head":
                self.embed_tokens = body.embed_tokens
        else:  # pragma: no cover - partition.inspect_model admits only the types above
            raise UnsupportedModelError(f"cannot split a {self.model_type!r} decoder")
        self.lm_head = model.lm_head
        self.layers = range(0, k) if role == "head" else range(k, len(blocks))
        self.blocks = nn.ModuleList([blocks[i] for i in self.layers])
        self.takes_positions = role == "head" or self.model_type == "llama"

    def forward(self, first: torch.Tensor, attention_mask: torch.Tensor, *rest: Any) -> Any:
        if self.takes_positions:
            position_ids, past = rest[0], rest[1:]
        else:
            position_ids, past = None, rest
        if self.role == "head":
            if self.model_type == "gpt2":
                x = self.wte(first) + self.wpe(position_ids)
            else:
                x = self.embed_tokens(first)
        else:
            x = first
        allowed = _allowed(attention_mask, x)
        rope = self.rotary(x, position_ids) if self.model_type == "llama" else None
        presents: list[torch.Tensor] = []
        for n, block in enumerate(self.blocks):
            past_k, past_v = past[2 * n], past[2 * n + 1]
            if rope is None:
                x, k, v = _gpt2_block(block, x, allowed, past_k, past_v)
            else:
                x, k, v = _llama_block(block, x, allowed, rope, past_k, past_v)
            presents += [k, v]
        if self.role == "tail":
            x = self.lm_head(self.final_norm(x))
        return (x, *presents)


def _kv_shape(model: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of the model's attention."""
    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return kv_heads, head_dim


def export_decoder_split(
    model_dir: Path, head_dir: Path, tail_dir: Path, k: int, *, opset: int = 18
) -> None:
    """Write ``head_dir/model.onnx`` and ``tail_dir/model.onnx`` for the decoder split at ``k``."""
    model = load_model(model_dir, "text-generation")
    kv_heads, head_dim = _kv_shape(model)
    batch, past_len, new = 2, 3, 4
    ids = torch.ones((batch, new), dtype=torch.long)
    mask = torch.ones((batch, past_len + new), dtype=torch.long)
    mask[1, :2] = 0
    positions = (torch.cumsum(mask, -1) - 1).clamp(min=0)[:, past_len:]
    seq_axes = {0: "batch", 1: "sequence"}
    cache_axes = {0: "batch", 2: "past_sequence"}
    present_axes = {0: "batch", 2: "total_sequence"}
    what = f"{model_dir} split at k={k}"

    def empty_past(layers: range) -> list[torch.Tensor]:
        return [torch.randn(batch, kv_heads, past_len, head_dim) for _ in range(2 * len(layers))]

    head = DecoderPart(model, k, "head").eval()
    head_past = empty_past(head.layers)
    head_args = (ids, mask, positions, *head_past)
    head_in = ["input_ids", "attention_mask", "position_ids", *past_names(head.layers)]
    head_out = [HIDDEN, *present_names(head.layers)]
    export_module(
        head,
        head_args,
        head_dir,
        input_names=head_in,
        output_names=head_out,
        dynamic_axes={
            "input_ids": seq_axes,
            "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": seq_axes,
            HIDDEN: seq_axes,
            **dict.fromkeys(past_names(head.layers), cache_axes),
            **dict.fromkeys(present_names(head.layers), present_axes),
        },
        opset=opset,
        what=f"{what} (head)",
    )
    with torch.no_grad():
        hidden = head(*head_args)[0]
    tail = DecoderPart(model, k, "tail").eval()
    tail_past = empty_past(tail.layers)
    extra = ["position_ids"] if tail.takes_positions else []
    tail_args = (hidden, mask, *([positions] if tail.takes_positions else []), *tail_past)
    export_module(
        tail,
        tail_args,
        tail_dir,
        input_names=[HIDDEN, "attention_mask", *extra, *past_names(tail.layers)],
        output_names=["logits", *present_names(tail.layers)],
        dynamic_axes={
            HIDDEN: seq_axes,
            "attention_mask": {0: "batch", 1: "total_sequence"},
            **dict.fromkeys(extra, seq_axes),
            "logits": seq_axes,
            **dict.fromkeys(past_names(tail.layers), cache_axes),
            **dict.fromkeys(present_names(tail.layers), present_axes),
        },
        opset=opset,
        what=f"{what} (tail)",
    )
