"""Re-plan a split when a link's measured figures move, without flapping.

A :class:`Replanner` keeps the current :class:`~edgefed.cloud.split.plan.Plan` per key (an agent
id, or a device/link name). :meth:`Replanner.observe` takes the latest measured link figures and
returns a new plan only when

1. the RTT or the bandwidth moved beyond the hysteresis band (default ±25 %) relative to the
   figures the current plan was made for, **and**
2. the new best option beats the current choice, re-estimated on the new figures, by the margin
   (default 10 % of the current choice's new estimate, and at least ``min_gain_ms``).

Jitter inside the band changes nothing. A move past the band that leaves the same option best
re-anchors the band on the new figures (so a slow drift is judged from where it has got to) but
returns ``None``: there is nothing to push. The caller pushes a returned plan as a desired-state
change.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Hashable
from dataclasses import dataclass, field
from typing import Any

from edgefed.cloud.split.plan import Link, Plan, PlanError, WeightDtype, plan
from edgefed.cloud.split.profile import ModelProfile, WireDtype
from edgefed.common.devices import DeviceProfile

log = logging.getLogger(__name__)

__all__ = ["Replanner"]

_RTT_FLOOR_MS = 1.0
"""RTT changes are judged against at least this many ms (a 0.2 → 0.4 ms change is not +100 %)."""


@dataclass
class _Entry:
    plan: Plan
    edge: DeviceProfile
    constraints: dict[str, Any] = field(default_factory=dict)


class Replanner:
    """The current plan per key, re-planned only past a hysteresis band and a gain margin."""

    def __init__(
        self,
        profile: ModelProfile,
        cloud: DeviceProfile,
        *,
        band: float = 0.25,
        min_gain: float = 0.10,
        min_gain_ms: float = 0.5,
        dtype: WireDtype = "fp16",
        new_tokens: int = 16,
        weight_dtype: WeightDtype = "fp32",
    ) -> None:
        if not 0 <= band < 1:
            raise PlanError(f"hysteresis band must be in [0, 1), got {band!r}")
        if not 0 <= min_gain < 1:
            raise PlanError(f"minimum relative gain must be in [0, 1), got {min_gain!r}")
        if min_gain_ms < 0:
            raise PlanError(f"minimum gain must be >= 0 ms, got {min_gain_ms!r}")
        self.profile = profile
        self.cloud = cloud
        self.band = band
        self.min_gain = min_gain
        self.min_gain_ms = min_gain_ms
        self._plan_args: dict[str, Any] = {
            "dtype": dtype,
            "new_tokens": new_tokens,
            "weight_dtype": weight_dtype,
        }
        self._entries: dict[Hashable, _Entry] = {}

    def current(self, key: Hashable) -> Plan | None:
        """The plan in force for ``key``, or ``None`` before the first observation."""
        entry = self._entries.get(key)
        return entry.plan if entry else None

    def forget(self, key: Hashable) -> None:
        """Drop ``key`` (an agent left the fleet)."""
        self._entries.pop(key, None)

    def observe(
        self,
        key: Hashable,
        edge: DeviceProfile,
        link: Link,
        *,
        keep_raw_input_on_device: bool = False,
        edge_memory_bytes: int | None = None,
        split_points: Collection[int] | None = None,
    ) -> Plan | None:
        """Feed the latest measured figures for ``key``; the new plan to push, or ``None``.

        ``split_points`` limits the splits considered (those whose artifacts exist; default:
        every one). The first observation of a key, or a change of device profile or
        constraints (split points included), always returns a fresh plan.
        """
        constraints = {
            "keep_raw_input_on_device": keep_raw_input_on_device,
            "edge_memory_bytes": edge_memory_bytes,
            "split_points": None if split_points is None else frozenset(split_points),
        }
        entry = self._entries.get(key)
        if entry is None or entry.edge != edge or entry.constraints != constraints:
            fresh = self._plan(edge, link, constraints)
            self._entries[key] = _Entry(fresh, edge, constraints)
            return fresh
        if self.within_band(entry.plan.link, link):
            return None
        candidate = self._plan(edge, link, constraints)
        current = entry.plan.choice
        if candidate.choice.same_choice(current):
            entry.plan = candidate  # re-anchor the band; nothing to push
            return None
        kept = candidate.option(current.placement, current.k)
        gain = kept.total_ms - candidate.choice.total_ms
        if kept.feasible and gain < max(self.min_gain * kept.total_ms, self.min_gain_ms):
            log.debug(
                "%s: %s would beat %s by only %.2f ms; keeping it",
                key,
                candidate.choice.label,
                current.label,
                gain,
            )
            return None
        log.info(
            "%s: link %s -> %s; re-planned %s -> %s (%.1f -> %.1f ms)",
            key,
            entry.plan.link,
            link,
            current.label,
            candidate.choice.label,
            kept.total_ms,
            candidate.choice.total_ms,
        )
        entry.plan = candidate
        return candidate

    def within_band(self, anchor: Link, measured: Link) -> bool:
        """Whether ``measured`` RTT and bandwidth both lie within the band around ``anchor``."""
        rtt_ref = max(anchor.rtt_ms, _RTT_FLOOR_MS)
        rtt_moved = abs(measured.rtt_ms - anchor.rtt_ms) / rtt_ref
        bw_moved = abs(measured.bandwidth_mbps - anchor.bandwidth_mbps) / anchor.bandwidth_mbps
        return rtt_moved <= self.band and bw_moved <= self.band

    def _plan(self, edge: DeviceProfile, link: Link, constraints: dict[str, Any]) -> Plan:
        return plan(self.profile, edge, self.cloud, link, **constraints, **self._plan_args)
