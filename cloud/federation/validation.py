"""Validation of client updates before any strategy sees them.

None of Flower's strategies checks what a client sends: a NaN, a tensor of the wrong shape or a
claimed example count of 1e12 (which FedAvg trusts as a weight) poisons or crashes the round.
Every reply goes through :class:`UpdateValidator` first; a rejected reply is dropped with its
reason and the round goes on with the rest.

The norm check has two parts: an absolute cap on ``||w_i - w_global||₂`` (off by default: its
scale depends on the model) and a relative one, ``norm_ratio`` times the median norm of the
round's otherwise-valid updates (with at least three of them; a median of two is one of them).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from edgefed.cloud.federation.errors import FederationConfigError
from edgefed.cloud.federation.records import NDArray

log = logging.getLogger(__name__)

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
MIN_UPDATES_FOR_MEDIAN = 3
"""Below this many otherwise-valid updates the relative norm check is skipped."""


@dataclass(frozen=True)
class ValidationLimits:
    """Bounds an update must respect; 0 switches ``max_update_norm`` and ``norm_ratio`` off."""

    max_update_norm: float = 0.0
    norm_ratio: float = 5.0
    max_num_examples: int = 1_000_000
    weight_key: str = "num-examples"

    def __post_init__(self) -> None:
        if not math.isfinite(self.max_update_norm) or self.max_update_norm < 0:
            raise FederationConfigError("max-update-norm", "must be a finite number >= 0")
        if not math.isfinite(self.norm_ratio) or self.norm_ratio < 0:
            raise FederationConfigError("norm-ratio", "must be a finite number >= 0")
        if 0 < self.norm_ratio <= 1:
            raise FederationConfigError(
                "norm-ratio", f"{self.norm_ratio} would reject half of every round; use > 1"
            )
        if self.max_num_examples <= 0:
            raise FederationConfigError("max-num-examples", "must be a positive integer")


@dataclass(frozen=True)
class Rejection:
    """One dropped update: the node that sent it and why."""

    node_id: int
    reason: str

    def to_dict(self) -> dict[str, int | str]:
        return {"node_id": self.node_id, "reason": self.reason}


@dataclass(frozen=True)
class _Passed:
    norm: float


def _names(keys: Iterable[str], limit: int = 5) -> str:
    items = sorted(keys)
    shown = ", ".join(repr(k) for k in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _shape(shape: Iterable[int]) -> str:
    return str(tuple(int(d) for d in shape))


class UpdateValidator:
    """Checks training replies against the global model that was sent in the same round."""

    def __init__(
        self, reference: Mapping[str, NDArray], limits: ValidationLimits | None = None
    ) -> None:
        self.reference = {key: np.asarray(value) for key, value in reference.items()}
        self.limits = limits or ValidationLimits()

    # ------------------------------------------------------------------ single reply

    def check(self, reply: Message) -> str | None:
        """The reason ``reply`` must be rejected, or None. Only the absolute norm cap applies
        here: the relative one needs the whole round (see :meth:`filter`)."""
        result = self._inspect(reply)
        if isinstance(result, str):
            return result
        return self._absolute_norm_problem(result.norm)

    def filter(
        self, replies: Iterable[Message], server_round: int
    ) -> tuple[list[Message], list[Rejection]]:
        """Split ``replies`` into the valid ones (in order) and the rejections, logging each."""
        passed: list[tuple[Message, float]] = []
        rejected: list[Rejection] = []
        for reply in replies:
            result = self._inspect(reply)
            problem = result if isinstance(result, str) else None
            if problem is None and isinstance(result, _Passed):
                problem = self._absolute_norm_problem(result.norm)
                if problem is None:
                    passed.append((reply, result.norm))
                    continue
            assert problem is not None
            rejected.append(Rejection(reply.metadata.src_node_id, problem))

        valid: list[Message] = []
        ratio = self.limits.norm_ratio
        median = float(np.median([n for _, n in passed])) if passed else 0.0
        use_ratio = ratio > 0 and len(passed) >= MIN_UPDATES_FOR_MEDIAN and median > 0
        for reply, norm in passed:
            if use_ratio and norm > ratio * median:
                rejected.append(
                    Rejection(
                        reply.metadata.src_node_id,
                        f"update norm {norm:.4g} is above {ratio:g} × the round's median "
                        f"update norm {median:.4g}",
                    )
                )
            else:
                valid.append(reply)

        for rejection in rejected:
            log.warning(
                "round %d: rejected the update of node %d: %s",
                server_round,
                rejection.node_id,
                rejection.reason,
            )
        return valid, rejected

    # ------------------------------------------------------------------ the checks

    def _absolute_norm_problem(self, norm: float) -> str | None:
        cap = self.limits.max_update_norm
        if cap > 0 and norm > cap:
            return f"update norm {norm:.4g} is above the cap {cap:g}"
        return None

    def _inspect(self, reply: Message) -> str | _Passed:
        if reply.has_error():
            error = reply.error
            return f"client reported an error (code {error.code}): {error.reason or 'no reason'}"
        if not reply.has_content():
            return "reply carries neither content nor an error"
        content = reply.content
        arrays = content.get(ARRAYS_KEY)
        if not isinstance(arrays, ArrayRecord):
            return f"reply has no {ARRAYS_KEY!r} ArrayRecord"
        if len(content.array_records) != 1:
            return f"reply carries ArrayRecords {_names(content.array_records)}; expected one"
        metrics = content.get(METRICS_KEY)
        if not isinstance(metrics, MetricRecord):
            return f"reply has no {METRICS_KEY!r} MetricRecord"
        if len(content.metric_records) != 1:
            return f"reply carries MetricRecords {_names(content.metric_records)}; expected one"
        problem = self._metrics_problem(metrics)
        if problem is not None:
            return problem
        return self._arrays_problem(arrays)

    def _metrics_problem(self, metrics: MetricRecord) -> str | None:
        key = self.limits.weight_key
        if key not in metrics:
            return f"{key} is missing from the metrics"
        count = metrics[key]
        if isinstance(count, bool) or not isinstance(count, int):
            return f"{key} must be an integer, got {count!r}"
        if count <= 0:
            return f"{key} must be positive, got {count}"
        if count > self.limits.max_num_examples:
            return f"{key} {count} exceeds the cap of {self.limits.max_num_examples}"
        for name, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            if not all(math.isfinite(v) for v in values):
                return f"metric {name!r} is not finite ({value!r})"
        return None

    def _arrays_problem(self, arrays: ArrayRecord) -> str | _Passed:
        reference = self.reference
        missing = reference.keys() - arrays.keys()
        unexpected = arrays.keys() - reference.keys()
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing key(s) {_names(missing)}")
            if unexpected:
                parts.append(f"unexpected key(s) {_names(unexpected)}")
            return "; ".join(parts)
        squared = 0.0
        for key, ref in reference.items():
            array = arrays[key]
            if tuple(array.shape) != ref.shape:
                return (
                    f"wrong shape for {key!r}: {_shape(array.shape)}, expected {_shape(ref.shape)}"
                )
            if array.dtype != str(ref.dtype):
                return f"wrong dtype for {key!r}: {array.dtype}, expected {ref.dtype}"
            try:
                value = array.numpy()
            except (TypeError, ValueError, OSError) as exc:
                return f"array {key!r} could not be decoded: {exc}"
            # The declared dtype/shape are metadata a client writes; check what the bytes hold.
            if value.shape != ref.shape or value.dtype != ref.dtype:
                return (
                    f"array {key!r} holds {value.dtype}{_shape(value.shape)} but declares "
                    f"{array.dtype}{_shape(array.shape)}"
                )
            if np.issubdtype(value.dtype, np.floating) or np.issubdtype(
                value.dtype, np.complexfloating
            ):
                if np.isnan(value).any():
                    return f"NaN in {key!r}"
                if np.isinf(value).any():
                    return f"Inf in {key!r}"
            diff = value.astype(np.float64) - ref.astype(np.float64)
            squared += float(np.dot(diff.ravel(), diff.ravel()))
        norm = math.sqrt(squared)
        if not math.isfinite(norm):
            return f"update norm overflows ({norm})"
        return _Passed(norm)
