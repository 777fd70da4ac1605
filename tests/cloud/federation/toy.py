"""A small federated task for the server-side tests: softmax regression on Gaussian blobs.

Clients follow the message contract exactly (arrays in, trained arrays + ``num-examples`` +
``train-loss`` out; evaluation replies ``eval-loss``/``eval-accuracy``), so the real Flower
strategies, the validation and the round loop run unchanged against them through LocalGrid.
Local training is full-batch gradient descent: deterministic, so a test can recompute what an
honest round must aggregate to.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict

from edgefed.cloud.federation.local_grid import by_message_type
from edgefed.cloud.federation.records import to_numpy, to_record
from edgefed.cloud.federation.rounds import EvalFigures

NUM_CLASSES = 4
NUM_FEATURES = 8

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Blobs:
    centers: np.ndarray  # (classes, features)
    spread: float

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, NUM_CLASSES, size=n)
        x = self.centers[y] + rng.normal(0.0, self.spread, size=(n, NUM_FEATURES))
        return x.astype(np.float32), y


Data = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Task:
    clients: list[Data]
    test: Data
    root: Data  # the server's small root data set (FLTrust)


def make_task(
    num_clients: int,
    per_client: int = 400,
    test_size: int = 2000,
    root_size: int = 200,
    seed: int = 0,
) -> Task:
    """Client data sets, a test set and a root set from the same overlapping blobs (IID)."""
    rng = np.random.default_rng(seed)
    blobs = Blobs(centers=rng.normal(0.0, 1.0, size=(NUM_CLASSES, NUM_FEATURES)), spread=1.0)
    clients = [blobs.sample(per_client, rng) for _ in range(num_clients)]
    return Task(clients, blobs.sample(test_size, rng), blobs.sample(root_size, rng))


def initial_arrays() -> Arrays:
    return {
        "weight": np.zeros((NUM_CLASSES, NUM_FEATURES), dtype=np.float32),
        "bias": np.zeros(NUM_CLASSES, dtype=np.float32),
    }


def _probs(arrays: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    logits = x.astype(np.float64) @ arrays["weight"].T.astype(np.float64) + arrays["bias"]
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def loss_and_accuracy(
    arrays: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray
) -> tuple[float, float]:
    p = _probs(arrays, x)
    loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
    return loss, float((p.argmax(axis=1) == y).mean())


def train(
    arrays: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, *, lr: float, steps: int
) -> tuple[Arrays, float]:
    w = arrays["weight"].astype(np.float64)
    b = arrays["bias"].astype(np.float64)
    onehot = np.eye(NUM_CLASSES)[y]
    for _ in range(steps):
        p = _probs({"weight": w, "bias": b}, x)
        grad = (p - onehot) / len(y)
        w -= lr * grad.T @ x
        b -= lr * grad.sum(axis=0)
    out = {"weight": w.astype(np.float32), "bias": b.astype(np.float32)}
    return out, loss_and_accuracy(out, x, y)[0]


def client_handler(
    datasets: list[Data],
    *,
    lr: float = 1.0,
    steps: int = 10,
    seen: dict[str, Arrays] | None = None,
) -> Callable[[Message, Context], Message]:
    """A ClientApp-like handler; ``seen["global"]`` keeps the last global model it received
    (attack hooks need it)."""

    def on_train(message: Message, context: Context) -> Message:
        x, y = datasets[int(context.node_config["partition-id"])]
        received = to_numpy(message.content["arrays"])  # type: ignore[arg-type]
        if seen is not None:
            seen["global"] = received
        trained, loss = train(received, x, y, lr=lr, steps=steps)
        content = RecordDict(
            {
                "arrays": to_record(trained),
                "metrics": MetricRecord({"num-examples": len(y), "train-loss": loss}),
            }
        )
        return Message(content, reply_to=message)

    def on_evaluate(message: Message, context: Context) -> Message:
        x, y = datasets[int(context.node_config["partition-id"])]
        loss, acc = loss_and_accuracy(to_numpy(message.content["arrays"]), x, y)  # type: ignore[arg-type]
        metrics = MetricRecord({"num-examples": len(y), "eval-loss": loss, "eval-accuracy": acc})
        return Message(RecordDict({"metrics": metrics}), reply_to=message)

    return by_message_type(train=on_train, evaluate=on_evaluate)


def server_eval(test: Data) -> Callable[[int, Arrays], EvalFigures]:
    def evaluate(server_round: int, arrays: Arrays) -> EvalFigures:
        loss, acc = loss_and_accuracy(arrays, *test)
        return EvalFigures(loss, acc, len(test[1]))

    return evaluate


def sign_flip_hook(
    attackers: set[int], seen: dict[str, Arrays], scale: float = 10.0
) -> Callable[[int, Message], Message]:
    """Byzantine clients: send ``w_global - scale · (w_i - w_global)``."""

    def hook(node_id: int, reply: Message) -> Message:
        if node_id not in attackers or reply.has_error() or "arrays" not in reply.content:
            return reply
        if reply.metadata.message_type != "train":
            return reply
        mine = to_numpy(reply.content["arrays"])  # type: ignore[arg-type]
        g = seen["global"]
        reply.content["arrays"] = to_record({k: g[k] - scale * (mine[k] - g[k]) for k in g})
        return reply

    return hook
