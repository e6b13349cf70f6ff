"""A Grid that notices replies promptly: Flower's ``send_and_receive`` sleeps a fixed 3 s between pulls.

With the site worker (client/worker.py) a tiny model's round is about a second of work, so a fixed 3 s poll
would be most of the round. This wrapper pushes the messages and then pulls with a short backoff (50 ms doubling
to ``max_poll_s``): on loopback a pull is a cheap local RPC, and over a WAN the backoff soon reaches the cap.
Everything else is delegated to Flower's grid unchanged.
"""

from __future__ import annotations

import time
from typing import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class PromptGrid(Grid):
    """Flower's grid with a prompt `send_and_receive`."""

    def __init__(self, inner: Grid, first_poll_s: float = 0.05, max_poll_s: float = 1.0):
        self.inner = inner
        self.first_poll_s = first_poll_s
        self.max_poll_s = max_poll_s

    def set_run(self, run):  # noqa: ANN001 - Flower's signature
        self.inner.set_run(run)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self):
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every message has its reply or ``timeout`` seconds have passed (None: forever)."""
        pending = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        pause = self.first_poll_s
        while pending:
            got = list(self.inner.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending:
                break
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                pause = min(pause, left)
            time.sleep(pause)
            pause = min(pause * 2, self.max_poll_s) if not got else self.first_poll_s
        return replies
