"""The site worker: a long-lived process next to the SuperNode that runs the site's phases for the ClientApp shim.

Flower 1.41 starts a fresh ClientApp process per message (no persistent ClientApp upstream, flwr issue #3670), so
every round re-imports torch and the C2L code and reopens the store. The worker imports them once, keeps each
run's `SiteTask` (opened store, backend) between messages, and answers on a Unix socket:

- reachable only by the site user: the socket's folder is created 0700 and the socket 0600, and every
  connection's peer credentials (SO_PEERCRED) must carry the worker's own uid, else it is closed unanswered;
- it runs only fedst's phase handlers (a fixed table of message types), decoded with Flower's protobuf serde
  (never pickle), one message at a time, under the same `client.guard.guarded` as the in-process path, so a
  failure leaves as the contract's fixed code and its details stay in this process's log and site-errors.log;
- a shim of another fedst version is refused (the reply would follow another contract).

Started by deploy/start-supernode.sh (`fedst site worker --socket PATH`) or the site's systemd unit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Callable

from flwr.app import Context, Message

from client import worker_link as link
from client.guard import SiteFailure, guarded

log = logging.getLogger("fedst.worker")
REQUEST_TIMEOUT_S = 300.0  # to receive one request (a base-preset message is ~100 MB over a local socket)


def phase_handlers() -> dict[str, Callable[[Message, Context], Message]]:
    """Message type -> handler: everything the worker will run (plain ``train`` is SecAgg+'s inner pretrain)."""
    from client import handlers

    return {
        "train.pretrain": handlers.pretrain,
        "train.adapt": handlers.adapt,
        "query.synthesize": handlers.synthesize,
        "evaluate.downstream": handlers.downstream,
        "train": handlers.secagg_pretrain,
    }


def warm_up() -> float:
    """Import what every phase needs (torch, the backends, the C2L code) before the first message; seconds."""
    started = time.perf_counter()
    import torch  # noqa: F401

    import client.handlers  # noqa: F401
    import client.site  # noqa: F401
    import shared.backends.c2l  # noqa: F401
    import shared.c2l.adapt  # noqa: F401
    import shared.c2l.train  # noqa: F401

    return time.perf_counter() - started


def prepare_socket_path(path: Path) -> None:
    """Create the socket's folder private to this user (0700) and remove a stale socket; refuse a folder that
    another user owns or others can enter, or a non-socket file at ``path``."""
    if len(os.fsencode(path)) >= 108:  # Linux sockaddr_un.sun_path
        raise ValueError(f"site worker: socket path {path} is longer than the 107 bytes a Unix socket allows")
    folder = path.parent
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(
            f"site worker: socket folder {folder} must belong to this user and be private "
            f"(owner uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}; expected uid {os.getuid()}, mode 700)"
        )
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"site worker: {path} exists and is not a socket; refusing to replace it")
        path.unlink()


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (Linux SO_PEERCRED: pid, uid, gid)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class SiteWorker:
    """Serve the site's phases on ``path`` until stopped (`stop`, SIGTERM or SIGINT)."""

    def __init__(self, path: Path, handlers: dict[str, Callable[[Message, Context], Message]] | None = None):
        self.path = Path(path).absolute()
        self.handlers = handlers if handlers is not None else phase_handlers()
        self._stopped = threading.Event()
        self._sock: socket.socket | None = None
        self.served = 0

    def bind(self) -> None:
        prepare_socket_path(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is created 0600: no window in which others could connect
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(4)
        sock.settimeout(0.5)  # wake up to notice `stop`
        self._sock = sock

    def serve_forever(self) -> None:
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        try:
            while not self._stopped.is_set():
                try:
                    conn, _ = self._sock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stopped.is_set():
                        break
                    raise
                with conn:
                    self.handle(conn)
        finally:
            self._sock.close()
            self.path.unlink(missing_ok=True)

    def stop(self) -> None:
        self._stopped.set()

    def handle(self, conn: socket.socket) -> None:
        """One request: check who asks and what, run the phase, answer."""
        conn.settimeout(REQUEST_TIMEOUT_S)  # a peer that stops sending mid-request does not hold the worker
        uid = peer_uid(conn)
        if uid != os.getuid():
            log.warning("site worker: refused a connection from uid %d (only uid %d may connect)", uid, os.getuid())
            return
        try:
            if link.recv_exact(conn, len(link.MAGIC)) != link.MAGIC:
                log.warning("site worker: refused a connection that does not speak the fedst worker protocol")
                return
            head = json.loads(link.recv_frame(conn))
            expected = {"protocol": link.PROTOCOL, "fedst": link.fedst_version()}
            if head != expected:
                self.answer(conn, link.REFUSED, f"site worker runs {expected}, the ClientApp sent {head}".encode())
                return
            msg, context = self.decode(link.recv_frame(conn), link.recv_frame(conn))
        except (OSError, ValueError) as exc:  # closed, timed out, oversized or undecodable
            log.warning("site worker: bad request (%s)", exc)
            return
        conn.settimeout(None)
        handler = self.handlers.get(msg.metadata.message_type)
        if handler is None:
            self.answer(conn, link.REFUSED, f"no phase for message type {msg.metadata.message_type!r}".encode())
            return
        started = time.perf_counter()
        try:
            reply = guarded(handler, msg, context)
        except SiteFailure as failure:
            self.answer(conn, link.FAILED, str(failure).encode())
            log.info("site worker: %s failed after %.1f s", msg.metadata.message_type, time.perf_counter() - started)
            return
        from flwr.common.serde import message_to_proto

        self.served += 1  # counted before answering: the shim may look as soon as it has the reply
        self.answer(conn, link.OK, message_to_proto(reply).SerializeToString())
        log.info("site worker: %s done in %.1f s", msg.metadata.message_type, time.perf_counter() - started)

    @staticmethod
    def decode(message: bytes, context: bytes) -> tuple[Message, Context]:
        from flwr.common.serde import context_from_proto, message_from_proto
        from flwr.proto.message_pb2 import Context as ProtoContext
        from flwr.proto.message_pb2 import Message as ProtoMessage

        msg_proto, ctx_proto = ProtoMessage(), ProtoContext()
        try:
            msg_proto.ParseFromString(message)
            ctx_proto.ParseFromString(context)
        except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends: a malformed request
            raise ValueError(f"undecodable message ({type(exc).__name__})") from None
        return message_from_proto(msg_proto), context_from_proto(ctx_proto)

    @staticmethod
    def answer(conn: socket.socket, status: int, payload: bytes) -> None:
        try:
            conn.sendall(bytes([status]))
            link.send_frame(conn, payload)
        except OSError as exc:  # the shim went away (its process was stopped): nothing to answer
            log.warning("site worker: could not answer (%s)", exc)


def run_worker(path: Path, echo: Callable[[str], None] = print) -> int:
    """`fedst site worker`: warm up, listen, serve until SIGTERM/SIGINT; the number of messages served."""
    from client import handlers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    handlers.TASKS = handlers.SiteTasks()  # this process lives for many messages: keep each run's store, backend
    worker = SiteWorker(path)
    worker.bind()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    seconds = warm_up()
    echo(f"site worker: ready on {worker.path} (imports {seconds:.1f} s; pid {os.getpid()})")
    worker.serve_forever()
    echo(f"site worker: stopped after {worker.served} messages")
    return worker.served
