"""Serving inference requests on the agent: the model table, the micro-batcher, the handler.

A request travels: MQTT → :func:`edgefed.common.rpc.serve` (decoding, de-duplication, expiry at
arrival) → :meth:`InferenceService.handle` (model lookup, checks, deadline) →
:class:`Batcher` (priority queues, micro-batches, one worker) → an :class:`OnnxModel` run in a
worker thread → the reply. Every failure is an edgefed error with a code, so ``rpc.serve``
answers it with an error reply.

**Swaps.** :class:`ModelTable` maps a name to the active model. A request picks its model once,
when it is handled; a swap only replaces the dict entry, so requests already queued or running
finish on the model they picked and no request fails during a swap. The old session is freed
when the last of them is done.

**Batching and priority.** There is one queue per :class:`Priority`, each bounded
(``max_queue``; a full queue refuses with :class:`OverloadedError`, retryable, with an estimate
of when to retry). One worker takes the oldest item of the highest priority waiting, then, for
up to the model's ``max_batch_wait_ms``, gathers more text requests for the *same* model object
(highest priority first) until ``max_batch_size``; it stops gathering early when a request of
higher priority for another model arrives. Items whose deadline has passed are dropped with an
``EXPIRED`` error before the model runs. The batch runs in a worker thread
(``asyncio.to_thread``; ONNX Runtime releases the GIL) while the event loop keeps accepting
requests. A batch that fails is retried request by request, so one bad request cannot fail its
neighbours. Tensor requests run alone (their shapes rarely match). ``max_batch_size=1`` switches
micro-batching off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

import numpy as np
import numpy.typing as npt

from edgefed.common.errors import (
    EdgefedError,
    ErrorCode,
    PayloadError,
    PermanentError,
    TemporaryError,
)
from edgefed.common.mqtt import Message
from edgefed.common.schemas import (
    Decoded,
    Encoded,
    InferenceReply,
    InferenceRequest,
    LoadedModel,
    Priority,
    encode,
)
from edgefed.common.serving.errors import InputTooLongError, OverloadedError, UnknownModelError
from edgefed.common.serving.runtime import OnnxModel


class ServingMetrics(Protocol):
    """What the service reports to (the agent's and the worker's Prometheus metrics)."""

    def batch_done(self, size: int) -> None: ...

    def set_queue_depth(self, depth: Mapping[Any, int]) -> None: ...

    def request_done(self, outcome: str, seconds: float) -> None: ...


log = logging.getLogger(__name__)

__all__ = [
    "PRIORITY_ORDER",
    "BatchLimits",
    "BatchResult",
    "Batcher",
    "DeadlineExpired",
    "InferenceService",
    "ModelTable",
    "ServedModel",
    "ServiceStopped",
    "VersionNotServed",
]

Array = npt.NDArray[Any]

PRIORITY_ORDER: tuple[Priority, ...] = (Priority.HIGH, Priority.NORMAL, Priority.LOW)
"""Priorities, most urgent first."""

DEFAULT_MAX_BATCH_SIZE = 8
DEFAULT_MAX_BATCH_WAIT_MS = 2.0
DEFAULT_MAX_TEXTS = 256
"""Most texts one request may carry."""


class DeadlineExpired(PermanentError):
    """A request's deadline passed while it waited; the model was not run for it."""

    code = ErrorCode.EXPIRED


class VersionNotServed(UnknownModelError):
    """A request pins a model version other than the one this agent serves."""


class ServiceStopped(TemporaryError):
    """The agent is shutting down; the request was not run (another agent may take it)."""

    code = ErrorCode.UNAVAILABLE


class ServedModel(Protocol):
    """What the batcher needs of a model (:class:`OnnxModel` is one)."""

    name: str
    version: int

    def run_text_batch(
        self, batch: Sequence[tuple[Sequence[str], Mapping[str, Any]]]
    ) -> list[list[dict[str, Any]]]: ...

    def run_tensors(self, tensors: Mapping[str, Array]) -> dict[str, Array]: ...


# --------------------------------------------------------------------------- model table


