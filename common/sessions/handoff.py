"""How a session moves to a new holder: ship its KV cache, or let the new holder re-run it.

When the controller hands a session over it either ships the old holder's KV cache with the
context (``kv-fp16``, or ``kv-int8`` at about half the bytes, lossy) or ships the context alone
and the new holder prefills the conversation again (``rerun``). :class:`HandoffPlanner` picks
the method with the lowest estimated time until the new holder has a cache:

- ``kv-<fmt>``: ``rtt + bytes * 8 / bandwidth + bytes * decode_ms_per_mb[fmt] / 1e6``, the
  round trip, the transfer and the coding of the tensors (the old holder's serialisation and
  the new holder's decoding), times ``safety``;
- ``rerun``: ``prefill_fixed_ms + context_tokens * prefill_ms_per_token``, the new holder's
  prefill, which :class:`PrefillMeter` learns from the prefills it has timed. Attention makes
  the cost per token grow with the length, so callers pass
  :meth:`PrefillMeter.ms_per_token_at` of the context's length.

Ties go to ``rerun`` (nothing to ship). :meth:`HandoffPlanner.flip_bandwidth_bps` is the
bandwidth at which a KV method and the re-run cost the same: above it the planner ships the
cache. Pure arithmetic, no I/O: the controller and the benchmarks share it.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFAULT_DECODE_MS_PER_MB",
    "DEFAULT_PREFILL_FIXED_MS",
    "DEFAULT_PREFILL_MS_PER_TOKEN",
    "HandoffPlan",
    "HandoffPlanner",
    "LinkEstimate",
    "Method",
    "PrefillMeter",
]

Method = Literal["kv-fp16", "kv-int8", "rerun"]
KvFmt = Literal["fp16", "int8"]

DEFAULT_DECODE_MS_PER_MB: Mapping[KvFmt, float] = {"fp16": 7.6, "int8": 9.2}
"""Coding a shipped cache, ms per MB on the wire: serialising it on the old holder (cast or
quantise, safetensors) plus decoding it on the new one, as ``bench/sessions.py`` measured them on
the 2-core development machine (fp16 4.6 + 3.0, int8 6.2 + 3.0)."""
DEFAULT_PREFILL_MS_PER_TOKEN = 1.0
"""A :class:`PrefillMeter`'s figure before it has timed anything (configurable)."""
DEFAULT_PREFILL_FIXED_MS = 0.0


