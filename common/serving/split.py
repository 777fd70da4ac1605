"""Split execution of an encoder: the head runs here, the tail wherever a sender takes it.

The head of a split model (an artifact ``<name>.k<k>.head``, see
:mod:`edgefed.cloud.split.partition_sign`) is loaded locally as an :class:`OnnxModel`; its tail
(``<name>.k<k>.tail``, same version) is served like any other model, e.g. by a cloud worker pool.
For a text request :class:`SplitExecutor` tokenises with the head's tokenizer, runs the head,
sends the ``hidden_states`` activation and the ``attention_mask`` to the tail as an
:class:`InferenceRequest` with tensors, and turns the tail's ``last_hidden_state`` (or ``logits``)
into the results the full model would have answered (mean pooling over the mask and L2
normalisation, or softmax scores), with the head model's own post-processing
(:meth:`OnnxModel.task_results`).

The activation travels as float16 by default (half the bytes; the tail's float32 input is cast
back on arrival, cosine to the full model stays above 0.999) or as float32 for exact results.
The sender is any coroutine ``(request, tensors) -> Decoded[InferenceReply]``: a
:class:`~edgefed.common.routing.Router` to worker pools (:func:`router_sender`) or a
:class:`~edgefed.common.rpc.Requester` to one topic (:func:`requester_sender`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edgefed.common.errors import ErrorCode, PayloadError, RemoteError
from edgefed.common.routing import Router
from edgefed.common.rpc import Requester
from edgefed.common.schemas import Decoded, InferenceReply, InferenceRequest, Priority
from edgefed.common.serving.errors import ServingError, UnknownModelError
from edgefed.common.serving.runtime import OnnxModel

__all__ = [
    "HIDDEN_STATES",
    "SplitExecutionError",
    "SplitExecutor",
    "SplitResult",
    "TailNotServed",
    "TailSender",
    "WireDtype",
    "requester_sender",
    "router_sender",
    "tail_name",
]

Array = npt.NDArray[Any]
TailSender = Callable[[InferenceRequest, Mapping[str, Array]], Awaitable[Decoded[InferenceReply]]]
"""Sends a tail request with its tensors and returns the decoded reply."""
WireDtype = Literal["float16", "float32"]

HIDDEN_STATES = "hidden_states"
ATTENTION_MASK = "attention_mask"
_TASK_OUTPUTS: dict[str, tuple[str, ...]] = {
    "feature-extraction": ("last_hidden_state", "token_embeddings", "sentence_embedding"),
    "text-classification": ("logits",),
}
_HEAD_SUFFIX = ".head"
_TAIL_SUFFIX = ".tail"


class SplitExecutionError(ServingError):
    """A split model cannot run: a head that is not one, or a tail that answered the wrong
    thing."""


class TailNotServed(UnknownModelError):
    """No one serves the tail of the split model where the sender sends it."""


@dataclass(frozen=True, slots=True)
class SplitResult:
    """The results of one split run and what it cost."""

    results: list[dict[str, Any]]
    """One dict per text, as the full model's reply has them."""
    sent_bytes: int
    """Bytes of the tensors sent to the tail (activation and mask)."""
    received_bytes: int
    """Bytes of the tensors the tail sent back."""
    head_ms: float
    tail: InferenceReply
    """The tail's reply (who served it, its timings)."""


def tail_name(head_name: str) -> str:
    """The tail artifact's name for a head named ``<name>.k<k>.head``."""
    if not head_name.endswith(_HEAD_SUFFIX):
        raise SplitExecutionError(
            f"{head_name!r} is not named like a split head (<name>.k<k>.head); give the tail's name"
        )
    return head_name[: -len(_HEAD_SUFFIX)] + _TAIL_SUFFIX


def requester_sender(
    requester: Requester, topic: str, *, timeout: float | None = None
) -> TailSender:
    """A sender that requests the tail on ``topic`` (e.g. a worker pool's infer topic)."""

    async def send(
        request: InferenceRequest, tensors: Mapping[str, Array]
    ) -> Decoded[InferenceReply]:
        return await requester.request(
            topic, request, InferenceReply, tensors=tensors, timeout=timeout
        )

    return send