class ModelTable:
    """The active model per name. Lives on the event loop; a swap is one dict assignment."""

    def __init__(self) -> None:
        self._models: dict[str, OnnxModel] = {}

    def get(self, name: str) -> OnnxModel:
        """The model serving ``name``; :class:`UnknownModelError` naming those served."""
        model = self._models.get(name)
        if model is None:
            served = ", ".join(self.names()) or "none"
            raise UnknownModelError(f"model {name!r} is not served here (serving: {served})")
        return model

    def swap(self, model: OnnxModel) -> OnnxModel | None:
        """Make ``model`` the active one for its name; returns the one it replaces."""
        previous = self._models.get(model.name)
        self._models[model.name] = model
        if previous is None:
            log.info("serving %s v%d", model.name, model.version)
        else:
            log.info("swapped %s v%d -> v%d", model.name, previous.version, model.version)
        return previous

    def remove(self, name: str) -> OnnxModel | None:
        """Stop serving ``name``; returns the model that served it, if any."""
        return self._models.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._models)

    def loaded(self) -> list[LoadedModel]:
        """The served models as heartbeats and status messages report them."""
        return [
            LoadedModel(name=m.name, version=m.version, role=m.role, providers=list(m.providers))
            for m in (self._models[n] for n in self.names())
        ]

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __len__(self) -> int:
        return len(self._models)


# --------------------------------------------------------------------------- batcher


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """Micro-batching limits of one model."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_batch_wait_ms: float = DEFAULT_MAX_BATCH_WAIT_MS


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What a submitted request gets back."""

    outputs: list[dict[str, Any]] | None
    """One dict per text (text requests)."""
    tensors: dict[str, Array] | None
    """Every graph output by name (tensor requests)."""
    queue_s: float
    """From submission to the start of its batch."""
    compute_s: float
    """Run time of the batch it was part of."""
    batch_size: int
    """Requests in that batch."""


@dataclass(eq=False, slots=True)
class _Item:
    model: ServedModel
    texts: Sequence[str] | None
    tensors: Mapping[str, Array] | None
    parameters: Mapping[str, Any]
    priority: Priority
    deadline: float | None
    future: asyncio.Future[BatchResult]
    enqueued: float = field(default_factory=time.monotonic)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


_Outcome = list[dict[str, Any]] | dict[str, Array] | Exception


