"""Routing policies: given the selectable targets, pick one. Selected by name per deployment.

* ``latency``: power of two choices on cost (peak-EWMA estimate × (load + 1)): two distinct
  targets drawn at random, the cheaper wins (Mitzenmacher; Finagle's and Linkerd's balancer).
* ``round-robin``: each target in turn (in the order they were added), skipping those that
  cannot be chosen now.
* ``least-outstanding``: the fewest requests in flight (plus advertised queue), ties at random.
* ``random``: uniformly at random.

Every policy takes a :class:`random.Random` so runs can be reproduced from a seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from edgefed.common.errors import ConfigError
from edgefed.common.routing.config import POLICY_NAMES
from edgefed.common.routing.targets import TargetState


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[TargetState], now: float) -> TargetState:
        """One of ``candidates`` (non-empty, in the order the targets were added)."""
        ...


class LatencyAware:
    """Power of two choices on :meth:`TargetState.cost`."""

    name = "latency"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, candidates: Sequence[TargetState], now: float) -> TargetState:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(range(len(candidates)), 2)
        first, second = candidates[a], candidates[b]
        return second if second.cost(now) < first.cost(now) else first


class RoundRobin:
    name = "round-robin"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self._last: int | None = None

    def choose(self, candidates: Sequence[TargetState], now: float) -> TargetState:
        chosen = candidates[0]
        if self._last is not None:
            later = [c for c in candidates if c.order > self._last]
            chosen = later[0] if later else candidates[0]
        self._last = chosen.order
        return chosen


class LeastOutstanding:
    name = "least-outstanding"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, candidates: Sequence[TargetState], now: float) -> TargetState:
        fewest = min(c.load(now) for c in candidates)
        idlest = [c for c in candidates if c.load(now) == fewest]
        return idlest[0] if len(idlest) == 1 else self.rng.choice(idlest)


class Random:
    name = "random"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def choose(self, candidates: Sequence[TargetState], now: float) -> TargetState:
        return self.rng.choice(candidates)


_POLICIES: dict[str, type[LatencyAware | RoundRobin | LeastOutstanding | Random]] = {
    "latency": LatencyAware,
    "round-robin": RoundRobin,
    "least-outstanding": LeastOutstanding,
    "random": Random,
}
assert tuple(_POLICIES) == POLICY_NAMES


def make_policy(name: str, rng: random.Random | None = None) -> Policy:
    """The policy called ``name``; ``rng`` defaults to an unseeded one."""
    cls = _POLICIES.get(name)
    if cls is None:
        raise ConfigError(
            f"routing policy {name!r} is unknown: use one of {', '.join(POLICY_NAMES)}"
        )
    return cls(rng if rng is not None else random.Random())  # noqa: S311 - not cryptography
