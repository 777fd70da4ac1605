"""The strategies a run can choose, and the validation that stands in front of every one of them.

``build_strategy`` returns Flower's own strategies (FedAvg, FedProx, FedTrimmedAvg, FedMedian,
Krum, MultiKrum, Bulyan) or :class:`~edgefed.cloud.federation.fltrust.FLTrust`, optionally
wrapped in Flower's central-DP wrapper with fixed clipping, and always wrapped (outermost) in
:class:`ValidatingStrategy`. Validation has to be outermost: the DP wrapper refuses to aggregate
a round that holds a single error reply, and the robust aggregators would still take a NaN or a
wrongly shaped tensor into their sorting.

Byzantine-robust rules need enough clients to outvote ``f`` attackers (Krum: ``n >= 2f + 3``,
Bulyan: ``n >= 4f + 3``); a run whose minimum node count cannot satisfy that is refused at start,
and a round with fewer valid updates than that fails instead of aggregating without the
guarantee.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any, Final

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies
from flwr.serverapp.strategy import (
    Bulyan,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)

from edgefed.cloud.federation.errors import FederationConfigError, RoundFailed
from edgefed.cloud.federation.fltrust import FLTrust, RootUpdate
from edgefed.cloud.federation.records import NDArray, to_numpy
from edgefed.cloud.federation.validation import (
    METRICS_KEY,
    Rejection,
    UpdateValidator,
    ValidationLimits,
)

log = logging.getLogger(__name__)

STRATEGY_NAMES: Final = (
    "fedavg",
    "fedprox",
    "fedtrimmedavg",
    "fedmedian",
    "krum",
    "multikrum",
    "bulyan",
    "fltrust",
)


class ValidatingStrategy(Strategy):
    """Validates every reply before ``inner`` sees it; see :mod:`.validation` for the checks.

    ``rejections[r]`` lists the updates dropped in round ``r`` (including sampled nodes that did
    not answer), ``accepted[r]`` counts the aggregated ones. A round with fewer than
    ``min_valid_updates`` valid updates raises :class:`RoundFailed`, as does an aggregate that is
    not finite.
    """

    def __init__(
        self,
        inner: Strategy,
        limits: ValidationLimits | None = None,
        min_valid_updates: int = 1,
        *,
        requirement: str = "",
    ) -> None:
        if min_valid_updates < 1:
            raise FederationConfigError("min-valid-updates", "must be at least 1")
        self.inner = inner
        self.limits = limits or ValidationLimits()
        self.min_valid_updates = min_valid_updates
        self.requirement = requirement
        self.rejections: dict[int, list[Rejection]] = {}
        self.accepted: dict[int, int] = {}
        self.evaluate_rejections: dict[int, list[Rejection]] = {}
        self.train_metrics: dict[int, MetricRecord] = {}
        self.evaluate_metrics: dict[int, MetricRecord] = {}
        self._reference: dict[str, NDArray] = {}
        self._sampled: dict[int, list[int]] = {}

    @property
    def innermost(self) -> Strategy:
        """The aggregation rule itself, under any DP wrapper."""
        strategy = self.inner
        while isinstance(strategy, DifferentialPrivacyServerSideFixedClipping):
            strategy = strategy.strategy
        return strategy

    def summary(self) -> None:
        log.info(
            "update validation: max update norm %s, norm ratio %s, max %s examples, "
            "min %d valid updates per round",
            self.limits.max_update_norm or "off",
            self.limits.norm_ratio or "off",
            self.limits.max_num_examples,
            self.min_valid_updates,
        )
        self.inner.summary()

    # ------------------------------------------------------------------ training

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._reference = to_numpy(arrays)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._sampled[server_round] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        validator = UpdateValidator(self._reference, self.limits)
        valid, rejected = validator.filter(replies, server_round)
        answered = {reply.metadata.src_node_id for reply in replies}
        for node_id in self._sampled.pop(server_round, []):
            if node_id not in answered:
                reason = "no reply before the round's timeout (node gone or too slow)"
                log.warning("round %d: node %d: %s", server_round, node_id, reason)
                rejected.append(Rejection(node_id, reason))
        rejected.sort(key=lambda r: r.node_id)
        self.rejections[server_round] = rejected
        self.accepted[server_round] = len(valid)

        if len(valid) < self.min_valid_updates:
            need = f"need {self.min_valid_updates}"
            if self.requirement:
                need += f" ({self.requirement})"
            reasons = "; ".join(f"node {r.node_id}: {r.reason}" for r in rejected)
            noun = "update" if len(valid) == 1 else "updates"
            raise RoundFailed(
                f"round {server_round}: {len(valid)} valid {noun} of {len(replies)}, {need}"
                + (f": {reasons}" if reasons else ""),
                server_round=server_round,
            )

        _harmonise_metrics(valid)
        name = type(self.innermost).__name__
        try:
            arrays, metrics = self.inner.aggregate_train(server_round, valid)
        except (InconsistentMessageReplies, AggregationError, ValueError) as exc:
            raise RoundFailed(
                f"round {server_round}: {name} could not aggregate {len(valid)} valid updates: "
                f"{exc}",
                server_round=server_round,
            ) from exc
        if arrays is None:
            raise RoundFailed(
                f"round {server_round}: {name} produced no aggregate from {len(valid)} valid "
                "updates",
                server_round=server_round,
            )
        self._check_aggregate(server_round, name, arrays)
        if metrics is not None:
            self.train_metrics[server_round] = metrics
        return arrays, metrics

    def _check_aggregate(self, server_round: int, name: str, arrays: ArrayRecord) -> None:
        if set(arrays.keys()) != set(self._reference):
            raise RoundFailed(
                f"round {server_round}: the aggregate of {name} has other keys than the model",
                server_round=server_round,
            )
        for key, array in arrays.items():
            value = array.numpy()
            if value.shape != self._reference[key].shape:
                raise RoundFailed(
                    f"round {server_round}: the aggregate of {name} has shape {value.shape} "
                    f"for {key!r}, expected {self._reference[key].shape}",
                    server_round=server_round,
                )
            if not np.isfinite(value).all():
                raise RoundFailed(
                    f"round {server_round}: the aggregate of {name} is not finite in {key!r}",
                    server_round=server_round,
                )

    # ------------------------------------------------------------------ evaluation

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        valid: list[Message] = []
        rejected: list[Rejection] = []
        for reply in replies:
            problem = _evaluate_reply_problem(reply, self.limits)
            if problem is None:
                valid.append(reply)
            else:
                log.warning(
                    "round %d: ignored the evaluation of node %d: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    problem,
                )
                rejected.append(Rejection(reply.metadata.src_node_id, problem))
        self.evaluate_rejections[server_round] = rejected
        if not valid:
            return None
        _harmonise_metrics(valid)
        metrics = self.inner.aggregate_evaluate(server_round, valid)
        if metrics is not None:
            self.evaluate_metrics[server_round] = metrics
        return metrics


def _evaluate_reply_problem(reply: Message, limits: ValidationLimits) -> str | None:
    if reply.has_error():
        error = reply.error
        return f"client reported an error (code {error.code}): {error.reason or 'no reason'}"
    if not reply.has_content():
        return "reply carries neither content nor an error"
    metrics = reply.content.get(METRICS_KEY)
    if not isinstance(metrics, MetricRecord) or len(reply.content.metric_records) != 1:
        return f"reply has no single {METRICS_KEY!r} MetricRecord"
    count = metrics.get(limits.weight_key)
    if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        return f"{limits.weight_key} must be a positive integer, got {count!r}"
    if count > limits.max_num_examples:
        return f"{limits.weight_key} {count} exceeds the cap of {limits.max_num_examples}"
    for name, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            return f"metric {name!r} is not finite ({value!r})"
    return None


def _harmonise_metrics(replies: list[Message]) -> None:
    """Keep only the scalar metrics every reply has: Flower's aggregation refuses a whole round
    when one client adds or lacks a metric key."""
    records = [reply.content[METRICS_KEY] for reply in replies]
    if not records:
        return
    common = set.intersection(
        *({k for k, v in rec.items() if not isinstance(v, list)} for rec in records)
    )
    for reply, record in zip(replies, records, strict=True):
        assert isinstance(record, MetricRecord)
        if set(record.keys()) != common:
            content: RecordDict = reply.content
            content[METRICS_KEY] = MetricRecord({k: v for k, v in record.items() if k in common})


# ---------------------------------------------------------------------------- building


def _require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise FederationConfigError(key, problem)


def build_strategy(
    name: str,
    *,
    fraction_train: float = 1.0,
    min_train_nodes: int = 2,
    min_available_nodes: int | None = None,
    fraction_evaluate: float = 1.0,
    min_evaluate_nodes: int | None = None,
    proximal_mu: float = 0.0,
    trimmed_beta: float = 0.2,
    num_malicious_nodes: int = 0,
    num_nodes_to_select: int | None = None,
    root_update: RootUpdate | None = None,
    dp_noise_multiplier: float = 0.0,
    dp_clipping_norm: float = 0.0,
    limits: ValidationLimits | None = None,
    min_valid_updates: int = 1,
) -> ValidatingStrategy:
    """The strategy ``name`` with its options checked, DP when ``dp_clipping_norm > 0``, and
    validation in front. Bad options raise :class:`FederationConfigError` naming the run-config
    key (``strategy``, ``min-train-nodes``, ``krum-byzantine``, ``trimmed-beta``, …)."""
    _require(
        name in STRATEGY_NAMES,
        "strategy",
        f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}",
    )
    _require(0.0 < fraction_train <= 1.0, "fraction-train", "must be in (0, 1]")
    _require(0.0 <= fraction_evaluate <= 1.0, "fraction-evaluate", "must be in [0, 1]")
    _require(min_train_nodes >= 1, "min-train-nodes", "must be at least 1")
    _require(num_malicious_nodes >= 0, "krum-byzantine", "must be >= 0")
    _require(
        min_valid_updates <= min_train_nodes,
        "min-valid-updates",
        f"{min_valid_updates} is more than min-train-nodes ({min_train_nodes})",
    )
    sampling: dict[str, Any] = {
        "fraction_train": fraction_train,
        "fraction_evaluate": fraction_evaluate,
        "min_train_nodes": min_train_nodes,
        "min_evaluate_nodes": min_train_nodes if min_evaluate_nodes is None else min_evaluate_nodes,
        "min_available_nodes": min_train_nodes
        if min_available_nodes is None
        else min_available_nodes,
    }
    f = num_malicious_nodes
    requirement = ""
    inner: Strategy
    if name == "fedavg":
        inner = FedAvg(**sampling)
    elif name == "fedprox":
        _require(
            proximal_mu > 0 and math.isfinite(proximal_mu),
            "proximal-mu",
            "fedprox needs a proximal term > 0 (with 0 it is fedavg)",
        )
        inner = FedProx(**sampling, proximal_mu=proximal_mu)
    elif name == "fedtrimmedavg":
        _require(0.0 <= trimmed_beta < 0.5, "trimmed-beta", "must be in [0, 0.5)")
        if int(trimmed_beta * min_train_nodes) == 0 and trimmed_beta > 0:
            log.warning(
                "trimmed-beta %s trims nothing with %d nodes", trimmed_beta, min_train_nodes
            )
        inner = FedTrimmedAvg(**sampling, beta=trimmed_beta)
    elif name == "fedmedian":
        inner = FedMedian(**sampling)
    elif name in ("krum", "multikrum"):
        need = 2 * f + 3
        requirement = f"{name} with krum-byzantine={f} needs 2·{f}+3"
        _require(
            min_train_nodes >= need,
            "min-train-nodes",
            f"{name} with krum-byzantine={f} needs at least {need} nodes per round "
            f"(n >= 2f + 3), got {min_train_nodes}",
        )
        min_valid_updates = max(min_valid_updates, need)
        if name == "krum":
            inner = Krum(**sampling, num_malicious_nodes=f)
        else:
            select = num_nodes_to_select or max(1, min_train_nodes - f)
            _require(select >= 1, "krum-select", "must be at least 1")
            inner = MultiKrum(**sampling, num_malicious_nodes=f, num_nodes_to_select=select)
    elif name == "bulyan":
        need = 4 * f + 3
        requirement = f"bulyan with krum-byzantine={f} needs 4·{f}+3"
        _require(
            min_train_nodes >= need,
            "min-train-nodes",
            f"bulyan with krum-byzantine={f} needs at least {need} nodes per round "
            f"(n >= 4f + 3), got {min_train_nodes}",
        )
        min_valid_updates = max(min_valid_updates, need)
        inner = Bulyan(**sampling, num_malicious_nodes=f)
    else:  # fltrust
        _require(root_update is not None, "root-data", "fltrust needs the server's root data set")
        assert root_update is not None
        inner = FLTrust(root_update=root_update, **sampling)

    _require(
        dp_noise_multiplier >= 0 and math.isfinite(dp_noise_multiplier),
        "dp-noise-multiplier",
        "must be a finite number >= 0",
    )
    _require(
        dp_clipping_norm >= 0 and math.isfinite(dp_clipping_norm),
        "dp-clipping-norm",
        "must be a finite number >= 0",
    )
    if dp_clipping_norm > 0:
        inner = DifferentialPrivacyServerSideFixedClipping(
            inner,
            noise_multiplier=dp_noise_multiplier,
            clipping_norm=dp_clipping_norm,
            num_sampled_clients=min_train_nodes,
        )
    else:
        _require(
            dp_noise_multiplier == 0,
            "dp-noise-multiplier",
            "central DP needs dp-clipping-norm > 0 as well",
        )
    return ValidatingStrategy(inner, limits, min_valid_updates, requirement=requirement)
