"""The simulation's Byzantine clients: the honest ClientApp's reply, sign-flipped and scaled
around the global model the message carried (``w - 10 (w_i - w)``), for the partitions named as
attackers only. The attack lives in the harness, never in the product's ClientApp."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from edgefed.cloud.federation.records import to_numpy, to_record
from edgefed.simulation.federation_sim import sign_flip_train

GLOBAL = {"w": np.array([1.0, 2.0, 3.0], dtype=np.float32)}
LOCAL = {"w": np.array([1.5, 2.0, 2.0], dtype=np.float32)}


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Flower's ServerApp runtime sets before any message is built."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def honest(message: Message, context: Context) -> Message:
    content = RecordDict({"arrays": to_record(LOCAL), "metrics": MetricRecord({"num-examples": 4})})
    return Message(content, reply_to=message)


def send(partition: int) -> Message:
    train = sign_flip_train(honest, attackers=[1], factor=-10.0)
    message = Message(
        RecordDict({"arrays": to_record(GLOBAL)}), dst_node_id=partition + 1,
        message_type=MessageType.TRAIN,
    )  # fmt: skip
    context = Context(
        run_id=1, node_id=partition + 1, node_config={"partition-id": partition},
        state=RecordDict(), run_config={},
    )  # fmt: skip
    return train(message, context)


def test_an_attacker_sends_the_sign_flipped_update_scaled_ten_times() -> None:
    got = to_numpy(send(1).content["arrays"])  # type: ignore[arg-type]
    expected = GLOBAL["w"] - 10 * (LOCAL["w"] - GLOBAL["w"])
    np.testing.assert_allclose(got["w"], expected)
    assert got["w"].dtype == np.float32


def test_an_honest_partition_is_left_alone() -> None:
    got = to_numpy(send(0).content["arrays"])  # type: ignore[arg-type]
    np.testing.assert_array_equal(got["w"], LOCAL["w"])
