"""Device profiles: how fast a kind of device computes relative to the reference host, and how
much memory it has for models.

The split planner (``edgefed.cloud.split``) profiles a model's per-layer cost once, on the
controller's host with ONNX Runtime, and scales it to a device by the device's
:attr:`DeviceProfile.speed_factor` (how many times *slower* than the reference host the device
computes the same graphs; 0.5 means twice as fast).

Two kinds of profile exist:

* **built-in** ones (:data:`BUILTIN_PROFILES`), whose factors are *estimates* derived from
  published hardware figures (core type, clock, SIMD width, GPU class). They are round numbers
  on purpose: real factors depend on the model, the sequence length, the execution provider and
  thermal state, and are only known to within a factor of about two without measuring;
* **measured** ones, made from what an agent reports after timing a set of reference graphs on
  the device itself (:class:`MeasuredDeviceReport`) against the same graphs timed on the
  reference host (:func:`profile_from_report`). Prefer these whenever an agent has reported one.

This module is light on purpose (pydantic only): edge agents import it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefed.common.errors import ConfigError, PermanentError

__all__ = [
    "BUILTIN_PROFILES",
    "REFERENCE_PROFILE",
    "DeviceProfile",
    "DeviceProfileError",
    "MeasuredDeviceReport",
    "UnknownDeviceProfile",
    "load_profile",
    "profile_from_report",
    "profile_names",
]

GIB = 1024**3

ProfileSource = Literal["measured", "cited", "estimated"]


class DeviceProfileError(PermanentError):
    """A device profile or a measured report is invalid."""

    exit_code = 65  # EX_DATAERR


class UnknownDeviceProfile(ConfigError):
    """A device profile name that edgefed does not know (the message lists the known ones)."""


class DeviceProfile(BaseModel):
    """How fast a kind of device computes and how much memory models may use on it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128)
    speed_factor: float = Field(gt=0, allow_inf_nan=False)
    """How many times slower than the reference host this device runs the same ONNX graphs
    (1.0 = the reference host; 0.5 = twice as fast; 6 = six times slower)."""
    memory_bytes: int = Field(gt=0)
    """Memory available to models on the device (the planner's default edge memory limit)."""
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    """ONNX Runtime execution providers the factor was estimated or measured for, in order."""
    source: ProfileSource
    """``measured`` (timed on the device), ``cited`` (a published figure for this workload) or
    ``estimated`` (derived from published hardware figures; see :attr:`note`)."""
    note: str = ""
    """Why the factor is what it is: the measurement, or the citation and reasoning."""

    def scale_ms(self, reference_ms: float) -> float:
        """Milliseconds this device needs for work that takes ``reference_ms`` on the host."""
        return reference_ms * self.speed_factor


REFERENCE_PROFILE = DeviceProfile(
    name="reference",
    speed_factor=1.0,
    memory_bytes=8 * GIB,
    source="measured",
    note=(
        "The host that profiles models (the controller). Factor 1 by definition: every other "
        "factor is relative to it. The development host is a 2-vCPU x86-64 AMD EPYC with AVX2 "
        "(no AVX-512/VNNI), ONNX Runtime CPU."
    ),
)

# Reasoning shared by the estimates: ONNX Runtime on a CPU at batch 1 is bound by fp32 SIMD
# throughput (cores x SIMD width x FMA pipes x clock) and memory bandwidth. The reference host's
# 2 AVX2 vCPUs at ~3 GHz peak at roughly 100-200 GFLOP/s fp32. Each estimate compares the
# device's published core type and clock with that, then rounds, because the measured ratio
# routinely differs from the peak ratio by up to ~2x (memory bandwidth, thread scaling,
# provider overheads at small shapes).
BUILTIN_PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        REFERENCE_PROFILE,
        DeviceProfile(
            name="jetson-orin-nano",
            speed_factor=1.0,
            memory_bytes=8 * GIB,
            providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
            source="estimated",
            note=(
                "Estimate, plausible range 0.5-2. Hardware (NVIDIA Jetson Orin Nano 8GB data "
                "sheet): 6-core Arm Cortex-A78AE at 1.5 GHz, 1024-core Ampere GPU with 32 "
                "tensor cores, 8 GB LPDDR5 shared by CPU and GPU. With the CUDA/TensorRT "
                "providers in fp16 the GPU out-computes the reference CPU, but small "
                "batch-1 transformer graphs are dominated by kernel launch overheads, so we "
                "assume parity rather than the peak-FLOPs ratio. On the CPU provider alone "
                "expect ~1.5."
            ),
        ),
        DeviceProfile(
            name="jetson-nano",
            speed_factor=6.0,
            memory_bytes=4 * GIB,
            providers=("CPUExecutionProvider",),
            source="estimated",
            note=(
                "Estimate, plausible range 4-10. Hardware (NVIDIA Jetson Nano developer kit "
                "specifications): 4-core Arm Cortex-A57 at 1.43 GHz (128-bit NEON, ~11 GFLOP/s "
                "fp32 per core peak, ~46 in total), 128-core Maxwell GPU, 4 GB LPDDR4 shared. "
                "Peak fp32 CPU throughput is ~3-4x below the reference host and memory "
                "bandwidth (25.6 GB/s, shared) is lower still; recent ONNX Runtime GPU builds "
                "no longer target JetPack 4 (the Nano's last release), so the CPU provider is "
                "assumed."
            ),
        ),
        DeviceProfile(
            name="raspberry-pi-5",
            speed_factor=2.0,
            memory_bytes=8 * GIB,
            providers=("CPUExecutionProvider",),
            source="estimated",
            note=(
                "Estimate, plausible range 1.5-3. Hardware (Raspberry Pi 5 product brief): "
                "Broadcom BCM2712, 4-core Arm Cortex-A76 at 2.4 GHz (128-bit NEON, ~38 GFLOP/s "
                "fp32 per core peak, ~150 in total), LPDDR4X-4267; 8 GB assumed (4, 8 and 16 GB "
                "versions exist). Per-core SIMD throughput is ~2.5x below a Zen AVX2 core; four "
                "cores recover part of it, thread scaling at batch 1 does not recover all."
            ),
        ),
        DeviceProfile(
            name="x86-nuc",
            speed_factor=0.8,
            memory_bytes=16 * GIB,
            providers=("CPUExecutionProvider",),
            source="estimated",
            note=(
                "Estimate, plausible range 0.5-1.2. An Intel NUC-class mini PC (4 performance "
                "cores of a recent Core i5/i7 mobile part, AVX2, ~4 GHz turbo, 16 GB). Same "
                "instruction set as the reference host with more cores and higher clocks; "
                "sustained clocks in a small chassis limit the gain."
            ),
        ),
        DeviceProfile(
            name="cloud-cpu",
            speed_factor=0.5,
            memory_bytes=32 * GIB,
            providers=("CPUExecutionProvider",),
            source="estimated",
            note=(
                "Estimate, plausible range 0.3-0.8. A cloud worker with 8 current-generation "
                "server vCPUs (AVX-512, often VNNI), ONNX Runtime CPU. Four times the reference "
                "host's vCPUs, but intra-op thread scaling of batch-1 transformer graphs is far "
                "from linear, so ~2x is assumed rather than 4x."
            ),
        ),
    )
}


