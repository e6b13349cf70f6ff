"""An in-process Grid: delivers messages straight to a ClientApp in this process (no SuperLink, no Ray).

For tests and the benchmark's compute-only baseline. Each node has its own node config and persistent
``context.state``; ``fail`` maps a node id to an exception (or "timeout") to inject site failures.

Flower's ``Message(...)`` reads the sender's identity from the process-wide ``TaskIdentity``, which Flower's
own ServerApp process sets once at start-up. In process there is no such start-up, so the grid is a context
manager: ``with LocalGrid(...) as grid:`` gives the ServerApp side that identity for the block only and puts
back whatever was there before (another grid's, or none), instead of overwriting Flower's class for good.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Callable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

SERVERAPP_NODE_ID = 0
"""The sender id ServerApp messages carry in process (Flower's SuperLink uses its own node id there)."""


@contextmanager
def serverapp_identity(run_id: int) -> Iterator[None]:
    """Flower's ``TaskIdentity`` set to a ServerApp of ``run_id`` for the block, the previous values restored."""
    saved = {name: vars(TaskIdentity)[name] for name in ("_run_id", "_node_id", "_task_id")}
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SERVERAPP_NODE_ID
    TaskIdentity.task_id = 0
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, name, value)


class LocalGrid(Grid):
    def __init__(
        self,
        client_app: Any,
        node_configs: dict[int, dict[str, Any]],
        run_config: dict[str, Any],
        run_id: int = 1,
        fail: dict[int, Any] | None = None,
        tamper: Callable[[int, Message], Message] | None = None,
    ):
        self.client_app = client_app
        self.node_configs = node_configs
        self.run_config = run_config
        self.run_id = run_id
        self.fail = dict(fail or {})
        self.tamper = tamper
        self.states = {node: RecordDict() for node in node_configs}
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self._scope = ExitStack()

    def __enter__(self) -> LocalGrid:
        self._scope.enter_context(serverapp_identity(self.run_id))
        return self

    def __exit__(self, *exc: object) -> None:
        self._scope.close()

    # Grid interface ------------------------------------------------------------------------------------------
    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used in-process
        self.run_id = run_id

    @property
    def run(self):
        from types import SimpleNamespace

        return SimpleNamespace(run_id=self.run_id)  # Flower's legacy client manager reads only run.run_id

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # pragma: no cover
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_configs)

    def get_nodes(self):  # pragma: no cover
        return []

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError("LocalGrid only supports send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError("LocalGrid only supports send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            self.sent.append(msg)
            msg = copy.deepcopy(msg)  # as if serialised: a site must not see (or mutate) another's message object
            failure = self.fail.get(node)
            if failure == "timeout":
                continue
            if failure is not None:
                replies.append(Message(Error(code=0, reason=str(failure)), reply_to=msg))
                continue
            context = Context(
                run_id=self.run_id,
                node_id=node,
                node_config=self.node_configs[node],
                state=self.states[node],
                run_config=self.run_config,
            )
            try:
                reply = self.client_app(msg, context)
            except Exception as exc:  # a crashing site becomes an error reply, as in Flower
                reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if self.tamper is not None:
                reply = self.tamper(node, reply)
            self.replies.append(reply)
            replies.append(reply)
        return replies
