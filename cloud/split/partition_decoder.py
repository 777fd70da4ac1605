"""Head and tail wrappers for decoder LMs, each side with the KV cache of its own layers.

The wrappers call the model's own submodules (embeddings, projections, norms, MLPs) and do the
attention arithmetic themselves, the way the model's eager attention does it, so the cache is
plain tensors in and out (``past_key_values.{i}.key|value`` → ``present.{i}.key|value``, shaped
``(batch, kv_heads, sequence, head_dim)``) instead of a transformers ``Cache`` object.

The causal mask is built inside the graph from the attention mask (past + new tokens) with tensor
operations only, so batch, new-token count and cache length are all dynamic.

:func:`export_decoder_full` exports the whole model through the same wrapper (role ``full``): a
single-graph baseline with the same arithmetic, for checking and timing a split against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from edgefed.cloud.split.errors import UnsupportedModelError
from edgefed.cloud.split.partition_torch import MODEL_FILE, export_module, load_model

Role = Literal["head", "tail", "full"]
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
    """Head (embeddings + blocks[0:k]), tail (blocks[k:] + final norm + LM head) or the whole
    model (``full``), with the KV cache of its blocks.

    ``forward(first, attention_mask[, position_ids], *past)``: ``first`` is ``input_ids`` for a
    head or the full model and ``hidden_states`` for a tail; ``position_ids`` is taken by every
    head, the full model and tails of rotary models; returns ``(hidden_states or logits,
    *presents)``.
    """

    def __init__(self, model: Any, k: int, role: Role) -> None:
        super().__init__()
        self.model_type: str = model.config.model_type
        self.role: Role = role
        embeds = role in ("head", "full")
        if self.model_type == "gpt2":
            body = model.transformer
            blocks, self.final_norm = body.h, body.ln_f
            if embeds:
                self.wte, self.wpe = body.wte, body.wpe
            if any(b.attn.reorder_and_upcast_attn for b in blocks):
                raise UnsupportedModelError("GPT-2 with reorder_and_upcast_attn cannot be split")
        elif self.model_type == "llama":
            _check_rope(model.config)
            body = model.model
            blocks, self.final_norm = body.layers, body.norm
            self.rotary = body.rotary_emb
            if embeds:
                self.embed_tokens = body.embed_tokens
        else:  # export_split admits only the types above; export_decoder_full lands here
            raise UnsupportedModelError(f"cannot split a {self.model_type!r} decoder")
        self.lm_head = model.lm_head
        self.layers = {
            "head": range(0, k),
            "tail": range(k, len(blocks)),
            "full": range(0, len(blocks)),
        }[role]
        self.blocks = nn.ModuleList([blocks[i] for i in self.layers])
        self.takes_positions = embeds or self.model_type == "llama"

    def forward(self, first: torch.Tensor, attention_mask: torch.Tensor, *rest: Any) -> Any:
        if self.takes_positions:
            position_ids, past = rest[0], rest[1:]
        else:
            position_ids, past = None, rest
        if self.role == "tail":
            x = first
        elif self.model_type == "gpt2":
            x = self.wte(first) + self.wpe(position_ids)
        else:
            x = self.embed_tokens(first)
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
        if self.role != "head":
            x = self.lm_head(self.final_norm(x))
        return (x, *presents)


#: Rotary variants whose frequencies depend on the sequence length at run time: the tracer would
#: freeze them at the export's length, so generation past it would silently go wrong.
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def _check_rope(config: Any) -> None:
    scaling = getattr(config, "rope_scaling", None)
    if not isinstance(scaling, dict):
        return
    rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
    if any(kind in rope_type for kind in _LENGTH_DEPENDENT_ROPE):
        raise UnsupportedModelError(
            f"cannot split a model with {rope_type!r} rope scaling: its frequencies change with "
            "the sequence length, which an exported graph cannot follow (static types such as "
            "linear, llama3 and yarn split fine)"
        )


def _kv_shape(model: Any) -> tuple[int, int]:
    """(kv_heads, head_dim) of the model's attention."""
    config = model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return kv_heads, head_dim


