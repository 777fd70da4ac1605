"""The Flower ClientApp on real Messages: it trains on the node's own data and replies with the
full state and the true example count; bad data or config get an error reply naming the problem,
never an exception and never training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from edgefed.common.learning import write_local_dataset
from edgefed.common.training import FederatedModel, TrainSettings, message_config
from edgefed.edge.training.client_app import ReplyError, app, handle_evaluate, handle_train
from edgefed.edge.training.records import from_array_record, to_array_record

from . import tiny

SETTINGS = TrainSettings(lr=3e-3, local_steps=3, batch_size=8, max_seq_len=16)


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instruction messages take their sender from the process's task identity, which the
    ServerApp's runtime sets; here the test plays the server (node 0 of run 1)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture(scope="module")
def global_model() -> FederatedModel:
    return tiny.build("text-classification", seed=4)


def _message(
    fm: FederatedModel, kind: str = MessageType.TRAIN, **overrides: int | float | str
) -> Message:
    config = {**message_config(fm, SETTINGS, server_round=1), **overrides}
    content = RecordDict({"arrays": to_array_record(fm.arrays()), "config": ConfigRecord(config)})
    return Message(content=content, dst_node_id=7, message_type=kind)


def _context(data_dir: Path) -> Context:
    return Context(
        run_id=1, node_id=7, node_config={"data-dir": str(data_dir)}, state=RecordDict(),
        run_config={},
    )  # fmt: skip


def _data_dir(tmp_path: Path, n: int = 20) -> Path:
    write_local_dataset(tmp_path / "data" / "local.jsonl", tiny.colour_examples(n))
    return tmp_path / "data"


def test_train_replies_with_the_full_state_and_the_true_example_count(
    tmp_path: Path, global_model: FederatedModel
) -> None:
    reply = app(_message(global_model), _context(_data_dir(tmp_path, 20)))
    assert not reply.has_error()
    assert (reply.metadata.src_node_id, reply.metadata.dst_node_id) == (7, 0)
    arrays = from_array_record(reply.content.array_records["arrays"])
    sent = global_model.arrays()
    assert {k: (v.shape, v.dtype) for k, v in arrays.items()} == {
        k: (v.shape, v.dtype) for k, v in sent.items()
    }
    assert any(not np.array_equal(arrays[k], sent[k]) for k in sent)  # it trained
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 20
    assert isinstance(metrics["train-loss"], float)


def test_simulation_partitions_and_evaluate(tmp_path: Path, global_model: FederatedModel) -> None:
    write_local_dataset(tmp_path / "parts" / "3.jsonl", tiny.colour_examples(12, seed=3))
    context = Context(
        run_id=1, node_id=7, node_config={"partition-id": 3}, state=RecordDict(),
        run_config={"partitions-dir": str(tmp_path / "parts")},
    )  # fmt: skip
    reply = handle_evaluate(_message(global_model, MessageType.EVALUATE), context)
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 12
    assert 0.0 <= float(metrics["eval-accuracy"]) <= 1.0
    assert float(metrics["eval-loss"]) > 0


def _refusal(reply: Message, code: ReplyError, *fragments: str) -> None:
    assert reply.has_error()
    assert reply.error.code == code
    for fragment in fragments:
        assert fragment in (reply.error.reason or "")


def test_an_empty_data_dir_is_refused(tmp_path: Path, global_model: FederatedModel) -> None:
    (tmp_path / "empty").mkdir()
    reply = handle_train(_message(global_model), _context(tmp_path / "empty"))
    _refusal(reply, ReplyError.BAD_DATA, "no *.jsonl files", str(tmp_path / "empty"))
    (tmp_path / "empty" / "a.jsonl").write_text("\n", encoding="utf-8")
    reply = handle_train(_message(global_model), _context(tmp_path / "empty"))
    _refusal(reply, ReplyError.BAD_DATA, "a.jsonl:1: no examples")


def test_malformed_data_is_refused_naming_file_and_line(
    tmp_path: Path, global_model: FederatedModel
) -> None:
    data = _data_dir(tmp_path, 5)
    with (data / "local.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "a green car", "label": "green"}) + "\n")
    reply = handle_train(_message(global_model), _context(data))
    _refusal(reply, ReplyError.BAD_DATA, "local.jsonl:6: unknown label 'green'")


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"train-mode": "everything"}, "train-mode must be one of"),
        ({"local-steps": 0}, "local-steps must be >= 1"),
        ({"model-digest": "0" * 64}, "does not match"),
        ({"task": "translation"}, "unsupported task 'translation'"),
    ],
)
def test_a_bad_config_is_refused(
    tmp_path: Path, global_model: FederatedModel, overrides: dict[str, str], fragment: str
) -> None:
    reply = handle_train(_message(global_model, **overrides), _context(_data_dir(tmp_path)))
    _refusal(reply, ReplyError.BAD_REQUEST, fragment)


def test_mismatched_arrays_and_missing_records_are_refused(
    tmp_path: Path, global_model: FederatedModel
) -> None:
    message = _message(global_model)
    arrays = global_model.arrays()
    arrays["classifier.weight"] = np.zeros((5, 32), dtype=np.float32)
    message.content["arrays"] = to_array_record(arrays)
    reply = handle_train(message, _context(_data_dir(tmp_path)))
    _refusal(reply, ReplyError.BAD_REQUEST, "classifier.weight (5, 32) != (2, 32)")
    bare = Message(content=RecordDict(), dst_node_id=7, message_type=MessageType.TRAIN)
    _refusal(handle_train(bare, _context(tmp_path)), ReplyError.BAD_REQUEST, "no 'config'")


def test_no_data_location_is_refused(global_model: FederatedModel) -> None:
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = handle_train(_message(global_model), context)
    _refusal(reply, ReplyError.BAD_REQUEST, "no local data configured", "data-dir")
