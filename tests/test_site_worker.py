"""The site worker (client/worker.py) and the ClientApp shim that forwards to it (client/app.py, worker_link.py):
the same reply as the in-process path, failures reduced to the contract's code, and nobody but the site user in.

The worker runs in a thread of the test process on a real Unix socket; the deployment test with real SuperNodes
is in tests/test_federation_deploy.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client import worker_link as link
from client.app import run_phase
from client.guard import SiteFailure
from client.worker import SiteWorker, prepare_socket_path
from server.localgrid import serverapp_identity
from server.strategy import arrays_to_numpy, numpy_to_arrays
from shared.backends import create_backend
from shared.c2l.toy import write_toy_store
from shared.config import RunConfig
from tests.helpers import toy_config

PANEL = [f"G{i}" for i in range(6)]


@pytest.fixture
def store(tmp_path):
    return write_toy_store(
        tmp_path / "store", n_spots=24, n_tiles=16, panel=PANEL, patch_px=16, seed=0, missing_gene_in_section_b=False
    ).path


@pytest.fixture
def worker(tmp_path):
    """A real worker on a private socket in a short path (sun_path holds 107 bytes), stopped after the test."""
    folder = Path(f"/tmp/fedst-w-{os.getpid()}-{threading.get_ident() % 10000}")
    shutil.rmtree(folder, ignore_errors=True)
    server = SiteWorker(folder / "site.sock")
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(timeout=10)
    shutil.rmtree(folder, ignore_errors=True)


def pretrain_message(tmp_path: Path, store: Path, socket_path: Path | None, **run) -> tuple[Message, Context]:
    config = RunConfig.from_mapping(toy_config(tmp_path))
    state = create_backend("toy", config).initial_state(0)
    content = RecordDict(
        {"arrays": numpy_to_arrays(state), "config": ConfigRecord({"server-round": 1, "panel": PANEL})}
    )
    with serverapp_identity(3):  # Flower's Message() reads the sender's identity
        msg = Message(content, dst_node_id=11, message_type="train.pretrain")
    node = {"data-path": str(store), "work-dir": str(tmp_path / "work")}
    if socket_path is not None:
        node["worker-socket"] = str(socket_path)
    context = Context(
        run_id=3, node_id=11, node_config=node, state=RecordDict(), run_config={**toy_config(tmp_path), **run}
    )
    return msg, context


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return arrays_to_numpy(reply.content.array_records["arrays"])


def test_worker_reply_equals_the_in_process_reply(tmp_path, store, worker):
    msg, context = pretrain_message(tmp_path, store, worker.path)
    via_worker = run_phase("pretrain", msg, context)
    assert worker.served == 1
    msg, context = pretrain_message(tmp_path, store, worker.path, **{"site-worker": "off"})
    in_process = run_phase("pretrain", msg, context)
    assert worker.served == 1  # "off": the worker was not asked
    a, b = _arrays(via_worker), _arrays(in_process)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    metrics = dict(via_worker.content.metric_records["metrics"])
    assert metrics["loss"] == dict(in_process.content.metric_records["metrics"])["loss"]
    assert (via_worker.metadata.src_node_id, via_worker.metadata.run_id) == (11, 3)  # addressed by the shim
    assert dict(via_worker.content.config_records["site"]) == {"name": "store"}


def test_a_failing_phase_leaves_only_the_contract_code(tmp_path, store, worker):
    msg, context = pretrain_message(tmp_path, store, worker.path)
    secret = tmp_path / "patient-0042-slide.toml"
    context.node_config["data-path"] = str(secret)
    with pytest.raises(SiteFailure) as failure:
        run_phase("pretrain", msg, context)
    assert str(failure.value) == "fedst-site-error 11 config-invalid"
    assert "patient-0042" in (tmp_path / "work" / "site-errors.log").read_text()  # the details stay on the site


def test_auto_falls_back_without_a_worker_and_required_fails(tmp_path, store):
    missing = tmp_path / "no-worker" / "site.sock"
    msg, context = pretrain_message(tmp_path, store, missing)
    assert "arrays" in run_phase("pretrain", msg, context).content.array_records  # auto: ran in this process
    msg, context = pretrain_message(tmp_path, store, missing, **{"site-worker": "required"})
    with pytest.raises(SiteFailure, match="^fedst-site-error 16 site-worker$"):
        run_phase("pretrain", msg, context)
    msg, context = pretrain_message(tmp_path, store, None, **{"site-worker": "required"})
    with pytest.raises(SiteFailure, match="site-worker"):
        run_phase("pretrain", msg, context)


def test_unknown_message_type_and_other_versions_are_refused(tmp_path, store, worker):
    msg, context = pretrain_message(tmp_path, store, worker.path)
    with serverapp_identity(3):
        rogue = Message(msg.content, dst_node_id=11, message_type="query.shell")
    status, payload = link.forward(worker.path, rogue, context)
    assert status == link.REFUSED and b"query.shell" in payload
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(worker.path))
        sock.sendall(link.MAGIC)
        link.send_frame(sock, b'{"protocol": 1, "fedst": "0.0.0-other"}')
        assert link.recv_exact(sock, 1)[0] == link.REFUSED
        assert b"0.0.0-other" in link.recv_frame(sock)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # a frame claiming 1 TB is not allocated
        sock.connect(str(worker.path))
        sock.sendall(link.MAGIC + (1 << 40).to_bytes(8, "big"))
        assert sock.recv(1) == b""  # closed unanswered
    assert worker.served == 0
    run_phase("pretrain", msg, context)  # and the worker still serves
    assert worker.served == 1


NOBODY_CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("connect-refused", exc.errno)
    raise SystemExit(0)
try:
    s.sendall(b"FEDSTW1\\n")
    got = s.recv(1)
except OSError:  # reset: the worker closed first
    got = b""
print("answer", repr(got))
"""


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_another_user_cannot_reach_the_worker(worker):
    def as_nobody() -> str:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", NOBODY_CONNECT]
        return subprocess.run([*cmd, str(worker.path)], capture_output=True, text=True, timeout=60).stdout

    assert oct(worker.path.parent.stat().st_mode & 0o777) == "0o700"
    assert oct(worker.path.stat().st_mode & 0o777) == "0o600"
    assert as_nobody().startswith("connect-refused 13")  # EACCES: the folder is private
    worker.path.parent.chmod(0o755)  # an operator's mistake: the files are open, the peer check still holds
    worker.path.chmod(0o666)
    assert as_nobody().strip() == "answer b''"  # connected, then closed without an answer
    assert worker.served == 0


def test_socket_path_checks(tmp_path):
    open_folder = tmp_path / "open"
    open_folder.mkdir(mode=0o755)
    open_folder.chmod(0o755)
    with pytest.raises(PermissionError, match="must belong to this user and be private"):
        prepare_socket_path(open_folder / "site.sock")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "site.sock").write_text("not a socket")
    with pytest.raises(FileExistsError, match="is not a socket"):
        prepare_socket_path(private / "site.sock")
    with pytest.raises(ValueError, match="longer than the 107 bytes"):
        prepare_socket_path(tmp_path / ("x" * 120) / "site.sock")


def test_the_shim_imports_no_torch():
    code = "import sys, client.app, client.worker_link, flwr.common.serde; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_a_stalled_peer_does_not_hold_the_worker(tmp_path, store, worker, monkeypatch):
    import client.worker

    monkeypatch.setattr(client.worker, "REQUEST_TIMEOUT_S", 0.5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
        stalled.connect(str(worker.path))
        stalled.sendall(link.MAGIC)  # ... and nothing more
        msg, context = pretrain_message(tmp_path, store, worker.path)
        assert "arrays" in run_phase("pretrain", msg, context).content.array_records
        assert worker.served == 1  # served by the worker once it gave up on the stalled request