def router_sender(router: Router, *, timeout: float | None = None) -> TailSender:
    """A sender that routes the tail request among the router's targets (e.g. worker pools)."""

    async def send(
        request: InferenceRequest, tensors: Mapping[str, Array]
    ) -> Decoded[InferenceReply]:
        return (await router.request(request, tensors=tensors, timeout=timeout)).reply

    return send


class SplitExecutor:
    """Runs texts through a local head and a remote tail (see the module doc).

    ``tail_model`` defaults to the head's name with ``.tail`` for ``.head`` and ``tail_version``
    to the head's version (a head and its tail are signed together with one version).
    """

    def __init__(
        self,
        head: OnnxModel,
        send_tail: TailSender,
        *,
        tail_model: str | None = None,
        tail_version: int | None = None,
        wire_dtype: WireDtype = "float16",
    ) -> None:
        if head.role != "head":
            raise SplitExecutionError(
                f"model {head.name} v{head.version} is a {head.role} model, not a split head"
            )
        if head.task not in _TASK_OUTPUTS:
            raise SplitExecutionError(
                f"split execution serves {', '.join(_TASK_OUTPUTS)} models; "
                f"{head.name} is a {head.task} model"
            )
        if HIDDEN_STATES not in head.output_names or not head.takes_text:
            raise SplitExecutionError(
                f"model {head.name} v{head.version} does not take texts and give "
                f"{HIDDEN_STATES} (outputs: {', '.join(head.output_names)})"
            )
        if wire_dtype not in ("float16", "float32"):
            raise SplitExecutionError(f"wire_dtype must be float16 or float32, not {wire_dtype!r}")
        self.head = head
        self.send_tail = send_tail
        self.tail_model = tail_model or tail_name(head.name)
        self.tail_version = tail_version if tail_version is not None else head.version
        self.wire_dtype: np.dtype[Any] = np.dtype(wire_dtype)

    async def run(
        self,
        texts: Sequence[str],
        parameters: Mapping[str, Any] | None = None,
        *,
        priority: Priority = Priority.NORMAL,
        deadline: float | None = None,
    ) -> SplitResult:
        """Results for ``texts``; raises :class:`PayloadError` / :class:`InputTooLongError` for bad
        texts (before anything is sent), :class:`TailNotServed` when the tail is not served,
        the sender's errors otherwise."""
        params = dict(parameters or {})
        ids, mask = self.head.tokenize(texts, params)
        started = time.perf_counter()
        hidden = (
            await asyncio.to_thread(self.head.run_tensors, {"input_ids": ids, ATTENTION_MASK: mask})
        )[HIDDEN_STATES]
        head_ms = (time.perf_counter() - started) * 1000
        tensors = {HIDDEN_STATES: hidden.astype(self.wire_dtype), ATTENTION_MASK: mask}
        request = InferenceRequest(
            model=self.tail_model,
            version=self.tail_version,
            priority=priority,
            deadline=deadline,
        )
        try:
            reply = await self.send_tail(request, tensors)
        except RemoteError as exc:
            if exc.code != ErrorCode.NOT_FOUND:
                raise
            raise TailNotServed(
                f"the tail {self.tail_model} v{self.tail_version} of split model "
                f"{self.head.name} is not served there: {exc.remote_message}"
            ) from exc
        output = self._task_output(reply)
        if output.shape[0] != mask.shape[0]:
            raise SplitExecutionError(
                f"the tail {self.tail_model} answered {output.shape[0]} rows for "
                f"{mask.shape[0]} texts"
            )
        try:
            results = self.head.task_results(output, mask, params)
        except (ValueError, PayloadError) as exc:
            raise SplitExecutionError(
                f"the tail {self.tail_model}'s output {list(output.shape)} does not fit: {exc}"
            ) from exc
        return SplitResult(
            results=results,
            sent_bytes=sum(t.nbytes for t in tensors.values()),
            received_bytes=sum(t.nbytes for t in reply.tensors.values()),
            head_ms=head_ms,
            tail=reply.message,
        )

    def _task_output(self, reply: Decoded[InferenceReply]) -> Array:
        names = _TASK_OUTPUTS[self.head.task]
        found = next((n for n in names if n in reply.tensors), None)
        if found is None:
            raise SplitExecutionError(
                f"the tail {self.tail_model} answered no {' or '.join(names)} tensor "
                f"(tensors: {', '.join(reply.tensors) or 'none'})"
            )
        return np.asarray(reply.tensors[found], dtype=np.float32)
