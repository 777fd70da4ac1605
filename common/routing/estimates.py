"""Latency estimates per target: peak-EWMA (as in Finagle and Linkerd) and recent quantiles.

Peak-EWMA keeps one figure per target that jumps up to any round trip above it at once and
otherwise moves towards the samples with time constant ``decay_s`` (in seconds of wall time, not
in samples). Between samples it decays towards zero, so a target that was slow and stopped
getting traffic looks cheaper as time passes and is tried again: that is how a slow target that
recovered gets its traffic back without a separate probe. The cost a policy compares is the
estimate times the load (see :meth:`edgefed.common.routing.targets.TargetState.cost`).
"""

from __future__ import annotations

import math
from collections import deque

from edgefed.common.errors import ConfigError


class PeakEwma:
    """Peak-sensitive exponentially weighted moving average of round trips, in seconds."""

    __slots__ = ("_estimate", "_samples", "_stamp", "decay_s")

    def __init__(self, decay_s: float = 10.0) -> None:
        if not decay_s > 0:
            raise ConfigError(f"peak-EWMA decay time must be > 0 s (got {decay_s!r})")
        self.decay_s = decay_s
        self._estimate = 0.0
        self._stamp = 0.0
        self._samples = 0

    @property
    def samples(self) -> int:
        """How many round trips were observed."""
        return self._samples

    def observe(self, rtt_s: float, now: float) -> None:
        """Record one round trip of ``rtt_s`` seconds that ended at ``now`` (monotonic)."""
        if not (rtt_s >= 0 and math.isfinite(rtt_s)):
            raise ValueError(f"a round trip must be a finite number >= 0 s (got {rtt_s!r})")
        if self._samples == 0:
            self._estimate = rtt_s
        else:
            weight = self._weight(now)
            decayed = self._estimate * weight
            if rtt_s > decayed:
                self._estimate = rtt_s
            else:
                self._estimate = decayed + rtt_s * (1.0 - weight)
        self._stamp = max(self._stamp, now)
        self._samples += 1

    def estimate(self, now: float) -> float | None:
        """The estimate at ``now`` (decayed since the last sample); ``None`` before any sample."""
        if self._samples == 0:
            return None
        return self._estimate * self._weight(now)

    def reset(self, rtt_s: float, now: float) -> None:
        """Forget the history and start from ``rtt_s`` (e.g. a target that came back)."""
        self._estimate = rtt_s
        self._stamp = now
        self._samples = max(self._samples, 1)

    def _weight(self, now: float) -> float:
        return math.exp(-max(now - self._stamp, 0.0) / self.decay_s)


class RecentLatencies:
    """The last ``size`` round trips of a target, for quantiles such as the hedging delay."""

    __slots__ = ("_values",)

    def __init__(self, size: int = 128) -> None:
        if size < 1:
            raise ConfigError(f"the latency window needs at least 1 sample (got {size})")
        self._values: deque[float] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self._values)

    def add(self, rtt_s: float) -> None:
        self._values.append(rtt_s)

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile (nearest rank) of the window; ``None`` when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be within [0, 1] (got {q!r})")
        if not self._values:
            return None
        ordered = sorted(self._values)
        rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[rank]
