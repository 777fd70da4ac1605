"""The agent's own view of its uplink, for the controller's split planner: round trip to the
cloud broker and bandwidth, both measured from traffic the agent sends anyway.

* **RTT**: the QoS 1 probe of each heartbeat (publish to PUBACK on the cloud link).
* **Bandwidth**: large transfers it makes anyway -- artifact downloads and split activations sent
  to a tail. A transfer below ``min_transfer_bytes`` says more about round trips than about
  bandwidth and is ignored. The time of a transfer is its wall time minus one round trip
  (request set-up) and minus the time the far side said it spent computing, never less than a
  quarter of the wall time (so one noisy RTT cannot make a transfer look instantaneous).

Both figures are exponentially smoothed (weight ``alpha`` for each new sample), so one slow
download moves the estimate without replacing it. Pure logic: no I/O, time comes from callers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgefed.common.errors import ConfigError
from edgefed.common.schemas import LinkFigures

__all__ = ["LinkMeter"]

_MIN_SHARE_OF_WALL_TIME = 0.25
"""A transfer never counts as shorter than this share of its wall time."""


@dataclass(slots=True)
class _Ewma:
    alpha: float
    value: float | None = None

    def add(self, sample: float) -> float:
        self.value = (
            sample if self.value is None else self.value + self.alpha * (sample - self.value)
        )
        return self.value


class LinkMeter:
    """Smoothed RTT (ms) and bandwidth (Mbit/s) of the uplink; :meth:`figures` for heartbeats."""

    def __init__(self, *, min_transfer_bytes: int = 64 * 1024, alpha: float = 0.3) -> None:
        if min_transfer_bytes < 1:
            raise ConfigError(f"min_transfer_bytes must be >= 1 (got {min_transfer_bytes})")
        if not 0 < alpha <= 1:
            raise ConfigError(f"the link smoothing weight must be in (0, 1] (got {alpha!r})")
        self.min_transfer_bytes = min_transfer_bytes
        self._rtt = _Ewma(alpha)
        self._bandwidth = _Ewma(alpha)
        self.samples = 0
        """Measurements taken into account (RTT probes and transfers)."""

    @property
    def rtt_ms(self) -> float | None:
        return self._rtt.value

    @property
    def bandwidth_mbps(self) -> float | None:
        return self._bandwidth.value

    def observe_rtt(self, rtt_ms: float) -> None:
        """One round trip to the cloud broker, in milliseconds."""
        if not (math.isfinite(rtt_ms) and rtt_ms >= 0):
            raise ValueError(f"a round trip must be a finite number >= 0 ms (got {rtt_ms!r})")
        self._rtt.add(rtt_ms)
        self.samples += 1

    def observe_transfer(self, nbytes: int, seconds: float, *, remote_s: float = 0.0) -> bool:
        """``nbytes`` crossed the link in ``seconds`` of wall time, ``remote_s`` of which the far
        side spent computing. Returns whether it was large enough to count."""
        if nbytes < 0 or not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(
                f"a transfer needs bytes >= 0 and seconds >= 0 (got {nbytes}, {seconds})"
            )
        if nbytes < self.min_transfer_bytes or seconds <= 0:
            return False
        overhead = max(0.0, remote_s) + (self._rtt.value or 0.0) / 1000
        transfer_s = max(seconds - overhead, seconds * _MIN_SHARE_OF_WALL_TIME)
        self._bandwidth.add(nbytes * 8 / transfer_s / 1e6)
        self.samples += 1
        return True

    def figures(self) -> LinkFigures | None:
        """What the heartbeat carries; ``None`` until a round trip was measured (the wire
        format needs one)."""
        if self._rtt.value is None:
            return None
        return LinkFigures(
            rtt_ms=round(self._rtt.value, 3),
            bandwidth_mbps=None if self._bandwidth.value is None else self._bandwidth.value,
            samples=self.samples,
        )
