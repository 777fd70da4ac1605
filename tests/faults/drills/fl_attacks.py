"""Client-side attacks on the toy federated task (``tests/cloud/federation/toy.py``), shared by
rows 10 and 11: each is a ``reply_hook(node_id, reply) -> reply`` for :class:`LocalGrid`, which
tampers with a training reply after the honest client produced it, the way a compromised device
would before sending it. Sign flip lives in ``toy.sign_flip_hook``; label flip changes the
attackers' data instead (see :func:`label_flipped`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np
from flwr.app import Message, MetricRecord

from edgefed.cloud.federation.records import to_numpy, to_record
from tests.cloud.federation import toy

Hook = Callable[[int, Message], Message]
Tamper = Callable[[Message, dict[str, np.ndarray]], None]
"""Edits one training reply in place, given the global arrays the client received."""


def _is_train_reply(reply: Message) -> bool:
    return (
        not reply.has_error()
        and reply.metadata.message_type == "train"
        and "arrays" in reply.content
    )


def tampering(nodes: Collection[int], seen: dict[str, toy.Arrays], tamper: Tamper) -> Hook:
    """A hook applying ``tamper`` to the training replies of ``nodes`` (1-based node ids)."""
    chosen = set(nodes)

    def hook(node_id: int, reply: Message) -> Message:
        if node_id in chosen and _is_train_reply(reply):
            tamper(reply, seen["global"])
        return reply

    return hook


def by_node(hooks: dict[int, Hook]) -> Hook:
    """Each node's own hook (nodes without one reply honestly)."""

    def hook(node_id: int, reply: Message) -> Message:
        own = hooks.get(node_id)
        return own(node_id, reply) if own is not None else reply

    return hook


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return to_numpy(reply.content["arrays"])  # type: ignore[arg-type]


def gaussian_noise(sigma: float, seed: int = 0) -> Tamper:
    """Replace the update with ``w_global + N(0, sigma²)``: a client that sends noise."""
    rng = np.random.default_rng(seed)

    def tamper(reply: Message, g: dict[str, np.ndarray]) -> None:
        noisy = {
            k: (v + rng.normal(0.0, sigma, size=v.shape)).astype(v.dtype) for k, v in g.items()
        }
        reply.content["arrays"] = to_record(noisy)

    return tamper


def nan_weight(reply: Message, g: dict[str, np.ndarray]) -> None:
    a = _arrays(reply)
    a["weight"][1, 2] = np.nan
    reply.content["arrays"] = to_record(a)


def inf_bias(reply: Message, g: dict[str, np.ndarray]) -> None:
    a = _arrays(reply)
    a["bias"][0] = np.inf
    reply.content["arrays"] = to_record(a)


def wrong_shape(reply: Message, g: dict[str, np.ndarray]) -> None:
    a = _arrays(reply)
    a["weight"] = a["weight"][:, :-1].copy()
    reply.content["arrays"] = to_record(a)


def huge_count(reply: Message, g: dict[str, np.ndarray]) -> None:
    metrics = reply.content["metrics"]
    assert isinstance(metrics, MetricRecord)
    metrics["num-examples"] = 10**12


def label_flipped(task: toy.Task, partitions: Collection[int]) -> toy.Task:
    """``task`` with the labels of ``partitions`` (0-based) mapped ``y -> C-1-y``: clients that
    train honestly on poisoned data (a data-poisoning attack, no tampering with the update)."""
    chosen = set(partitions)
    clients = [
        (x, (toy.NUM_CLASSES - 1 - y) if i in chosen else y)
        for i, (x, y) in enumerate(task.clients)
    ]
    return toy.Task(clients, task.test, task.root)