def _finite(value: float, what: str, *, positive: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "positive" if positive else "non-negative"
        raise ValueError(f"{what} must be a finite {need} number, not {value!r}")
    return value


@dataclass(frozen=True)
class LinkEstimate:
    """The link to the new holder: bandwidth in bits per second (0: none usable) and round-trip
    time in milliseconds."""

    bandwidth_bps: float
    rtt_ms: float

    def __post_init__(self) -> None:
        _finite(self.bandwidth_bps, "bandwidth_bps")
        _finite(self.rtt_ms, "rtt_ms")


@dataclass(frozen=True)
class HandoffPlan:
    """The method picked, the estimate (ms) of every method considered (a KV method over a link
    without bandwidth is left out: it would never finish) and the bytes of KV cache the method
    ships (0 for ``rerun``)."""

    method: Method
    estimates_ms: dict[str, float]
    kv_bytes: int


class HandoffPlanner:
    """Picks ``kv-fp16``, ``kv-int8`` (only when ``allow_int8``: it is lossy) or ``rerun`` (see
    the module doc). ``safety`` (>= 1) multiplies the KV estimates when comparing them, to ship
    a cache only when it clearly wins (a transfer depends on a link estimate that may be
    stale; a re-run only on the new holder); the plan records the unmultiplied estimates."""

    def __init__(
        self,
        *,
        allow_int8: bool = False,
        safety: float = 1.0,
        decode_ms_per_mb: Mapping[str, float] | None = None,
    ) -> None:
        if not math.isfinite(safety) or safety < 1.0:
            raise ValueError(f"safety must be a finite number >= 1, not {safety!r}")
        self.allow_int8 = allow_int8
        self.safety = float(safety)
        rates = dict(DEFAULT_DECODE_MS_PER_MB)
        for fmt, rate in (decode_ms_per_mb or {}).items():
            if fmt not in rates:
                raise ValueError(f"decode_ms_per_mb: unknown kv format {fmt!r}")
            rates[fmt] = _finite(rate, f"decode_ms_per_mb[{fmt!r}]")
        self.decode_ms_per_mb: dict[KvFmt, float] = rates

    @property
    def formats(self) -> tuple[KvFmt, ...]:
        """The KV formats this planner may choose."""
        return ("fp16", "int8") if self.allow_int8 else ("fp16",)

    def kv_ms(self, kv_bytes: int, link: LinkEstimate, fmt: KvFmt = "fp16") -> float:
        """The estimate of shipping ``kv_bytes`` of cache in ``fmt`` (infinite without
        bandwidth), without ``safety``."""
        if kv_bytes <= 0:
            return link.rtt_ms
        if link.bandwidth_bps <= 0:
            return math.inf
        transfer = kv_bytes * 8.0 / link.bandwidth_bps * 1000.0
        return link.rtt_ms + transfer + kv_bytes / 1e6 * self.decode_ms_per_mb[fmt]

    @staticmethod
    def rerun_ms(
        context_tokens: int, prefill_ms_per_token: float, prefill_fixed_ms: float = 0.0
    ) -> float:
        """The estimate of re-running ``context_tokens`` on the new holder."""
        return prefill_fixed_ms + context_tokens * prefill_ms_per_token

    def plan(
        self,
        *,
        context_tokens: int,
        kv_bytes_per_token: Mapping[str, int],
        link: LinkEstimate,
        prefill_ms_per_token: float,
        prefill_fixed_ms: float = 0.0,
    ) -> HandoffPlan:
        """The cheapest method for a context of ``context_tokens`` (the tokens the old holder's
        cache covers) given the cache's size per token in each format (``{"fp16": n, "int8":
        m}``; formats missing or 0 cannot be shipped) and the new holder's link and prefill
        figures. Raises :class:`ValueError` for negative or non-finite figures."""
        tokens = self._tokens(context_tokens)
        per_token_ms = _finite(prefill_ms_per_token, "prefill_ms_per_token")
        fixed_ms = _finite(prefill_fixed_ms, "prefill_fixed_ms")
        rerun = self.rerun_ms(tokens, per_token_ms, fixed_ms)
        estimates: dict[str, float] = {"rerun": rerun}
        best: Method = "rerun"
        best_cost = rerun
        best_bytes = 0
        if tokens > 0:
            for fmt in self.formats:
                per_token = self._per_token(kv_bytes_per_token, fmt)
                if per_token <= 0:
                    continue
                size = per_token * tokens
                cost = self.kv_ms(size, link, fmt)
                if not math.isfinite(cost):
                    continue
                method: Method = "kv-fp16" if fmt == "fp16" else "kv-int8"
                estimates[method] = cost
                if cost * self.safety < best_cost:
                    best, best_cost, best_bytes = method, cost * self.safety, size
        return HandoffPlan(best, estimates, best_bytes)

    def flip_bandwidth_bps(
        self,
        *,
        context_tokens: int,
        kv_bytes_per_token: int | Mapping[str, int],
        rtt_ms: float,
        prefill_ms_per_token: float,
        prefill_fixed_ms: float = 0.0,
        fmt: KvFmt | None = None,
    ) -> float:
        """The bandwidth (bits/s) at which shipping the cache costs what the re-run costs (with
        ``safety``): above it :meth:`plan` ships the cache, at or below it re-runs.

        ``kv_bytes_per_token`` is one format's figure (``fmt``, default fp16) or the mapping
        :meth:`plan` takes (then the lowest flip of the formats this planner may choose, or of
        ``fmt`` alone when given). ``math.inf`` when the cache never wins (the round trip and
        decoding alone cost more than the re-run), 0.0 when it wins at any bandwidth (nothing
        to ship)."""
        tokens = self._tokens(context_tokens)
        rtt = _finite(rtt_ms, "rtt_ms")
        rerun = self.rerun_ms(
            tokens,
            _finite(prefill_ms_per_token, "prefill_ms_per_token"),
            _finite(prefill_fixed_ms, "prefill_fixed_ms"),
        )
        if isinstance(kv_bytes_per_token, Mapping):
            formats = self.formats if fmt is None else (fmt,)
            sizes = {f: self._per_token(kv_bytes_per_token, f) for f in formats}
        else:
            sizes = {fmt or "fp16": int(kv_bytes_per_token)}
        flips = [
            self._flip(per_token * tokens, rtt, rerun, f)
            for f, per_token in sizes.items()
            if per_token > 0
        ]
        return min(flips, default=math.inf) if tokens > 0 else math.inf

    def _flip(self, size: int, rtt: float, rerun: float, fmt: KvFmt) -> float:
        # safety * (rtt + size*8000/bw + decode) = rerun
        #   =>  bw = size*8000 / (rerun/safety - rtt - decode)
        room = rerun / self.safety - rtt - size / 1e6 * self.decode_ms_per_mb[fmt]
        if room <= 0:
            return math.inf
        return size * 8000.0 / room

    @staticmethod
    def _tokens(context_tokens: int) -> int:
        if isinstance(context_tokens, bool) or not isinstance(context_tokens, int):
            raise ValueError(f"context_tokens must be an integer, not {context_tokens!r}")
        if context_tokens < 0:
            raise ValueError(f"context_tokens must be >= 0, not {context_tokens}")
        return context_tokens

    @staticmethod
    def _per_token(kv_bytes_per_token: Mapping[str, int], fmt: str) -> int:
        value = kv_bytes_per_token.get(fmt, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"kv_bytes_per_token[{fmt!r}] must be an integer >= 0, not {value!r}")
        return value


@dataclass
class PrefillMeter:
    """A holder's prefill time as ``fixed_ms + tokens * ms_per_token + tokens**2 *
    ms_per_token2`` (attention's share grows with the square of the length), fitted by weighted
    least squares over the last ``window`` timed prefills, the newer the heavier (weights halve
    every ``halflife`` samples: an EWMA that follows a host whose speed drifts).

    The square term needs samples of three lengths or more and is dropped when the fit would
    make any part negative; then the straight line is fitted: with samples of a single length
    it keeps the default fixed part and fits the slope, and a fit that would make either part
    negative is redone with that part at 0. Before any sample it answers the defaults.
    """

    default_ms_per_token: float = DEFAULT_PREFILL_MS_PER_TOKEN
    default_fixed_ms: float = DEFAULT_PREFILL_FIXED_MS
    window: int = 32
    halflife: float = 8.0
    _samples: deque[tuple[int, float]] = field(init=False, repr=False)
    _fit: tuple[float, float] = field(init=False, repr=False)
    _square: float = field(init=False, repr=False, default=0.0)

    def __post_init__(self) -> None:
        _finite(self.default_ms_per_token, "default_ms_per_token")
        _finite(self.default_fixed_ms, "default_fixed_ms")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, not {self.window}")
        _finite(self.halflife, "halflife", positive=True)
        self._samples = deque(maxlen=self.window)
        self._fit = (self.default_fixed_ms, self.default_ms_per_token)

    def observe(self, tokens: int, ms: float) -> bool:
        """Record a prefill of ``tokens`` tokens that took ``ms``; False (and ignored) for a
        sample that says nothing: no tokens, or a time that is negative or not finite."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            return False
        if not math.isfinite(ms) or ms < 0:
            return False
        self._samples.append((tokens, float(ms)))
        self._fit, self._square = self._refit_square() or (self._refit(), 0.0)
        return True

    @property
    def samples(self) -> int:
        return len(self._samples)

    @property
    def fixed_ms(self) -> float:
        return self._fit[0]

    @property
    def ms_per_token(self) -> float:
        return self._fit[1]

    @property
    def per_token_ms(self) -> float:
        """The same as :attr:`ms_per_token`."""
        return self._fit[1]

    @property
    def ms_per_token2(self) -> float:
        """The square term (ms per token squared; 0 when the line fits best)."""
        return self._square

    def ms_per_token_at(self, tokens: int) -> float:
        """The cost per token of a prefill of ``tokens`` tokens (the fixed part aside): what
        :meth:`HandoffPlanner.plan` takes as ``prefill_ms_per_token``."""
        return self.ms_per_token + max(0, tokens) * self._square

    def estimate_ms(self, tokens: int) -> float:
        """The predicted prefill time of ``tokens`` tokens."""
        return self.fixed_ms + tokens * self.ms_per_token_at(tokens)

    def _refit_square(self) -> tuple[tuple[float, float], float] | None:
        """The fit with the square term, or None (fewer than three lengths, or a part < 0)."""
        n = len(self._samples)
        if len({t for t, _ in self._samples}) < 3:
            return None
        weights = [0.5 ** ((n - 1 - i) / self.halflife) for i in range(n)]
        # Normal equations of weighted least squares in (1, x, x^2), x in thousands of tokens
        # (keeps the 3x3 system well conditioned).
        rows = [(1.0, t / 1000.0, (t / 1000.0) ** 2) for t, _ in self._samples]
        ys = [ms for _, ms in self._samples]
        a = [
            [sum(w * r[i] * r[j] for w, r in zip(weights, rows, strict=True)) for j in range(3)]
            for i in range(3)
        ]
        b = [sum(w * r[i] * y for w, r, y in zip(weights, rows, ys, strict=True)) for i in range(3)]
        solved = _solve3(a, b)
        if solved is None:
            return None
        fixed, linear, square = solved[0], solved[1] / 1000.0, solved[2] / 1e6
        if min(fixed, linear, square) < 0:
            return None
        return (fixed, linear), square

    def _refit(self) -> tuple[float, float]:
        n = len(self._samples)
        weights = [0.5 ** ((n - 1 - i) / self.halflife) for i in range(n)]
        xs = [float(t) for t, _ in self._samples]
        ys = [ms for _, ms in self._samples]
        total = sum(weights)
        if len(set(xs)) >= 2:
            mx = sum(w * x for w, x in zip(weights, xs, strict=True)) / total
            my = sum(w * y for w, y in zip(weights, ys, strict=True)) / total
            sxx = sum(w * (x - mx) ** 2 for w, x in zip(weights, xs, strict=True))
            sxy = sum(w * (x - mx) * (y - my) for w, x, y in zip(weights, xs, ys, strict=True))
            slope = sxy / sxx
            intercept = my - slope * mx
            if slope < 0:
                return my, 0.0
            if intercept >= 0:
                return intercept, slope
            fixed = 0.0
        else:
            fixed = min(self.default_fixed_ms, min(ys))
        # The slope with the fixed part held: least squares of (y - fixed) = slope * x.
        sxy = sum(w * x * (y - fixed) for w, x, y in zip(weights, xs, ys, strict=True))
        sxx = sum(w * x * x for w, x in zip(weights, xs, strict=True))
        return fixed, max(0.0, sxy / sxx)


def _solve3(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None for a singular system."""
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-12:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(col + 1, 3):
            f = m[r][col] / m[col][col]
            for c in range(col, 4):
                m[r][c] -= f * m[col][c]
    x = [0.0, 0.0, 0.0]
    for r in (2, 1, 0):
        x[r] = (m[r][3] - sum(m[r][c] * x[c] for c in range(r + 1, 3))) / m[r][r]
    return x
