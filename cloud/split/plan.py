"""Choose where a model runs for one (device, link): all on the edge, all in the cloud, or split
after ``k`` layers — whichever has the lowest estimated end-to-end latency.

The estimate of one option is::

    edge compute + transfer + cloud compute
    transfer = round trips × RTT + (bytes up + bytes down) × 8 / bandwidth

* **all-edge** (``k = num_layers``): the whole model on the device; nothing crosses the link
  (requests enter at the device's agent).
* **all-cloud** (``k = 0``): raw token ids go up, the result comes down; the cloud computes all.
* **split k** (``1 <= k < num_layers``): the device runs embeddings + layers ``[0:k]``, the hidden
  state goes up in the transfer dtype, the cloud runs layers ``[k:]`` + the task head, the result
  comes down.

A transformer's hidden state has the same shape after every layer, so every split sends as many
bytes as any other — and usually *more* than the raw token ids all-cloud sends. A split wins only
when the device is fast enough that keeping some layers local saves more cloud time than the extra
bytes cost, or when a constraint (raw input must stay on the device, memory) rules the others out.
The plan records every option's estimate so a report can show why it chose what it chose.

Decoders generate ``new_tokens`` tokens: the prompt pass yields the first, every further token is
one step. All-cloud pays one round trip (tokens stream back); a split pays a round trip *per
token* (one hidden vector up, the next token id down), because the device's head must embed each
new token before the cloud's tail can continue.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from edgefed.cloud.compress.config import Task
from edgefed.cloud.split.errors import SplitError
from edgefed.cloud.split.profile import (
    WIRE_DTYPES,
    ModelProfile,
    WireDtype,
    profile_model,
    scale,
)
from edgefed.common.devices import DeviceProfile, load_profile

__all__ = [
    "BYTES_PER_PARAM",
    "InvalidLink",
    "Link",
    "NoFeasiblePlan",
    "Option",
    "Placement",
    "Plan",
    "PlanError",
    "estimate",
    "plan",
    "plan_for",
]

Placement = Literal["edge", "cloud", "split"]
WeightDtype = Literal["fp32", "fp16", "int8"]

BYTES_PER_PARAM: dict[WeightDtype, float] = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0}
"""Weight bytes per parameter of a deployed model, for the edge memory check."""


class PlanError(SplitError):
    """A plan cannot be made from these inputs (the message says which and why)."""


class InvalidLink(PlanError):
    """Link figures that cannot describe a network (negative RTT, non-positive bandwidth)."""


class NoFeasiblePlan(PlanError):
    """Every option is ruled out by the constraints (raw input on device, edge memory)."""


@dataclass(frozen=True, slots=True)
class Link:
    """A measured network path between a device and the cloud (bandwidth taken as symmetric)."""

    rtt_ms: float
    bandwidth_mbps: float

    def __post_init__(self) -> None:
        for name in ("rtt_ms", "bandwidth_mbps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidLink(f"link {name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise InvalidLink(f"link {name} must be finite, got {value}")
        if self.rtt_ms < 0:
            raise InvalidLink(f"link RTT must be >= 0 ms, got {self.rtt_ms}")
        if self.bandwidth_mbps <= 0:
            raise InvalidLink(f"link bandwidth must be > 0 Mbit/s, got {self.bandwidth_mbps}")

    def transfer_ms(self, nbytes: int, round_trips: int = 1) -> float:
        """Time for ``round_trips`` exchanges carrying ``nbytes`` in total."""
        return round_trips * self.rtt_ms + nbytes * 8 / (self.bandwidth_mbps * 1e6) * 1e3


class Option(BaseModel):
    """One way to run the model and its estimated latency (milliseconds per request)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    placement: Placement
    k: int = Field(ge=0)
    """Layers on the device: 0 for all-cloud, ``num_layers`` for all-edge."""
    edge_ms: float
    transfer_ms: float
    cloud_ms: float
    total_ms: float
    bytes_up: int
    bytes_down: int
    round_trips: int
    edge_weight_bytes: int
    feasible: bool = True
    excluded_because: str | None = None

    @property
    def label(self) -> str:
        return {"edge": "all-edge", "cloud": "all-cloud"}.get(self.placement, f"split k={self.k}")

    def same_choice(self, other: Option) -> bool:
        return self.placement == other.placement and self.k == other.k