_BATCH, _PAST_LEN, _NEW = 2, 3, 4  # example shapes for tracing (all axes are dynamic)


def _example_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (past + new, one row left-padded), ``position_ids``."""
    ids = torch.ones((_BATCH, _NEW), dtype=torch.long)
    mask = torch.ones((_BATCH, _PAST_LEN + _NEW), dtype=torch.long)
    mask[1, :2] = 0
    positions = (torch.cumsum(mask, -1) - 1).clamp(min=0)[:, _PAST_LEN:]
    return ids, mask, positions


def _export_part(
    part: DecoderPart,
    first: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache_shape: tuple[int, int],
    out_dir: Path,
    *,
    opset: int,
    what: str,
) -> None:
    """Export one wrapper: ``first`` is ``input_ids`` (head, full) or ``hidden_states`` (tail)."""
    kv_heads, head_dim = cache_shape
    past = [torch.randn(_BATCH, kv_heads, _PAST_LEN, head_dim) for _ in range(2 * len(part.layers))]
    seq_axes = {0: "batch", 1: "sequence"}
    cache_axes = {0: "batch", 2: "past_sequence"}
    present_axes = {0: "batch", 2: "total_sequence"}
    first_name = HIDDEN if part.role == "tail" else "input_ids"
    out_name = HIDDEN if part.role == "head" else "logits"
    extra = ["position_ids"] if part.takes_positions else []
    export_module(
        part,
        (first, mask, *([positions] if part.takes_positions else []), *past),
        out_dir,
        input_names=[first_name, "attention_mask", *extra, *past_names(part.layers)],
        output_names=[out_name, *present_names(part.layers)],
        dynamic_axes={
            first_name: seq_axes,
            "attention_mask": {0: "batch", 1: "total_sequence"},
            **dict.fromkeys(extra, seq_axes),
            out_name: seq_axes,
            **dict.fromkeys(past_names(part.layers), cache_axes),
            **dict.fromkeys(present_names(part.layers), present_axes),
        },
        opset=opset,
        what=what,
    )


def export_decoder_split(
    model_dir: Path, head_dir: Path, tail_dir: Path, k: int, *, opset: int = 18
) -> None:
    """Write ``head_dir/model.onnx`` and ``tail_dir/model.onnx`` for the decoder split at ``k``."""
    model = load_model(model_dir, "text-generation")
    cache_shape = _kv_shape(model)
    ids, mask, positions = _example_inputs()
    what = f"{model_dir} split at k={k}"
    head = DecoderPart(model, k, "head").eval()
    _export_part(
        head, ids, mask, positions, cache_shape, head_dir, opset=opset, what=f"{what} (head)"
    )
    hidden = torch.randn(_BATCH, _NEW, int(model.config.hidden_size))
    tail = DecoderPart(model, k, "tail").eval()
    _export_part(
        tail, hidden, mask, positions, cache_shape, tail_dir, opset=opset, what=f"{what} (tail)"
    )


def export_decoder_full(model_dir: Path, out_dir: Path, *, opset: int = 18) -> Path:
    """Write ``out_dir/model.onnx``: the whole decoder (``input_ids``, ``attention_mask``,
    ``position_ids``, ``past_key_values.{i}.*`` → ``logits``, ``present.{i}.*``) through the
    same wrapper and exporter as the split graphs, so a split is compared with like arithmetic.
    Run it with :func:`edgefed.cloud.split.partition_generate.cached_generate`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_model(model_dir, "text-generation")
    out_dir.mkdir(parents=True, exist_ok=True)
    ids, mask, positions = _example_inputs()
    full = DecoderPart(model, 0, "full").eval()
    _export_part(
        full, ids, mask, positions, _kv_shape(model), out_dir, opset=opset, what=f"{model_dir}"
    )
    return out_dir / MODEL_FILE