def profile_names() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(BUILTIN_PROFILES)


def load_profile(
    name: str, *, measured: Mapping[str, DeviceProfile] | None = None
) -> DeviceProfile:
    """The profile called ``name``: a measured one from ``measured`` (e.g. what agents
    reported) when there is one, else a built-in one.

    Raises :class:`UnknownDeviceProfile` naming the known profiles otherwise.
    """
    if not isinstance(name, str):
        raise UnknownDeviceProfile(f"a device profile name must be a string, not {name!r}")
    if measured is not None and name in measured:
        return measured[name]
    try:
        return BUILTIN_PROFILES[name]
    except KeyError:
        known = sorted({*BUILTIN_PROFILES, *(measured or {})})
        raise UnknownDeviceProfile(
            f"unknown device profile {name!r} (known: {', '.join(known)})"
        ) from None


# --------------------------------------------------------------------------- measured profiles


class MeasuredDeviceReport(BaseModel):
    """What an agent reports after timing reference graphs on its device.

    The agent times the same ONNX graphs the controller timed on the reference host (identified
    by :attr:`graphs_sha256`, e.g. the embeddings, one transformer layer and the head of a
    profiled model) at the same input shape, median milliseconds per graph. The controller turns
    it into a :class:`DeviceProfile` with :func:`profile_from_report`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    device: str = Field(min_length=1, max_length=128)
    """The profile name to record (e.g. the agent id or a device class such as ``pi5-lab``)."""
    agent_id: str | None = Field(default=None, max_length=128)
    graphs_sha256: dict[str, str] = Field(min_length=1)
    """Graph name -> SHA-256 of the ONNX file timed (the controller checks they match its own)."""
    median_ms: dict[str, float] = Field(min_length=1)
    """Graph name -> median milliseconds per run on the device."""
    batch: int = Field(ge=1)
    seq: int = Field(ge=1)
    providers: tuple[str, ...] = Field(min_length=1)
    """The execution providers the sessions really used (``session.get_providers()``)."""
    memory_bytes: int = Field(gt=0)
    """Memory available to models on the device."""
    measured_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @field_validator("median_ms")
    @classmethod
    def _positive_times(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"median times must be positive and finite, got {bad}")
        return value


def profile_from_report(
    report: MeasuredDeviceReport,
    reference_ms: Mapping[str, float],
    reference_sha256: Mapping[str, str],
) -> DeviceProfile:
    """A measured :class:`DeviceProfile` from an agent's report and the reference host's times
    for the same graphs: the speed factor is the median of the per-graph ratios
    ``device_ms / reference_ms``.

    Raises :class:`DeviceProfileError` when the report shares no graph with the reference, or a
    shared graph's hash differs (the agent timed a different graph).
    """
    common = sorted(set(report.median_ms) & set(reference_ms))
    if not common:
        raise DeviceProfileError(
            f"device report {report.device!r} times none of the reference graphs "
            f"(report: {', '.join(sorted(report.median_ms))}; "
            f"reference: {', '.join(sorted(reference_ms))})"
        )
    mismatched = [
        g for g in common if report.graphs_sha256.get(g) != reference_sha256.get(g, object())
    ]
    if mismatched:
        raise DeviceProfileError(
            f"device report {report.device!r} timed different graphs than the reference host "
            f"(SHA-256 differs or is missing for {', '.join(mismatched)})"
        )
    for g in common:
        if not (math.isfinite(reference_ms[g]) and reference_ms[g] > 0):
            raise DeviceProfileError(
                f"reference time of graph {g!r} is not positive: {reference_ms[g]}"
            )
    ratios = [report.median_ms[g] / reference_ms[g] for g in common]
    factor = statistics.median(ratios)
    return DeviceProfile(
        name=report.device,
        speed_factor=factor,
        memory_bytes=report.memory_bytes,
        providers=report.providers,
        source="measured",
        note=(
            f"measured {report.measured_at.isoformat()} by {report.agent_id or 'an agent'} at "
            f"batch {report.batch}, seq {report.seq} on {len(common)} graph(s) "
            f"({', '.join(common)}); per-graph ratios "
            f"{', '.join(f'{r:.2f}' for r in ratios)}, median taken"
        ),
    )