class Plan(BaseModel):
    """The chosen option and every option considered, with the inputs the choice was made for."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    kind: Literal["encoder", "decoder"]
    num_layers: int
    edge: DeviceProfile
    cloud: DeviceProfile
    link: Link
    dtype: WireDtype
    new_tokens: int
    keep_raw_input_on_device: bool
    edge_memory_bytes: int
    choice: Option
    options: list[Option]

    @property
    def split_point(self) -> int | None:
        """``k`` when the choice is a split, else ``None``."""
        return self.choice.k if self.choice.placement == "split" else None

    def option(self, placement: Placement, k: int | None = None) -> Option:
        """The option for ``placement`` (and ``k`` for a split)."""
        for o in self.options:
            if o.placement == placement and (k is None or o.k == k):
                return o
        raise PlanError(f"plan has no option {placement} k={k}")

    def table(self) -> str:
        """The options as a plain-text table, best first, the choice marked."""
        rows = [
            f"{'':2}{'option':<12}{'edge ms':>10}{'link ms':>10}{'cloud ms':>10}{'total ms':>10}"
            f"{'up B':>10}{'down B':>9}  note"
        ]
        ranked = sorted(self.options, key=lambda o: (not o.feasible, o.total_ms))
        for o in ranked:
            mark = "* " if o.same_choice(self.choice) else "  "
            note = o.excluded_because or ""
            rows.append(
                f"{mark}{o.label:<12}{o.edge_ms:>10.2f}{o.transfer_ms:>10.2f}{o.cloud_ms:>10.2f}"
                f"{o.total_ms:>10.2f}{o.bytes_up:>10}{o.bytes_down:>9}  {note}"
            )
        return "\n".join(rows)


def _check_dtype(dtype: str) -> WireDtype:
    for known in WIRE_DTYPES:
        if dtype == known:
            return known
    raise PlanError(f"unknown transfer dtype {dtype!r} (known: {', '.join(WIRE_DTYPES)})")


def _check_weight_dtype(dtype: str) -> WeightDtype:
    for known in BYTES_PER_PARAM:
        if dtype == known:
            return known
    raise PlanError(f"unknown weight dtype {dtype!r} (known: {', '.join(BYTES_PER_PARAM)})")


def _steps(profile: ModelProfile, new_tokens: int) -> int:
    """Generation steps after the prompt pass (0 for encoders)."""
    if profile.kind == "encoder":
        return 0
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise PlanError(f"new_tokens must be a positive integer, got {new_tokens!r}")
    if profile.decode_step is None:
        raise PlanError(f"decoder profile of {profile.model} has no decode-step times")
    return new_tokens - 1


def estimate(
    profile: ModelProfile,
    edge: DeviceProfile,
    cloud: DeviceProfile,
    link: Link,
    k: int,
    *,
    dtype: WireDtype = "fp16",
    new_tokens: int = 16,
    weight_dtype: WeightDtype = "fp32",
) -> Option:
    """The estimated latency of running ``k`` layers on the edge (0 = all-cloud,
    ``num_layers`` = all-edge) with a reference-host ``profile``. Constraints are not applied."""
    n = profile.num_layers
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise PlanError(
            f"k={k!r} is out of range for {profile.model}: 0 (all-cloud) to {n} (all-edge)"
        )
    wire = _check_dtype(dtype)
    bpp = BYTES_PER_PARAM[_check_weight_dtype(weight_dtype)]
    if not isinstance(link, Link):
        raise InvalidLink(f"link must be a Link, not {type(link).__name__}")
    steps = _steps(profile, new_tokens)
    on_edge, on_cloud = scale(profile, edge), scale(profile, cloud)
    fwd_e, fwd_c = on_edge.forward, on_cloud.forward
    step_e, step_c = on_edge.decode_step, on_cloud.decode_step
    decoder = profile.kind == "decoder"
    token_down = profile.step_input_bytes or 0
    placement: Placement

    if k == n:  # all-edge
        edge_ms = fwd_e.total_ms + (steps * step_e.total_ms if step_e else 0.0)
        cloud_ms, up, down, trips, placement = 0.0, 0, 0, 0, "edge"
    elif k == 0:  # all-cloud: one exchange; generated tokens stream back
        edge_ms = 0.0
        cloud_ms = fwd_c.total_ms + (steps * step_c.total_ms if step_c else 0.0)
        up = profile.input_bytes
        down = profile.output_bytes if not decoder else token_down * (steps + 1)
        trips, placement = 1, "cloud"
    else:  # split: prompt exchange, then one exchange per generated token
        edge_ms = fwd_e.edge_ms(k) + (steps * step_e.edge_ms(k) if step_e else 0.0)
        cloud_ms = fwd_c.cloud_ms(k) + (steps * step_c.cloud_ms(k) if step_c else 0.0)
        up = profile.activation_bytes[wire]
        if decoder and profile.step_activation_bytes is not None:
            up += steps * profile.step_activation_bytes[wire]
        down = profile.output_bytes if not decoder else token_down * (steps + 1)
        trips, placement = 1 + steps, "split"
    transfer = link.transfer_ms(up + down, trips) if trips else 0.0
    return Option(
        placement=placement,
        k=k,
        edge_ms=edge_ms,
        transfer_ms=transfer,
        cloud_ms=cloud_ms,
        total_ms=edge_ms + transfer + cloud_ms,
        bytes_up=up,
        bytes_down=down,
        round_trips=trips,
        edge_weight_bytes=profile.edge_weight_bytes(k, bpp),
    )


def _check_split_points(
    profile: ModelProfile, split_points: Collection[int] | None
) -> frozenset[int] | None:
    if split_points is None:
        return None
    allowed = frozenset(split_points)
    for k in allowed:
        profile.check_split_point(k)
    return allowed


def plan(
    profile: ModelProfile,
    edge: DeviceProfile,
    cloud: DeviceProfile,
    link: Link,
    *,
    keep_raw_input_on_device: bool = False,
    edge_memory_bytes: int | None = None,
    dtype: WireDtype = "fp16",
    new_tokens: int = 16,
    weight_dtype: WeightDtype = "fp32",
    split_points: Collection[int] | None = None,
) -> Plan:
    """The lowest-latency feasible option among all-edge, all-cloud and every split point.

    ``profile`` is a reference-host profile (:func:`~edgefed.cloud.split.profile.profile_model`);
    it is scaled to ``edge`` and ``cloud`` by their speed factors. ``keep_raw_input_on_device``
    rules out all-cloud. ``edge_memory_bytes`` (default: the edge profile's memory) rules out
    options whose on-device weights (in ``weight_dtype``) do not fit. Ties go to fewer bytes on
    the link, then to fewer layers on the device. ``split_points`` (default: every one) limits the
    splits to those that can run, e.g. whose head and tail artifacts are published; the others
    stay in the plan, ruled out. Raises :class:`NoFeasiblePlan` when nothing is left.
    """
    if profile.device != "reference":
        raise PlanError(
            f"plan needs the reference-host profile of {profile.model}, got one scaled to "
            f"{profile.device!r}"
        )
    memory = edge.memory_bytes if edge_memory_bytes is None else edge_memory_bytes
    if isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0:
        raise PlanError(f"edge memory must be a positive number of bytes, got {memory!r}")
    allowed = _check_split_points(profile, split_points)
    options: list[Option] = []
    for k in range(profile.num_layers + 1):
        option = estimate(
            profile,
            edge,
            cloud,
            link,
            k,
            dtype=dtype,
            new_tokens=new_tokens,
            weight_dtype=weight_dtype,
        )
        reason = None
        if k == 0 and keep_raw_input_on_device:
            reason = "raw input must stay on the device"
        elif allowed is not None and 0 < k < profile.num_layers and k not in allowed:
            reason = f"no head/tail artifacts for split point {k}"
        elif option.edge_weight_bytes > memory:
            reason = (
                f"needs {option.edge_weight_bytes} B of weights on the device, limit {memory} B"
            )
        if reason is not None:
            option = option.model_copy(update={"feasible": False, "excluded_because": reason})
        options.append(option)
    feasible = [o for o in options if o.feasible]
    if not feasible:
        raise NoFeasiblePlan(
            f"no way to run {profile.model} on {edge.name}: "
            + "; ".join(f"{o.label}: {o.excluded_because}" for o in options)
        )
    best = min(feasible, key=lambda o: (o.total_ms, o.bytes_up + o.bytes_down, o.k))
    return Plan(
        model=profile.model,
        kind=profile.kind,
        num_layers=profile.num_layers,
        edge=edge,
        cloud=cloud,
        link=link,
        dtype=_check_dtype(dtype),
        new_tokens=new_tokens if profile.kind == "decoder" else 1,
        keep_raw_input_on_device=keep_raw_input_on_device,
        edge_memory_bytes=memory,
        choice=best,
        options=options,
    )


def plan_for(
    model_dir: Path,
    device_name: str,
    rtt_ms: float,
    bandwidth_mbps: float,
    *,
    cloud_name: str = "cloud-cpu",
    task: Task | None = None,
    batch: int = 1,
    seq: int = 128,
    new_tokens: int = 16,
    keep_raw_input_on_device: bool = False,
    edge_memory_bytes: int | None = None,
    dtype: WireDtype = "fp16",
    weight_dtype: WeightDtype = "fp32",
    profile: ModelProfile | None = None,
    measured: dict[str, DeviceProfile] | None = None,
) -> Plan:
    """Profile the model in ``model_dir`` on this host (or use ``profile``) and plan it for the
    device profile ``device_name`` on a link of ``rtt_ms`` and ``bandwidth_mbps``.

    Device names resolve through :func:`~edgefed.common.devices.load_profile` (``measured``
    profiles first). Bad names and link figures fail before any profiling.
    """
    edge = load_profile(device_name, measured=measured)
    cloud = load_profile(cloud_name, measured=measured)
    link = Link(rtt_ms=rtt_ms, bandwidth_mbps=bandwidth_mbps)
    _check_dtype(dtype)
    if profile is None:
        profile = profile_model(Path(model_dir), task=task, batch=batch, seq=seq)
    return plan(
        profile,
        edge,
        cloud,
        link,
        keep_raw_input_on_device=keep_raw_input_on_device,
        edge_memory_bytes=edge_memory_bytes,
        dtype=dtype,
        new_tokens=new_tokens,
        weight_dtype=weight_dtype,
    )


def best_split(plan_: Plan) -> Option | None:
    """The best feasible split option of a plan (for reports), or ``None``."""
    splits: Sequence[Option] = [o for o in plan_.options if o.placement == "split" and o.feasible]
    return min(splits, key=lambda o: o.total_ms, default=None)
