"""FLTrust: Byzantine-robust aggregation bootstrapped by the server's own small root data set.

Cao, Fang, Liu, Gong: "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping",
NDSS 2021 (https://arxiv.org/abs/2012.13995). Flower ships no FLTrust, so it lives here.

Each round the server trains the global model on its root data set itself (the *server update*
``g0 = root - global``). A client update ``gi = wi - global`` earns the trust score
``TS_i = ReLU(cos(gi, g0))``, so an update pointing away from the server's direction counts for
nothing, and is rescaled to the server update's magnitude, ``ĝi = gi · ||g0|| / ||gi||``, so a
scaled-up update gains nothing by its size. The new global model is
``global + Σ TS_i ĝi / Σ TS_i``. When no update earns trust (``Σ TS_i = 0``) the global model is
kept for that round and the round's metrics say so.

Unlike the paper, which works on one gradient step per round, clients here send model weights
after several local steps; the update is the weight difference, which is what the paper's
"model update" means for multi-step local training (its Algorithm 1 with local iterations R > 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from edgefed.cloud.federation.errors import RoundFailed
from edgefed.cloud.federation.records import NDArray, flatten, to_numpy, to_record, unflatten

log = logging.getLogger(__name__)

RootUpdate = Callable[[int, dict[str, NDArray]], dict[str, NDArray]]
"""``(server_round, global_arrays) -> arrays after training on the root data set``."""


@dataclass(frozen=True)
class FLTrustOutcome:
    """The new global model and how much each client update was trusted (in input order)."""

    arrays: dict[str, NDArray]
    trust_scores: list[float]
    kept_global: bool


def fltrust_aggregate(
    global_arrays: Mapping[str, NDArray],
    root_arrays: Mapping[str, NDArray],
    client_arrays: Sequence[Mapping[str, NDArray]],
) -> FLTrustOutcome:
    """One FLTrust aggregation (Cao et al. 2021, Algorithm 2) on plain numpy arrays."""
    keys = list(global_arrays)
    base = flatten(global_arrays, keys)
    g0 = flatten(root_arrays, keys) - base
    g0_norm = float(np.linalg.norm(g0))
    if g0_norm == 0.0:
        # Without a server direction no client can be trusted (all cosines are undefined).
        return FLTrustOutcome(dict(global_arrays), [0.0] * len(client_arrays), kept_global=True)
    total = np.zeros_like(base)
    scores: list[float] = []
    for arrays in client_arrays:
        gi = flatten(arrays, keys) - base
        gi_norm = float(np.linalg.norm(gi))
        if gi_norm == 0.0:
            scores.append(0.0)
            continue
        score = max(0.0, float(np.dot(gi, g0) / (gi_norm * g0_norm)))
        scores.append(score)
        if score > 0.0:
            total += score * gi * (g0_norm / gi_norm)
    trust = sum(scores)
    if trust == 0.0:
        return FLTrustOutcome(dict(global_arrays), scores, kept_global=True)
    new = unflatten(base + total / trust, global_arrays)
    return FLTrustOutcome(new, scores, kept_global=False)


class FLTrust(FedAvg):
    """FLTrust as a Flower Message-API strategy (sampling and evaluation are FedAvg's).

    ``root_update`` trains a copy of the global model on the server's root data set; it is
    called once per round during aggregation.
    """

    def __init__(self, *, root_update: RootUpdate, **fedavg_options: Any) -> None:
        super().__init__(**fedavg_options)
        self.root_update = root_update
        self._global: dict[str, NDArray] = {}
        self.trust_scores: dict[int, dict[int, float]] = {}
        """Per round, the trust score of each node whose update was aggregated."""

    def summary(self) -> None:
        log.info("FLTrust: trust bootstrapped from the server's root data set (Cao et al. 2021)")
        super().summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = to_numpy(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        if not self._global:
            raise RoundFailed(
                f"round {server_round}: FLTrust has no global model (configure_train not called)",
                server_round=server_round,
            )
        root = self.root_update(server_round, {k: v.copy() for k, v in self._global.items()})
        if set(root) != set(self._global):
            raise RoundFailed(
                f"round {server_round}: the root update returned keys {sorted(root)[:5]}… "
                "that differ from the global model's",
                server_round=server_round,
            )
        clients = [to_numpy(cast(ArrayRecord, msg.content[self.arrayrecord_key])) for msg in valid]
        outcome = fltrust_aggregate(self._global, root, clients)
        nodes = [msg.metadata.src_node_id for msg in valid]
        self.trust_scores[server_round] = dict(zip(nodes, outcome.trust_scores, strict=True))
        if outcome.kept_global:
            log.warning(
                "round %d: FLTrust trusted no client update; the global model is kept",
                server_round,
            )
        trusted = [msg.content for msg, s in zip(valid, outcome.trust_scores, strict=True) if s > 0]
        metrics = (
            self.train_metrics_aggr_fn(trusted, self.weighted_by_key) if trusted else MetricRecord()
        )
        metrics["fltrust-trusted"] = len(trusted)
        metrics["fltrust-kept-global"] = int(outcome.kept_global)
        return to_record(outcome.arrays), metrics