class Batcher:
    """Priority queues and dynamic micro-batching in front of the models (see the module doc).

    Use as ``async with Batcher(...)`` or :meth:`start` / :meth:`aclose`. Items submitted before
    the start wait for it.
    """

    def __init__(
        self,
        *,
        max_queue: int = 1024,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_batch_wait_ms: float = DEFAULT_MAX_BATCH_WAIT_MS,
        metrics: ServingMetrics | None = None,
        slowdown: float = 1.0,
    ) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if not slowdown > 0:
            raise ValueError("slowdown must be positive")
        self.max_queue = max_queue
        self.slowdown = slowdown
        """Emulated device speed (simulation): after a batch runs, wait ``slowdown - 1`` times
        its measured run time (values at or below 1 add nothing). The wait holds the worker, as
        a slower device would be busy, and counts as compute time."""
        self.defaults = _limits(max_batch_size, max_batch_wait_ms)
        self.metrics = metrics
        self._limits: dict[str, BatchLimits] = {}
        self._queues: dict[Priority, deque[_Item]] = {p: deque() for p in PRIORITY_ORDER}
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._seconds_per_item = 0.0
        self.batches_run = 0
        """Batches the model ran (for tests and benchmarks)."""
        self.items_run = 0
        self.expired = 0
        """Items dropped because their deadline passed before they ran."""

    # ------------------------------------------------------------------ configuration

    def configure(
        self,
        name: str,
        max_batch_size: int | None = None,
        max_batch_wait_ms: float | None = None,
    ) -> BatchLimits:
        """Set the micro-batching limits of model ``name`` (unset ones keep the defaults)."""
        limits = _limits(
            max_batch_size if max_batch_size is not None else self.defaults.max_batch_size,
            max_batch_wait_ms if max_batch_wait_ms is not None else self.defaults.max_batch_wait_ms,
        )
        self._limits[name] = limits
        return limits

    def limits(self, name: str) -> BatchLimits:
        return self._limits.get(name, self.defaults)

    def queue_depth(self) -> dict[Priority, int]:
        """Requests waiting per priority (not counting the batch that runs)."""
        return {p: len(q) for p, q in self._queues.items()}

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start the worker (idempotent)."""
        self._closed = False
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work(), name="edgefed-batcher")

    async def aclose(self) -> None:
        """Stop the worker; waiting and running requests fail with :class:`ServiceStopped`."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # aclose itself was cancelled, not just the worker
        for queue in self._queues.values():
            while queue:
                _fail(queue.popleft(), ServiceStopped("the agent is shutting down", retry_after=0))
        self._report_depth()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ submitting

    async def submit(
        self,
        model: ServedModel,
        *,
        texts: Sequence[str] | None = None,
        tensors: Mapping[str, Array] | None = None,
        parameters: Mapping[str, Any] | None = None,
        priority: Priority = Priority.NORMAL,
        deadline: float | None = None,
    ) -> BatchResult:
        """Queue one request for ``model`` and wait for its result.

        ``deadline`` is a ``time.monotonic()`` value. Raises :class:`OverloadedError` when the
        priority's queue is full, :class:`DeadlineExpired` when the deadline passes before the
        request runs, :class:`ServiceStopped` when the batcher stops, and whatever the model
        raises for this request.
        """
        if (texts is None) == (tensors is None):
            raise ValueError("submit texts or tensors, exactly one of them")
        if self._closed:
            raise ServiceStopped("the agent is shutting down", retry_after=0)
        queue = self._queues[priority]
        if len(queue) >= self.max_queue:
            waiting = sum(len(q) for q in self._queues.values())
            retry_after = round(min(30.0, max(0.01, waiting * self._seconds_per_item)), 3)
            raise OverloadedError(
                f"the {priority} queue is full ({self.max_queue} requests waiting); "
                f"retry in about {retry_after:g} s or elsewhere",
                retry_after=retry_after,
            )
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        queue.append(
            _Item(model, texts, tensors, dict(parameters or {}), priority, deadline, future)
        )
        self._wakeup.set()
        self._report_depth()
        return await future

    # ------------------------------------------------------------------ the worker

    async def _work(self) -> None:
        while True:
            first = self._pop_first()
            if first is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = [first]
            try:
                limits = self.limits(first.model.name)
                if first.texts is not None and limits.max_batch_size > 1:
                    await self._gather(batch, limits)
                self._report_depth()
                now = time.monotonic()
                ready = []
                for item in batch:
                    if item.future.done():
                        continue
                    if item.expired(now):
                        self._expire(item, now)
                    else:
                        ready.append(item)
                if ready:
                    await self._run(ready)
            except asyncio.CancelledError:
                for item in batch:
                    _fail(item, ServiceStopped("the agent is shutting down", retry_after=0))
                raise
            except Exception as exc:  # a bug: answer the batch, keep the worker alive
                log.exception("the batcher failed on a batch of %d", len(batch))
                for item in batch:
                    _fail(item, exc)

    def _pop_first(self) -> _Item | None:
        """The oldest item of the highest priority waiting (expired ones are answered here)."""
        now = time.monotonic()
        for priority in PRIORITY_ORDER:
            queue = self._queues[priority]
            while queue:
                item = queue.popleft()
                if item.future.done():
                    continue
                if item.expired(now):
                    self._expire(item, now)
                    continue
                return item
        return None

    async def _gather(self, batch: list[_Item], limits: BatchLimits) -> None:
        """Add waiting text requests for the same model until the batch is full, the wait is
        over, or a request of higher priority for another model waits."""
        first = batch[0]
        loop = asyncio.get_running_loop()
        until = loop.time() + limits.max_batch_wait_ms / 1000
        higher = PRIORITY_ORDER[: PRIORITY_ORDER.index(first.priority)]
        while True:
            self._take_matching(batch, limits.max_batch_size)
            if len(batch) >= limits.max_batch_size:
                return
            if any(self._queues[p] for p in higher):
                return
            remaining = until - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()

    def _take_matching(self, batch: list[_Item], size: int) -> None:
        model = batch[0].model
        for priority in PRIORITY_ORDER:
            queue = self._queues[priority]
            if len(batch) >= size:
                return
            if not queue:
                continue
            keep: deque[_Item] = deque()
            while queue:
                item = queue.popleft()
                if item.future.done():
                    continue
                if len(batch) < size and item.model is model and item.texts is not None:
                    batch.append(item)
                else:
                    keep.append(item)
            self._queues[priority] = keep

    def _expire(self, item: _Item, now: float) -> None:
        self.expired += 1
        waited = (now - item.enqueued) * 1000
        _fail(
            item,
            DeadlineExpired(
                f"the request's deadline passed after {waited:.0f} ms in the {item.priority} "
                f"queue; {item.model.name} was not run for it"
            ),
        )

    async def _run(self, batch: list[_Item]) -> None:
        model = batch[0].model
        started = time.monotonic()
        work = [(item.texts, item.tensors, item.parameters) for item in batch]
        try:
            outcomes = await asyncio.to_thread(_execute, model, work)
            if self.slowdown > 1:
                await asyncio.sleep((self.slowdown - 1) * (time.monotonic() - started))
        except asyncio.CancelledError:
            for item in batch:
                _fail(item, ServiceStopped("the agent is shutting down", retry_after=0))
            raise
        finished = time.monotonic()
        compute = finished - started
        per_item = compute / len(batch)
        self._seconds_per_item = (
            per_item if self.batches_run == 0 else 0.8 * self._seconds_per_item + 0.2 * per_item
        )
        self.batches_run += 1
        self.items_run += len(batch)
        if self.metrics is not None:
            self.metrics.batch_done(len(batch))
        for item, outcome in zip(batch, outcomes, strict=True):
            if item.future.done():
                continue
            if isinstance(outcome, Exception):
                item.future.set_exception(outcome)
                continue
            result = BatchResult(
                outputs=outcome if isinstance(outcome, list) else None,
                tensors=outcome if isinstance(outcome, dict) else None,
                queue_s=started - item.enqueued,
                compute_s=compute,
                batch_size=len(batch),
            )
            item.future.set_result(result)

    def _report_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(self.queue_depth())


