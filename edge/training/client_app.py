"""The Flower ClientApp of an edge agent: trains the global model on the device's own data.

A train message carries the global arrays and a config (task, model config and tokenizer texts,
training settings); the reply carries the full trained state and the true example count. An
evaluate message is answered with loss and accuracy on the same local data. The data stays on the
device: ``node_config["data-dir"]`` (a SuperNode started by the agent) or, under the simulation
engine, ``run_config["partitions-dir"]/<partition-id>.jsonl``.

Nothing malformed is trained on: a missing or malformed data set, a bad setting or arrays that do
not fit the model get an error reply whose reason says what was wrong (:class:`ReplyError` codes),
and no exception escapes to Flower. Built models are cached per process by the digest of their
config and tokenizer, since building is the slow part when one process serves many rounds.
"""

from __future__ import annotations

import enum
import logging
import threading
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edgefed.common.learning import LearningError, LocalExample, TrainingDataError
from edgefed.common.learning import read_local_dataset as read_dataset
from edgefed.common.training import (
    FederatedModel,
    TrainingError,
    TrainSettings,
    evaluate,
    train_local,
)
from edgefed.edge.training.records import from_array_record, to_array_record

log = logging.getLogger(__name__)


class ReplyError(enum.IntEnum):
    """Codes of this client's error replies (above Flower's own codes, which end below 100)."""

    BAD_DATA = 1001  # the local data set is missing, empty or malformed
    BAD_REQUEST = 1002  # the message's config or arrays cannot be used
    INTERNAL = 1099  # anything unexpected (logged with its traceback)


_CACHE_SIZE = 2
_models: dict[str, FederatedModel] = {}
# One message at a time per process: a cached model is trained in place.
_lock = threading.Lock()

app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    return handle_train(message, context)


@app.evaluate()
def evaluate_(message: Message, context: Context) -> Message:
    return handle_evaluate(message, context)


def handle_train(message: Message, context: Context) -> Message:
    """Train the global model of ``message`` on this node's data; the reply has ``arrays``
    (the full trained state) and ``metrics`` (``num-examples``, ``train-loss``), or an error."""
    with _lock:
        try:
            fm, settings, examples = _prepare(message, context)
            outcome = train_local(fm, examples, settings)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            return _error_reply(message, "train", exc)
    log.info(
        "round %s: trained on %d examples (%d steps, %s), loss %.4f",
        _round(message), outcome.num_examples, settings.local_steps, settings.mode, outcome.loss,
    )  # fmt: skip
    content = RecordDict(
        {
            "arrays": to_array_record(outcome.arrays),
            "metrics": MetricRecord(
                {"num-examples": outcome.num_examples, "train-loss": outcome.loss}
            ),
        }
    )
    return Message(content, reply_to=message)


def handle_evaluate(message: Message, context: Context) -> Message:
    """Evaluate the global model of ``message`` on this node's data; the reply's ``metrics``
    hold ``num-examples``, ``eval-loss`` and ``eval-accuracy``, or it is an error."""
    with _lock:
        try:
            fm, settings, examples = _prepare(message, context)
            outcome = evaluate(fm, examples, settings)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error reply
            return _error_reply(message, "evaluate", exc)
    log.info(
        "round %s: evaluated on %d examples, loss %.4f, accuracy %.4f",
        _round(message), outcome.num_examples, outcome.loss, outcome.accuracy,
    )  # fmt: skip
    metrics = MetricRecord(
        {
            "num-examples": outcome.num_examples,
            "eval-loss": outcome.loss,
            "eval-accuracy": outcome.accuracy,
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=message)


# ---------------------------------------------------------------------------- request


def _prepare(
    message: Message, context: Context
) -> tuple[FederatedModel, TrainSettings, list[LocalExample]]:
    """The model holding the global weights, the settings and the local examples, all checked
    before any training starts."""
    if not message.has_content():
        raise TrainingError("the message carries no content")
    content = message.content
    if "config" not in content.config_records:
        raise TrainingError("the message has no 'config' ConfigRecord")
    if "arrays" not in content.array_records:
        raise TrainingError("the message has no 'arrays' ArrayRecord")
    config = content.config_records["config"]
    settings = TrainSettings.from_config(config)
    fm = _model(config)
    fm.load_arrays(from_array_record(content.array_records["arrays"]))
    examples = read_dataset(
        _data_path(context), fm.task, fm.label2id, max_examples=settings.max_examples
    )
    return fm, settings, examples


def _model(config: ConfigRecord) -> FederatedModel:
    task = _text(config, "task")
    config_json = _text(config, "model-config")
    tokenizer_json = _text(config, "tokenizer")
    digest = config.get("model-digest")
    key = digest if isinstance(digest, str) and digest else None
    if key is not None and key in _models and _models[key].task == task:
        return _models[key]
    fm = FederatedModel.from_texts(task, config_json, tokenizer_json)
    if key is not None and key != fm.digest:
        raise TrainingError(
            f"model-digest {key[:12]}… does not match the sent model config and tokenizer "
            f"({fm.digest[:12]}…)"
        )
    while len(_models) >= _CACHE_SIZE:
        del _models[next(iter(_models))]
    _models[fm.digest] = fm
    return fm


def _text(config: ConfigRecord, key: str) -> str:
    value = config.get(key)
    if not isinstance(value, str) or not value:
        raise TrainingError(f"the config has no {key!r} (a non-empty string)")
    return value


def _data_path(context: Context) -> Path:
    data_dir = context.node_config.get("data-dir")
    if data_dir is not None:
        if not isinstance(data_dir, str) or not data_dir:
            raise TrainingError(f"node config 'data-dir' must be a path, got {data_dir!r}")
        return Path(data_dir)
    partitions = context.run_config.get("partitions-dir")
    partition = context.node_config.get("partition-id")
    if isinstance(partitions, str) and partitions and partition is not None:
        return Path(partitions) / f"{partition}.jsonl"
    raise TrainingError(
        "no local data configured: set node config 'data-dir' (deployment) or run config "
        "'partitions-dir' with node config 'partition-id' (simulation)"
    )


def _round(message: Message) -> object:
    try:
        return message.content.config_records["config"].get("server-round", "?")
    except (KeyError, ValueError):
        return "?"


def _error_reply(message: Message, action: str, exc: Exception) -> Message:
    if isinstance(exc, TrainingDataError):
        code = ReplyError.BAD_DATA
    elif isinstance(exc, LearningError):
        code = ReplyError.BAD_REQUEST
    else:
        code = ReplyError.INTERNAL
        log.exception("%s failed unexpectedly", action)
    reason = (
        f"{action} refused: {exc}"
        if code != ReplyError.INTERNAL
        else (f"{action} failed: {type(exc).__name__}: {exc}")
    )
    if code != ReplyError.INTERNAL:
        log.warning("%s", reason)
    return Message(Error(code=int(code), reason=reason), reply_to=message)
