"""Vertical hints: CPU and memory requests for a worker from what workers really used.

Like Kubernetes' VerticalPodAutoscaler recommender, in its simplest honest form: CPU is
compressible (a busy worker is throttled, not killed), so its request covers a high percentile
(p90 by default) of observed usage, plus a safety margin; memory is not (a worker over its limit
is OOM-killed), so its request covers the *peak* plus the margin. Limits sit above requests by a
factor. Values are rounded up to Kubernetes quantities (``"250m"``, ``"512Mi"``) ready for a
container's ``resources``. The hint is advice shown to the operator, never applied by itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgefed.cloud.orchestration.errors import OrchestrationError
from edgefed.cloud.orchestration.signals import ResourceUsage
from edgefed.common.errors import ConfigError, PermanentError, TemporaryError

MIN_SAMPLES = 20
CPU_STEP_MILLI = 10
"""CPU requests are rounded up to this many millicores (never below it)."""
MIB = 1024 * 1024


class NotEnoughUsage(OrchestrationError, TemporaryError):
    """Too few usage samples for a recommendation to mean anything; more will come."""


class InvalidUsage(OrchestrationError, PermanentError):
    """A usage sample with a negative or non-finite value."""

    exit_code = 65  # EX_DATAERR


@dataclass(frozen=True)
class ResourceRecommendation:
    """Requests and limits for one worker container, with the evidence behind them."""

    cpu_request: str
    memory_request: str
    cpu_limit: str
    memory_limit: str
    samples: int
    span_s: float
    """Time covered by the samples."""
    cpu_percentile: float
    cpu_at_percentile_cores: float
    cpu_peak_cores: float
    memory_peak_bytes: int
    margin: float

    def resources(self) -> dict[str, dict[str, str]]:
        """The container's ``resources`` block."""
        return {
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request},
            "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit},
        }


def cpu_quantity(cores: float) -> str:
    """Cores rounded up to 10 millicores, as a Kubernetes quantity (0.2431 -> "250m")."""
    milli = max(CPU_STEP_MILLI, math.ceil(round(cores * 1000, 6) / CPU_STEP_MILLI) * CPU_STEP_MILLI)
    return f"{milli}m"


def memory_quantity(size: float) -> str:
    """Bytes rounded up to a mebibyte, as a Kubernetes quantity (500_000_000 -> "477Mi")."""
    return f"{max(1, math.ceil(size / MIB))}Mi"


def recommend_resources(
    usage: Sequence[ResourceUsage],
    *,
    cpu_percentile: float = 90.0,
    margin: float = 1.15,
    cpu_limit_factor: float = 2.0,
    memory_limit_factor: float = 1.25,
    min_samples: int = MIN_SAMPLES,
) -> ResourceRecommendation:
    """Recommend requests and limits from ``usage`` (samples of one or more workers).

    Raises :class:`NotEnoughUsage` with fewer than ``min_samples`` samples, and
    :class:`InvalidUsage` on a negative or non-finite sample."""
    if not 0 < cpu_percentile <= 100:
        raise ConfigError(f"cpu_percentile must be in (0, 100], not {cpu_percentile}")
    for name, factor in (
        ("margin", margin),
        ("cpu_limit_factor", cpu_limit_factor),
        ("memory_limit_factor", memory_limit_factor),
    ):
        if not (math.isfinite(factor) and factor >= 1.0):
            raise ConfigError(
                f"{name} must be at least 1 (a hint below usage starves), not {factor}"
            )
    if len(usage) < min_samples:
        raise NotEnoughUsage(
            f"{len(usage)} usage samples, need at least {min_samples} for a resource hint"
        )
    cpu = np.asarray([u.cpu_cores for u in usage], dtype=float)
    memory = np.asarray([u.memory_bytes for u in usage], dtype=float)
    for name, values in (("cpu_cores", cpu), ("memory_bytes", memory)):
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise InvalidUsage(f"usage {name} must be finite and not negative")
    cpu_at = float(np.percentile(cpu, cpu_percentile))
    memory_peak = int(memory.max())
    cpu_request = cpu_at * margin
    memory_request = memory_peak * margin
    times = [u.at for u in usage]
    return ResourceRecommendation(
        cpu_request=cpu_quantity(cpu_request),
        memory_request=memory_quantity(memory_request),
        cpu_limit=cpu_quantity(cpu_request * cpu_limit_factor),
        memory_limit=memory_quantity(memory_request * memory_limit_factor),
        samples=len(usage),
        span_s=max(times) - min(times),
        cpu_percentile=cpu_percentile,
        cpu_at_percentile_cores=cpu_at,
        cpu_peak_cores=float(cpu.max()),
        memory_peak_bytes=memory_peak,
        margin=margin,
    )