def _limits(max_batch_size: int, max_batch_wait_ms: float) -> BatchLimits:
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    if max_batch_wait_ms < 0:
        raise ValueError("max_batch_wait_ms must not be negative")
    return BatchLimits(int(max_batch_size), float(max_batch_wait_ms))


def _fail(item: _Item, error: Exception) -> None:
    if not item.future.done():
        item.future.set_exception(error)


def _execute(
    model: ServedModel,
    work: Sequence[tuple[Sequence[str] | None, Mapping[str, Array] | None, Mapping[str, Any]]],
) -> list[_Outcome]:
    """Run one batch (in a worker thread); one outcome per item, an exception for a failure."""
    _, tensors, _ = work[0]
    if tensors is not None:
        try:
            return [model.run_tensors(tensors)]
        except Exception as exc:  # noqa: BLE001 - handed to the request's future
            return [exc]
    requests = [(t or (), p) for t, _, p in work]
    try:
        return list(model.run_text_batch(requests))
    except Exception as exc:  # noqa: BLE001 - handed to the request's future
        if len(requests) == 1:
            return [exc]
        log.debug("a batch of %d failed (%s); running its requests one by one", len(work), exc)
    outcomes: list[_Outcome] = []
    for request in requests:
        try:
            outcomes.append(model.run_text_batch([request])[0])
        except Exception as exc:  # noqa: BLE001 - handed to the request's future
            outcomes.append(exc)
    return outcomes


# --------------------------------------------------------------------------- the handler


