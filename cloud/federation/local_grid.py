"""An in-process Flower Grid: messages go to a Python function, one simulated node at a time.

Flower's strategies talk to nodes only through a :class:`~flwr.serverapp.Grid`. ``LocalGrid``
implements that interface without a SuperLink, Ray or processes, so the real strategies (and our
ServerApp logic) run unchanged in tests and benchmarks, deterministically and fast. Each message
is deep-copied on the way in and on the way out, as the wire would, so neither side can alias
the other's arrays (Flower's strategies send one shared RecordDict to every node, and some
aggregators consume the replies' records while they work).

``reply_hook(node_id, reply) -> reply`` lets a test or a benchmark tamper with replies after the
client produced them (Byzantine clients), outside the product code. :class:`HookedGrid` does the
same around any other Grid.
"""

from __future__ import annotations

import copy
import logging
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast
from uuid import uuid4

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

Handler = Callable[[Message, Context], Message]
ReplyHook = Callable[[int, Message], Message]


def by_message_type(*, train: Handler, evaluate: Handler | None = None) -> Handler:
    """One handler that dispatches on the message type, as a ClientApp does."""

    def handle(message: Message, context: Context) -> Message:
        kind = message.metadata.message_type
        if kind == MessageType.TRAIN:
            return train(message, context)
        if kind == MessageType.EVALUATE and evaluate is not None:
            return evaluate(message, context)
        return Message(
            Error(code=ErrorCode.UNKNOWN, reason=f"this node does not handle {kind!r} messages"),
            reply_to=message,
        )

    return handle


def claim_task_identity(run_id: int) -> None:
    """Flower's Message constructor stamps every message with the process's task identity, which
    the ServerApp runtime sets when it starts a ServerApp process; in-process runs set it here
    (only where nothing set it before, as the compat runtime does)."""
    for name, value in (("task_id", 1), ("run_id", run_id), ("node_id", SUPERLINK_NODE_ID)):
        try:
            getattr(TaskIdentity, name)
        except RuntimeError:
            setattr(TaskIdentity, name, value)


def _stamp(message: Message) -> str:
    """Give a message its id, as the SuperLink does when it stores one."""
    message_id = uuid4().hex
    message.metadata.__dict__["_message_id"] = message_id
    return message_id


class LocalGrid(Grid):
    """``num_nodes`` simulated nodes with ids ``1..num_nodes``; node ``i`` has its own Context with
    ``node_config = {"partition-id": i - 1, "num-partitions": num_nodes, **node_configs[i-1]}``
    (0-based partition ids, as Flower's simulation engine gives them)."""

    def __init__(
        self,
        handler: Handler,
        num_nodes: int,
        *,
        node_configs: Sequence[Mapping[str, Any]] | None = None,
        run_config: Mapping[str, Any] | None = None,
        reply_hook: ReplyHook | None = None,
        run_id: int = 1,
    ) -> None:
        if num_nodes < 1:
            raise ValueError("a LocalGrid needs at least one node")
        if node_configs is not None and len(node_configs) != num_nodes:
            raise ValueError(f"{len(node_configs)} node configs for {num_nodes} nodes")
        self.handler = handler
        self.reply_hook = reply_hook
        claim_task_identity(run_id)
        self._run = Run.create_empty(run_id)
        self.contexts: dict[int, Context] = {}
        for index in range(num_nodes):
            node_id = index + 1
            node_config: dict[str, Any] = {"partition-id": index, "num-partitions": num_nodes}
            if node_configs is not None:
                node_config.update(node_configs[index])
            self.contexts[node_id] = Context(
                run_id=run_id,
                node_id=node_id,
                node_config=node_config,
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
        self._replies: dict[str, Message] = {}
        self.messages_sent = 0

    # ------------------------------------------------------------------ Grid API

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for message in messages:
            ids.append(_stamp(message))
            self._replies[message.metadata.message_id] = self._deliver(message)
            self.messages_sent += 1
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in message_ids if mid in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(list(self.push_messages(messages)))

    # ------------------------------------------------------------------ delivery

    def _deliver(self, message: Message) -> Message:
        node_id = message.metadata.dst_node_id
        context = self.contexts.get(node_id)
        if context is None:
            return Message(
                Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"no node {node_id} in this grid"),
                reply_to=message,
            )
        received = copy.deepcopy(message)
        answer: object
        try:
            # Typed as returning a Message, but test handlers get that wrong; say so in a reply.
            answer = cast(object, self.handler(received, context))
        except Exception as exc:  # noqa: BLE001  (a raising ClientApp becomes an error reply)
            log.warning("node %d raised %s", node_id, exc)
            answer = Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason=f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}",
                ),
                reply_to=received,
            )
        if not isinstance(answer, Message):
            answer = Message(
                Error(
                    code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                    reason=f"the handler returned {type(answer).__name__}, not a Message",
                ),
                reply_to=received,
            )
        reply = copy.deepcopy(answer)
        if self.reply_hook is not None:
            reply = self.reply_hook(node_id, reply)
        # The reply must answer this message, whatever the handler did with its metadata.
        reply.metadata.__dict__["_reply_to_message_id"] = message.metadata.message_id
        reply.metadata.__dict__["_src_node_id"] = node_id
        _stamp(reply)
        return reply


class HookedGrid(Grid):
    """Any Grid, with ``reply_hook`` applied to every reply (tests and benchmarks only)."""

    def __init__(self, grid: Grid, reply_hook: ReplyHook) -> None:
        self.grid = grid
        self.reply_hook = reply_hook

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._hook(m) for m in self.grid.pull_messages(message_ids)]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return [self._hook(m) for m in self.grid.send_and_receive(messages, timeout=timeout)]

    def _hook(self, reply: Message) -> Message:
        return self.reply_hook(reply.metadata.src_node_id, reply)
