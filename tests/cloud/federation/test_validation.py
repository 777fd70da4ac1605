"""Bad updates are dropped with a reason naming what was wrong, and the round goes on."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Error, Message, MetricRecord, RecordDict

from edgefed.cloud.federation.errors import RoundFailed
from edgefed.cloud.federation.local_grid import LocalGrid, claim_task_identity
from edgefed.cloud.federation.progress import ProgressWriter, read_progress
from edgefed.cloud.federation.records import to_numpy, to_record
from edgefed.cloud.federation.rounds import run_rounds
from edgefed.cloud.federation.strategies import build_strategy
from edgefed.cloud.federation.validation import UpdateValidator, ValidationLimits
from tests.cloud.federation import toy
from tests.cloud.federation.conftest import run_toy

NUM_CLIENTS = 6
BAD_NODE = NUM_CLIENTS


@pytest.fixture(scope="module")
def task() -> toy.Task:
    return toy.make_task(NUM_CLIENTS, per_client=100, test_size=200, seed=3)


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return to_numpy(reply.content["arrays"])  # type: ignore[arg-type]


def _set_arrays(reply: Message, arrays: dict[str, np.ndarray]) -> Message:
    reply.content["arrays"] = to_record(arrays)
    return reply


def nan(reply: Message, g: dict[str, np.ndarray]) -> Message:
    a = _arrays(reply)
    a["weight"][1, 2] = np.nan
    return _set_arrays(reply, a)


def inf(reply: Message, g: dict[str, np.ndarray]) -> Message:
    a = _arrays(reply)
    a["bias"][0] = np.inf
    return _set_arrays(reply, a)


def wrong_shape(reply: Message, g: dict[str, np.ndarray]) -> Message:
    a = _arrays(reply)
    a["weight"] = a["weight"][:, :-1].copy()
    return _set_arrays(reply, a)


def wrong_dtype(reply: Message, g: dict[str, np.ndarray]) -> Message:
    a = _arrays(reply)
    a["weight"] = a["weight"].astype(np.float64)
    return _set_arrays(reply, a)


def missing_key(reply: Message, g: dict[str, np.ndarray]) -> Message:
    a = _arrays(reply)
    del a["bias"]
    return _set_arrays(reply, a)


def ten_times_norm(reply: Message, g: dict[str, np.ndarray]) -> Message:
    a = _arrays(reply)
    return _set_arrays(reply, {k: g[k] + 10 * (a[k] - g[k]) for k in a})


def huge_count(reply: Message, g: dict[str, np.ndarray]) -> Message:
    metrics = reply.content["metrics"]
    assert isinstance(metrics, MetricRecord)
    metrics["num-examples"] = 10**12
    return reply


CORRUPTIONS: dict[str, tuple[Callable[[Message, dict[str, np.ndarray]], Message], str]] = {
    "nan": (nan, "NaN in 'weight'"),
    "inf": (inf, "Inf in 'bias'"),
    "wrong-shape": (wrong_shape, "wrong shape for 'weight': (4, 7), expected (4, 8)"),
    "wrong-dtype": (wrong_dtype, "wrong dtype for 'weight': float64, expected float32"),
    "missing-key": (missing_key, "missing key(s) 'bias'"),
    "10x-norm": (ten_times_norm, "× the round's median update norm"),
    "1e12-examples": (huge_count, "num-examples 1000000000000 exceeds the cap of 1000000"),
}


def _honest_fedavg(task: toy.Task, honest: list[int]) -> dict[str, np.ndarray]:
    """What FedAvg must produce from the honest clients alone (training is deterministic)."""
    start = toy.initial_arrays()
    trained = [toy.train(start, *task.clients[i - 1], lr=1.0, steps=10)[0] for i in honest]
    counts = np.array([len(task.clients[i - 1][1]) for i in honest], dtype=np.float64)
    w = counts / counts.sum()
    return {k: sum(wi * t[k] for wi, t in zip(w, trained, strict=True)) for k in start}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_a_corrupt_update_is_rejected_with_its_reason_and_the_round_completes(
    kind: str, task: toy.Task, tmp_path: Path
) -> None:
    corrupt, reason = CORRUPTIONS[kind]
    seen: dict[str, dict[str, np.ndarray]] = {}

    def hook(node_id: int, reply: Message) -> Message:
        return corrupt(reply, seen["global"]) if node_id == BAD_NODE else reply

    strategy = build_strategy("fedavg", min_train_nodes=NUM_CLIENTS, fraction_evaluate=0.0)
    result = run_toy(strategy, task, tmp_path, reply_hook=hook, seen=seen)

    [rejection] = strategy.rejections[1]
    assert rejection.node_id == BAD_NODE
    assert reason in rejection.reason
    assert strategy.accepted[1] == NUM_CLIENTS - 1
    expected = _honest_fedavg(task, list(range(1, NUM_CLIENTS)))
    for key, value in expected.items():
        assert np.isfinite(result.arrays[key]).all()
        np.testing.assert_allclose(result.arrays[key], value, rtol=1e-5, atol=1e-6)

    progress = read_progress(tmp_path)
    assert progress is not None
    assert progress["status"] == "succeeded"
    [entry] = progress["rounds"]
    assert entry["accepted"] == NUM_CLIENTS - 1
    assert entry["rejected"] == [{"node_id": BAD_NODE, "reason": rejection.reason}]
    assert entry["eval_accuracy"] > 0.5


def test_a_client_refusal_is_passed_through_as_the_rejection_reason(
    task: toy.Task, tmp_path: Path
) -> None:
    honest = toy.client_handler(task.clients)

    def handler(message: Message, context: object) -> Message:
        if message.metadata.dst_node_id == 2:
            return Message(
                Error(code=0, reason="data set is empty: /data/x.jsonl"), reply_to=message
            )
        return honest(message, context)  # type: ignore[arg-type]

    strategy = build_strategy("fedmedian", min_train_nodes=NUM_CLIENTS, fraction_evaluate=0.0)
    grid = LocalGrid(handler, NUM_CLIENTS)
    progress = ProgressWriter(tmp_path)
    progress.start(strategy="fedmedian", num_rounds=1)
    run_rounds(grid, strategy, initial_arrays=toy.initial_arrays(), num_rounds=1, progress=progress)
    [rejection] = strategy.rejections[1]
    assert rejection.node_id == 2
    assert "data set is empty: /data/x.jsonl" in rejection.reason


def test_a_raising_client_becomes_an_error_reply_and_is_rejected(
    task: toy.Task, tmp_path: Path
) -> None:
    honest = toy.client_handler(task.clients)

    def handler(message: Message, context: object) -> Message:
        if message.metadata.dst_node_id == 3:
            raise RuntimeError("disk on fire")
        return honest(message, context)  # type: ignore[arg-type]

    strategy = build_strategy("fedavg", min_train_nodes=NUM_CLIENTS, fraction_evaluate=0.0)
    grid = LocalGrid(handler, NUM_CLIENTS)
    progress = ProgressWriter(tmp_path)
    progress.start(strategy="fedavg", num_rounds=1)
    run_rounds(grid, strategy, initial_arrays=toy.initial_arrays(), num_rounds=1, progress=progress)
    [rejection] = strategy.rejections[1]
    assert rejection.node_id == 3
    assert "RuntimeError: disk on fire" in rejection.reason


def test_too_many_rejections_fail_the_round_cleanly(task: toy.Task, tmp_path: Path) -> None:
    seen: dict[str, dict[str, np.ndarray]] = {}

    def hook(node_id: int, reply: Message) -> Message:
        return nan(reply, seen["global"]) if node_id >= 3 else reply

    strategy = build_strategy(
        "fedavg", min_train_nodes=NUM_CLIENTS, fraction_evaluate=0.0, min_valid_updates=3
    )
    with pytest.raises(RoundFailed) as info:
        run_toy(strategy, task, tmp_path, rounds=2, reply_hook=hook, seen=seen)
    message = str(info.value)
    assert message.startswith("round 1: 2 valid updates of 6, need 3: node 3: NaN in 'weight'")
    assert "node 6: NaN in 'weight'" in message

    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["status"] == "failed"
    assert progress["error"] == message
    assert progress["rounds"] == []


def test_lying_array_metadata_is_caught() -> None:
    claim_task_identity(1)
    reference = toy.initial_arrays()
    data = np.zeros((4, 8), dtype=np.float64)
    buffer = io.BytesIO()
    np.save(buffer, data, allow_pickle=False)
    arrays = to_record(reference)
    arrays["weight"] = Array(
        dtype="float32", shape=(4, 8), stype="numpy.ndarray", data=buffer.getvalue()
    )
    reply = Message(
        RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 5})}),
        dst_node_id=1,
        message_type="train",
    )
    validator = UpdateValidator(reference, ValidationLimits())
    assert validator.check(reply) == "array 'weight' holds float64(4, 8) but declares float32(4, 8)"


def test_absolute_norm_cap_and_unexpected_keys() -> None:
    claim_task_identity(1)
    reference = toy.initial_arrays()
    big = {k: v + 1.0 for k, v in reference.items()}
    reply = Message(
        RecordDict({"arrays": to_record(big), "metrics": MetricRecord({"num-examples": 5})}),
        dst_node_id=1,
        message_type="train",
    )
    assert UpdateValidator(reference, ValidationLimits(max_update_norm=1.0)).check(reply) == (
        "update norm 6 is above the cap 1"
    )
    extra = {**reference, "rogue": np.zeros(2, dtype=np.float32)}
    reply2 = Message(
        RecordDict({"arrays": to_record(extra), "metrics": MetricRecord({"num-examples": 5})}),
        dst_node_id=1,
        message_type="train",
    )
    assert UpdateValidator(reference).check(reply2) == "unexpected key(s) 'rogue'"
    no_metrics = Message(
        RecordDict({"arrays": to_record(reference)}), dst_node_id=1, message_type="train"
    )
    assert UpdateValidator(reference).check(no_metrics) == "reply has no 'metrics' MetricRecord"
