"""Greedy generation over a split decoder: a head session and a tail session, each with the KV
cache of its own layers (graphs from :func:`edgefed.cloud.split.partition.export_split`).

Numpy only; a session is anything with ONNX Runtime's ``InferenceSession`` interface (``run``,
``get_inputs``, ``get_outputs``), so the cloud worker and tests pass real ORT sessions. The
prompt crosses the link once as ``(batch, prompt, hidden)``; after it, each generated token
crosses as one hidden vector ``(batch, 1, hidden)`` together with the attention mask.

:func:`cached_generate` runs the same loop over one whole-model graph with its cache (from
:func:`edgefed.cloud.split.partition_decoder.export_decoder_full`): the baseline a split is
checked and timed against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from edgefed.cloud.split.errors import SplitRunError

__all__ = ["SplitGeneration", "SplitSide", "cached_generate", "split_generate"]

_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}
_PAST = "past_key_values."
_PRESENT = "present."


class Session(Protocol):
    """The part of ``onnxruntime.InferenceSession`` a split side uses."""

    def run(self, output_names: Any, input_feed: Any, run_options: Any = ...) -> Any: ...
    def get_inputs(self) -> Any: ...
    def get_outputs(self) -> Any: ...


Cache = dict[str, npt.NDArray[Any]]


Role = Literal["head", "tail", "full"]


class SplitSide:
    """One side (``head`` or ``tail``) of a split decoder, or the whole decoder (``full``): its
    session and cache layout."""

    def __init__(self, session: Session, role: Role) -> None:
        self.session = session
        self.role = role
        inputs = {i.name: i for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        self.first = "hidden_states" if role == "tail" else "input_ids"
        expected = "whole decoder" if role == "full" else f"split decoder {role}"
        for needed in (self.first, "attention_mask"):
            if needed not in inputs:
                raise SplitRunError(
                    f"the {role} session has no {needed!r} input (inputs: {', '.join(inputs)}); "
                    f"is it a {expected}?"
                )
        self.main_output = "hidden_states" if role == "head" else "logits"
        if self.main_output not in self.output_names:
            raise SplitRunError(
                f"the {role} session has no {self.main_output!r} output "
                f"(outputs: {', '.join(self.output_names)})"
            )
        self.takes_positions = "position_ids" in inputs
        self.past: dict[str, tuple[type[np.generic], int, int]] = {}
        self.present_of: dict[str, str] = {}
        for name, arg in inputs.items():
            if not name.startswith(_PAST):
                continue
            shape = list(arg.shape)
            dtype = _DTYPES.get(arg.type)
            if (
                dtype is None
                or len(shape) != 4
                or not all(isinstance(shape[d], int) for d in (1, 3))
            ):
                raise SplitRunError(f"{role} cache input {name!r} is {arg.type} {shape}")
            present = _PRESENT + name[len(_PAST) :]
            if present not in self.output_names:
                raise SplitRunError(f"the {role} session takes {name!r} but returns no {present!r}")
            self.past[name] = (dtype, int(shape[1]), int(shape[3]))
            self.present_of[name] = present
        if not self.past:
            raise SplitRunError(f"the {role} session has no KV cache inputs ({_PAST}*)")

    def empty_cache(self, batch: int) -> Cache:
        return {
            name: np.zeros((batch, heads, 0, dim), dtype=dtype)
            for name, (dtype, heads, dim) in self.past.items()
        }

    def step(
        self,
        first: npt.NDArray[Any],
        attention_mask: npt.NDArray[np.int64],
        position_ids: npt.NDArray[np.int64],
        cache: Cache,
    ) -> tuple[npt.NDArray[Any], Cache]:
        """Run one step: the main output (hidden states or logits) and the grown cache."""
        feeds: dict[str, npt.NDArray[Any]] = {self.first: first, "attention_mask": attention_mask}
        if self.takes_positions:
            feeds["position_ids"] = position_ids
        feeds.update(cache)
        wanted = [self.main_output, *self.present_of.values()]
        try:
            outs = self.session.run(wanted, feeds)
        except Exception as exc:  # ONNX Runtime raises its own untyped errors
            raise SplitRunError(
                f"the {self.role} session failed: {type(exc).__name__}: {exc}"
            ) from exc
        grown = {past: outs[n + 1] for n, past in enumerate(self.present_of)}
        return np.asarray(outs[0]), grown


@dataclass
class SplitGeneration:
    """The result of :func:`split_generate`."""

    tokens: npt.NDArray[np.int64]
    """Generated token ids, ``(batch, new_tokens)`` (finished rows continue with padding)."""
    sequences: npt.NDArray[np.int64]
    """Prompt followed by the generated tokens."""
    crossings: list[tuple[int, ...]] = field(default_factory=list)
    """Shape of the hidden states sent head → tail at each step (the prompt first)."""
    crossing_bytes: list[int] = field(default_factory=list)
    """Bytes of those hidden states (without the attention mask) at each step."""


def _positions(mask: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def split_generate(
    head_session: Session,
    tail_session: Session,
    input_ids: npt.ArrayLike,
    max_new_tokens: int,
    *,
    attention_mask: npt.ArrayLike | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> SplitGeneration:
    """Greedy decoding through head then tail, each keeping its own KV cache.

    ``input_ids`` is ``(batch, prompt)``; a padded batch must be left-padded with its
    ``attention_mask``. Positions follow Hugging Face's ``generate`` (running count of real
    tokens). With ``eos_token_id``, a row that produced it continues with ``pad_token_id``
    (default: the first eos id) and generation stops when every row has finished.
    Raises :class:`SplitRunError` for sessions that do not fit or inputs of the wrong shape.
    """
    ids, mask = _checked_prompt(input_ids, max_new_tokens, attention_mask)
    sides = [SplitSide(head_session, "head"), SplitSide(tail_session, "tail")]
    return _greedy(sides, ids, mask, max_new_tokens, eos_token_id, pad_token_id)


def cached_generate(
    session: Session,
    input_ids: npt.ArrayLike,
    max_new_tokens: int,
    *,
    attention_mask: npt.ArrayLike | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> SplitGeneration:
    """Greedy decoding through one whole-decoder graph with its KV cache, exactly as
    :func:`split_generate` decodes through a head and a tail (same arguments and errors;
    nothing crosses, so ``crossings`` stays empty)."""
    ids, mask = _checked_prompt(input_ids, max_new_tokens, attention_mask)
    sides = [SplitSide(session, "full")]
    return _greedy(sides, ids, mask, max_new_tokens, eos_token_id, pad_token_id)


def _checked_prompt(
    input_ids: npt.ArrayLike, max_new_tokens: int, attention_mask: npt.ArrayLike | None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[1] == 0 or ids.dtype.kind not in "iu":
        raise SplitRunError(
            f"input_ids must be integer (batch, prompt), got {ids.dtype} {ids.shape}"
        )
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise SplitRunError(
            f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}"
        )
    ids = ids.astype(np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
    if mask.shape != ids.shape:
        raise SplitRunError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
    return ids, mask


def _greedy(
    sides: list[SplitSide],
    ids: npt.NDArray[np.int64],
    mask: npt.NDArray[np.int64],
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
) -> SplitGeneration:
    """The decoding loop: each step runs the sides in order, each with its own cache; what one
    side returns is what the next takes (recorded as a crossing), the last returns logits."""
    eos = (
        []
        if eos_token_id is None
        else [eos_token_id]
        if isinstance(eos_token_id, int)
        else list(eos_token_id)
    )
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    batch = ids.shape[0]
    caches = [side.empty_cache(batch) for side in sides]
    result = SplitGeneration(tokens=np.zeros((batch, 0), np.int64), sequences=ids)
    finished = np.zeros(batch, dtype=bool)
    step_ids, positions = ids, _positions(mask)
    generated: list[npt.NDArray[np.int64]] = []
    for _ in range(max_new_tokens):
        out: npt.NDArray[Any] = step_ids
        for n, side in enumerate(sides):
            if n > 0:
                result.crossings.append(tuple(int(d) for d in out.shape))
                result.crossing_bytes.append(int(out.nbytes))
            out, caches[n] = side.step(out, mask, positions, caches[n])
        logits = out
        if logits.ndim != 3 or logits.shape[0] != batch:
            raise SplitRunError(f"the {sides[-1].role} returned logits of shape {logits.shape}")
        token = np.argmax(logits[:, -1, :], axis=-1).astype(np.int64)
        token = np.where(finished, pad, token)
        generated.append(token)
        if eos:
            finished |= np.isin(token, eos)
        step_ids = token[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        positions = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
        if eos and finished.all():
            break
    if generated:
        result.tokens = np.stack(generated, axis=1)
    result.sequences = np.concatenate([ids, result.tokens], axis=1)
    return result
