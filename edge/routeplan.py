"""Which targets a model's requests from local applications may go to, and which one comes first:
pure logic from the model's placement, the agent's offload settings and the models it serves.

Targets: ``edge`` (the agent's own full model), ``cloud`` (whole requests to worker pools) and
``split`` (a head ``<model>.k<k>.head`` loaded here, its tail on a pool). Rules:

* no placement (or ``follow_placements`` off) and offload disabled: no plan -- requests are
  served exactly as without offloading;
* ``cloud`` targets: the placement's pool when it says ``cloud``, plus the configured pools when
  offload is enabled; none at all when raw input must stay on the device (placement or
  settings) -- split stays allowed, only activations leave;
* ``split``: the placement's head when it is loaded, otherwise the lowest split point loaded,
  with the placement's pool (or the first configured one) for the tail;
* the first choice is the placement's mode (``edge`` without a placement); when that target
  cannot exist (head not installed, model not installed, no pool) the plan falls back to edge,
  then cloud, then split, and says why in ``note``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from edgefed.common.schemas import Placement
from edgefed.edge.config import OffloadConfig

__all__ = ["Mode", "RoutePlan", "head_name", "plan_route", "split_base", "split_target"]

Mode = Literal["edge", "cloud", "split"]
_FALLBACK_ORDER: tuple[Mode, ...] = ("edge", "cloud", "split")
_HEAD = re.compile(r"^(?P<model>.+)\.k(?P<k>[0-9]+)\.head$")


def head_name(model: str, k: int) -> str:
    """The artifact name of the head of ``model`` split at ``k``."""
    return f"{model}.k{k}.head"


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """Where one model's local requests may run (see the module docstring)."""

    model: str
    placement: Placement | None
    local: bool
    """The full model is served here."""
    pools: tuple[str, ...]
    """Worker pools that may take whole requests."""
    head: str | None
    """The head used for split execution (loaded here), if any."""
    tail_pool: str | None
    """The pool that serves the tail of ``head``."""
    first: Mode | None
    """The first choice; ``None``: nothing can serve the model here."""
    keep_raw_input_on_device: bool
    note: str | None = None
    """Why the first choice is not the placement's mode."""

    @property
    def wanted(self) -> Mode:
        """The mode the placement asks for (``edge`` without one)."""
        return self.placement.mode if self.placement is not None else "edge"

    def describe(self) -> str:
        """One line for logs: what was asked, what is in force and why."""
        asked = "no placement" if self.placement is None else f"placement {self.wanted}"
        if self.placement is not None and self.placement.mode == "split":
            asked += f" at k={self.placement.split_point}"
        if self.placement is not None and self.placement.pool:
            asked += f" (pool {self.placement.pool})"
        targets = (["edge"] if self.local else []) + [f"pool {p}" for p in self.pools]
        if self.head is not None:
            targets.append(f"split {self.head} + pool {self.tail_pool}")
        line = (
            f"{self.model}: {asked}; in force: {self.first or 'nothing serves it here'}"
            f" (targets: {', '.join(targets) or 'none'})"
        )
        if self.keep_raw_input_on_device:
            line += "; raw input stays on the device"
        return line + (f"; {self.note}" if self.note else "")


def plan_route(
    model: str,
    placement: Placement | None,
    config: OffloadConfig,
    served: Iterable[str],
) -> RoutePlan | None:
    """The plan for ``model`` given the names of the models served here (full and heads);
    ``None`` when requests are served as without offloading."""
    if not config.follow_placements:
        placement = None
    if placement is None and not config.enabled:
        return None
    names = set(served)
    keep_raw = config.keep_raw_input_on_device or (
        placement is not None and placement.keep_raw_input_on_device
    )
    local = model in names
    pools: list[str] = []
    if placement is not None and placement.mode == "cloud" and placement.pool is not None:
        pools.append(placement.pool)
    if config.enabled:
        pools += [p for p in config.pools if p not in pools]
    if keep_raw:
        pools = []
    split = split_target(model, placement, config, names)
    head, tail_pool = split if split is not None else (None, None)

    available: dict[Mode, bool] = {"edge": local, "cloud": bool(pools), "split": head is not None}
    wanted: Mode = placement.mode if placement is not None else "edge"
    notes: list[str] = []
    if placement is not None and placement.mode == "split":
        asked = head_name(model, placement.split_point or 0)
        if asked not in names:
            notes.append(f"the head {asked} is not installed")
        elif tail_pool is None:
            notes.append("no pool serves the tail")
    first: Mode | None = wanted
    if not available[wanted]:
        if wanted == "edge":
            notes.append(f"{model} is not installed here")
        elif wanted == "cloud":
            notes.append("raw input stays on the device (offload.keep_raw_input_on_device)")
        first = next((m for m in _FALLBACK_ORDER if available[m]), None)
        notes.append(f"falling back to {first}" if first else "no other target")
    elif wanted == "split" and notes:
        notes.append(f"split runs with {head} instead")
    return RoutePlan(
        model=model,
        placement=placement,
        local=local,
        pools=tuple(pools),
        head=head,
        tail_pool=tail_pool,
        first=first,
        keep_raw_input_on_device=keep_raw,
        note="; ".join(notes) or None,
    )


def split_target(
    model: str, placement: Placement | None, config: OffloadConfig, served: Iterable[str]
) -> tuple[str, str] | None:
    """The head (loaded here) and the tail's pool for split execution of ``model``: the
    placement's head when loaded, else the lowest split point loaded; the placement's pool,
    else the first configured one. ``None`` without a head or a pool."""
    tail_pool = placement.pool if placement is not None and placement.pool else None
    tail_pool = tail_pool or (config.pools[0] if config.pools else None)
    heads = _heads_of(model, served)
    if tail_pool is None or not heads:
        return None
    wanted_k = placement.split_point if placement is not None else None
    return (heads[wanted_k] if wanted_k in heads else heads[min(heads)]), tail_pool


def _heads_of(model: str, names: Iterable[str]) -> dict[int, str]:
    heads: dict[int, str] = {}
    for name in names:
        match = _HEAD.match(name)
        if match and match.group("model") == model:
            heads[int(match.group("k"))] = name
    return heads


def split_base(name: str) -> str | None:
    """The model a head belongs to (``m.k2.head`` -> ``m``), ``None`` for other names."""
    match = _HEAD.match(name)
    return match.group("model") if match else None
