"""The wire between the ClientApp shim and the site worker (client/worker.py): one local Unix socket, one
request and one reply per connection, Flower's own protobuf encoding (never pickle).

Why a worker at all: in deployment Flower starts a fresh ClientApp process for every message, which re-imports
torch and the C2L code and reopens the store each round (8-16 s on a busy 2-core site). The worker keeps them
loaded; the ClientApp becomes a shim that imports no torch and forwards the message here.

Frame: ``MAGIC`` + one header line of JSON (protocol version, fedst version) + length-prefixed Message and
Context protos. Reply: one status byte + a length-prefixed payload: ``OK`` = the reply Message proto; ``FAILED`` =
the contract's fixed failure reason (client/guard.py: details stay in the worker's log); ``REFUSED`` = a short
plain reason (wrong version, unknown message type) that names no data.

Imported by the shim in every ClientApp process: standard library and Flower's serde only.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from flwr.app import Context, Message

from shared.errors import SiteWorkerError
from shared.keys import WORKER_SOCKET

MAGIC = b"FEDSTW1\n"
PROTOCOL = 1
MAX_FRAME_BYTES = int(os.environ.get("FEDST_WORKER_MAX_BYTES", str(2 << 30)))  # the base preset is ~100 MB
OK, FAILED, REFUSED = 0, 1, 2


class WorkerUnavailable(SiteWorkerError):
    """No worker answers at the socket (not started, stopped, or another user's)."""


class WorkerRefused(SiteWorkerError):
    """The worker answered but will not run this message (its text names no data)."""


def fedst_version() -> str:
    try:
        return version("fedst")
    except PackageNotFoundError:  # a source checkout without an install: the worker runs the same tree
        return "source"


def send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("!Q", len(payload)) + payload)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError(f"peer closed the connection {left} bytes before the end of a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> bytes:
    (size,) = struct.unpack("!Q", recv_exact(sock, 8))
    if size > MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes exceeds FEDST_WORKER_MAX_BYTES ({MAX_FRAME_BYTES})")
    return recv_exact(sock, size)


def header() -> bytes:
    return json.dumps({"protocol": PROTOCOL, "fedst": fedst_version()}).encode()


def site_worker_mode(context: Context) -> str:
    """Run config ``site-worker``, read without pydantic (this module is imported in every ClientApp process)."""
    return str(context.run_config.get("site-worker", "auto"))


def site_worker_socket(context: Context) -> Path | None:
    """The worker socket this run should use, or None for the in-process (fresh ClientApp) path.

    Run config ``site-worker``: ``auto`` (default: the worker when the node config names ``worker-socket``),
    ``off`` (always in-process), ``required`` (a site without a worker fails the message).
    """
    mode = site_worker_mode(context)  # validated by the ServerApp's RunConfig before any message is sent
    if mode == "off":
        return None
    path = context.node_config.get(WORKER_SOCKET)
    if not path:
        if mode == "required":
            raise WorkerUnavailable(
                "run config 'site-worker = \"required\"' but this SuperNode's node config has no 'worker-socket'"
            )
        return None
    return Path(str(path))


def forward(path: Path, msg: Message, context: Context, timeout: float | None = None) -> tuple[int, bytes]:
    """Send ``msg`` and ``context`` to the worker at ``path``; its (status, payload) reply."""
    from flwr.common.serde import context_to_proto, message_to_proto

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise WorkerUnavailable(f"no site worker at {path} ({exc.strerror or exc})") from None
        sock.sendall(MAGIC)
        send_frame(sock, header())
        send_frame(sock, message_to_proto(msg).SerializeToString())
        send_frame(sock, context_to_proto(context).SerializeToString())
        status = recv_exact(sock, 1)[0]
        return status, recv_frame(sock)
    except (ConnectionError, TimeoutError) as exc:
        raise WorkerUnavailable(f"site worker at {path} stopped answering ({exc})") from None
    finally:
        sock.close()


def reply_from(payload: bytes, msg: Message) -> Message:
    """The reply Message for ``msg`` from the worker's bytes: its content only, addressed by the shim itself
    (the worker cannot redirect a reply)."""
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    proto = ProtoMessage()
    proto.ParseFromString(payload)
    reply = message_from_proto(proto)
    if reply.has_error():
        return Message(error=reply.error, reply_to=msg)
    return Message(reply.content, reply_to=msg)
