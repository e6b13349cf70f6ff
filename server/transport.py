"""The ServerApp's grid: Flower's, with fedst's messages moved efficiently.

- Packed models (shared/packing.py): Flower 1.41 moves each Array of a message as its own object, one request per
  object per hop, so the `tiny` model's 288 tensors cost more than its 5.7 MB. fedst's model-carrying messages
  (``train.pretrain``, ``train.adapt``) leave with one buffer per dtype and the layout in ConfigRecord
  ``fedst-packing``; replies are unpacked here, before the strategy, screening and contract checks see them, so
  nothing else knows about packing (a reply whose layout does not fit is left packed and is rejected there).
- Prompt replies: Flower's ``send_and_receive`` sleeps a fixed 3 s between pulls; this one pulls with a short
  backoff (50 ms doubling to ``max_poll_s``), a cheap local request on loopback.
Everything else is delegated to Flower's grid unchanged.
"""

from __future__ import annotations

import time
from logging import WARNING
from typing import Iterable

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from shared.errors import ContractError
from shared.packing import PACKED_MESSAGE_TYPES, RECORD, pack, unpack


class TransportGrid(Grid):
    """Flower's grid whose `send_and_receive` packs fedst's models and pulls replies promptly."""

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
        messages = list(messages)
        for msg in messages:
            if msg.metadata.message_type in PACKED_MESSAGE_TYPES:
                pack_content(msg.content)
        pending = set(self.inner.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        pause = self.first_poll_s
        while pending:
            got = list(self.inner.pull_messages(pending))
            for reply in got:
                if reply.has_content():
                    unpack_content(reply.content)
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


def pack_content(content: RecordDict) -> None:
    """Pack every ArrayRecord of ``content`` in place (once: Flower's strategies share one content per round)."""
    from server.strategy import arrays_to_numpy, numpy_to_arrays

    if RECORD in content.config_records:
        return
    layouts = {}
    for name, record in list(content.array_records.items()):
        flat, layouts[name] = pack(arrays_to_numpy(record))
        content[name] = numpy_to_arrays(flat)
    if layouts:
        content[RECORD] = ConfigRecord(layouts)


def unpack_content(content: RecordDict) -> None:
    """Unpack a site's packed reply in place; a layout that does not fit leaves it as it came (then rejected)."""
    from server.strategy import arrays_to_numpy, numpy_to_arrays

    layouts = content.config_records.get(RECORD)
    if layouts is None:
        return
    try:
        unpacked = {
            name: unpack(arrays_to_numpy(content.array_records[name]), str(layout)) for name, layout in layouts.items()
        }
    except (ContractError, KeyError) as exc:
        log(WARNING, "fedst: a reply's packed arrays do not match their layout (%s); left packed", exc)
        return
    for name, state in unpacked.items():
        content[name] = numpy_to_arrays(state)
    del content[RECORD]