class InferenceService:
    """Answers :class:`InferenceRequest` messages with the table's models through the batcher.

    Pass :meth:`handle` to ``rpc.serve(client, topics.agent_infer(agent_id), service.handle,
    expected=InferenceRequest)``.

    A text request's reply carries ``outputs={"results": [one dict per text]}`` (see
    :mod:`edgefed.common.serving.runtime`), or with ``parameters["return"] == "tensors"`` on a
    feature-extraction model the embeddings as one float32 tensor ``"embeddings"``
    ``(texts, hidden)``. A tensor request's reply carries every graph output as a tensor.
    ``timings_ms`` has ``queue`` and ``compute``.
    """

    def __init__(
        self,
        table: ModelTable,
        batcher: Batcher,
        *,
        agent_id: str,
        metrics: ServingMetrics | None = None,
        on_done: Callable[[str, str, float], None] | None = None,
        max_texts: int = DEFAULT_MAX_TEXTS,
    ) -> None:
        self.table = table
        self.batcher = batcher
        self.agent_id = agent_id
        self.metrics = metrics
        self.on_done = on_done
        """Called with (model name, seconds) for every request answered successfully."""
        self.max_texts = max_texts

    async def handle(
        self, req: Decoded[InferenceRequest], msg: Message
    ) -> InferenceReply | Encoded:
        """Serve one decoded request; edgefed errors propagate for ``rpc.serve`` to answer."""
        outcome = str(ErrorCode.INTERNAL)
        try:
            reply = await self._serve(req, msg)
            outcome = "ok"
            return reply
        except EdgefedError as exc:
            outcome = _outcome_of(exc)
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            seconds = max(0.0, time.monotonic() - msg.received_at)
            if self.metrics is not None:
                self.metrics.request_done(outcome, seconds)
            if self.on_done is not None:
                self.on_done(req.message.model, outcome, seconds)

    async def _serve(
        self, req: Decoded[InferenceRequest], msg: Message
    ) -> InferenceReply | Encoded:
        request = req.message
        model = self.table.get(request.model)
        if request.version is not None and request.version != model.version:
            raise VersionNotServed(
                f"model {request.model!r} version {request.version} is not served here "
                f"(agent {self.agent_id} serves v{model.version})"
            )
        texts = request.texts
        tensors = req.tensors
        if texts is not None and tensors:
            raise PayloadError("the request carries both texts and tensors; send one of them")
        if texts is None and not tensors:
            raise PayloadError("the request carries neither texts nor tensors")
        wanted = request.parameters.get("return", "json")
        if wanted not in ("json", "tensors"):
            raise PayloadError(f"parameter return must be 'json' or 'tensors', not {wanted!r}")
        if texts is not None:
            if not texts:
                raise PayloadError("texts is empty")
            if len(texts) > self.max_texts:
                raise InputTooLongError(
                    f"the request carries {len(texts)} texts; at most {self.max_texts} per request"
                )
            if wanted == "tensors" and model.task != "feature-extraction":
                raise PayloadError(
                    f"'return': 'tensors' is for feature-extraction models; "
                    f"{model.name} is a {model.task} model"
                )
        result = await self.batcher.submit(
            model,
            texts=texts,
            tensors=tensors if texts is None else None,
            parameters=request.parameters,
            priority=request.priority,
            deadline=_deadline(msg, request.deadline),
        )
        reply = InferenceReply(
            request_id=request.request_id,
            model=model.name,
            version=model.version,
            served_by=self.agent_id,
            outputs={"results": result.outputs} if wanted == "json" and result.outputs else {},
            timings_ms={
                "queue": round(result.queue_s * 1000, 3),
                "compute": round(result.compute_s * 1000, 3),
            },
        )
        if result.tensors is not None:
            return encode(reply, result.tensors)
        if wanted == "tensors" and result.outputs is not None:
            embeddings = np.asarray([o["embedding"] for o in result.outputs], dtype=np.float32)
            return encode(reply, {"embeddings": embeddings})
        return reply


def _deadline(msg: Message, absolute: float | None) -> float | None:
    """The earlier of the message expiry and the request's absolute (wall-clock) deadline, as
    a ``time.monotonic()`` value."""
    candidates = []
    if msg.deadline is not None:
        candidates.append(msg.deadline)
    if absolute is not None:
        candidates.append(time.monotonic() + (absolute - time.time()))
    return min(candidates) if candidates else None


def _outcome_of(exc: EdgefedError) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, ErrorCode):
        return str(code)
    return str(ErrorCode.UNAVAILABLE if isinstance(exc, TemporaryError) else ErrorCode.INTERNAL)
