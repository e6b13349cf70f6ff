"""Sites that die or lose their SuperLink: the run goes on with the sites alive or stops with a clear error within
``round-timeout`` (never a hang), and deploy/start-supernode.sh brings a site back after a SuperLink restart.

Fast tests: the wait and sampling in process (server/localgrid.py with sites that disconnect) and the start
script against a stub ``flower-supernode``. Slow tests: real SuperLink + SuperNode processes on loopback, one
SuperNode killed with SIGKILL mid-run; the start script through a real SuperLink restart.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from shared.c2l.toy import write_toy_store
from shared.config import RunConfig
from shared.errors import FedstError
from tests.helpers import REPO, TOY_PANEL, toy_config, write_toy_consortium

flwr = pytest.importorskip("flwr")

from flwr.app import Message, RecordDict  # noqa: E402
from flwr.common.config import parse_config_args  # noqa: E402
from flwr.common.constant import SUPERLINK_NODE_ID  # noqa: E402
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message  # noqa: E402

from client.app import app as client_app  # noqa: E402
from server.localgrid import LocalGrid, serverapp_identity  # noqa: E402
from server.procs import family, free_port, start, stop_tree  # noqa: E402
from server.results import load_results  # noqa: E402
from server.rounds import GONE  # noqa: E402
from server.sites import answering_node  # noqa: E402
from server.superlink import SuperLink, supernode_command  # noqa: E402
from server.workflow import Workflow  # noqa: E402

SCRIPT = REPO / "deploy" / "start-supernode.sh"


# -- in process: sites that disconnect between rounds ---------------------------------------------------------
class LeavingGrid(LocalGrid):
    """A LocalGrid whose ``leave`` nodes disconnect (are no longer listed) once the first round was answered."""

    def __init__(self, *args, leave: set[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.leave = leave
        self.rounds = 0

    def get_node_ids(self):
        return [n for n in self.node_configs if not (self.rounds and n in self.leave)]

    def send_and_receive(self, messages, *, timeout=None):
        replies = super().send_and_receive(messages, timeout=timeout)
        self.rounds += 1
        return replies


def _run(stores, tmp_path, leave: set[int], **overrides):
    config = toy_config(tmp_path, **overrides)
    nodes = {101 + i: {"data-path": str(p), "work-dir": str(tmp_path / f"work-{i}")} for i, p in enumerate(stores)}
    with LeavingGrid(client_app, nodes, config, leave=leave) as grid:
        return Workflow(grid, RunConfig.from_mapping(config), Path(config["out-dir"]) / config["run-name"]).run_all()


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    return write_toy_consortium(tmp_path_factory.mktemp("toy-stores"))


def test_a_site_that_left_is_failed_and_the_rest_go_on(stores, tmp_path):
    """Flower's own sampling would wait forever for the 3 sites the phase started with."""
    results = _run(
        stores,
        tmp_path,
        leave={103},
        phases="pretrain,downstream",
        **{"rounds-pretrain": 3, "min-sites": 2, "failure-tolerance": 1},
    )
    assert results.status == "completed"
    rounds = results.phases["pretrain"].rounds
    assert set(rounds[0].sites) == {"site-0", "site-1", "site-2"} and rounds[0].failed == {}
    for row in rounds[1:]:  # counted against failure-tolerance, as a site that fails inside a round
        assert set(row.sites) == {"site-0", "site-1"} and row.failed == {"site-2": GONE}
    downstream = results.phases["downstream"].last  # a new phase samples the sites alive now
    assert set(downstream.sites) == {"site-0", "site-1"} and downstream.failed == {}


def test_too_few_sites_left_fails_the_run_within_round_timeout(stores, tmp_path):
    config = {"rounds-pretrain": 3, "min-sites": 2, "failure-tolerance": 1, "round-timeout": 2.0}
    started = time.monotonic()
    with pytest.raises(FedstError, match=r"pretrain round 2: only 1 site\(s\) connected after 2 s \(min-sites 2\)"):
        _run(stores, tmp_path, leave={102, 103}, phases="pretrain", **config)
    assert time.monotonic() - started < 30
    saved = load_results(tmp_path / "runs" / "r" / "results.json")
    assert saved.status == "failed" and "only 1 site(s) connected" in saved.error
    assert [row.round for row in saved.phases["pretrain"].rounds] == [1]


def test_the_superlinks_node_unavailable_error_answers_for_the_dead_node():
    """Flower's SuperLink replies for a node whose heartbeat expired from its own node id (1), not the node's."""
    with serverapp_identity(5):
        sent = [Message(RecordDict(), dst_node_id=node, message_type="train") for node in (7, 8)]
        for msg in sent:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what Flower's grid does when it pushes them
        error = create_message_error_unavailable_res_message(sent[1].metadata, "node_unavail")
        own = Message(RecordDict(), reply_to=sent[0])
    assert error.metadata.src_node_id == SUPERLINK_NODE_ID and "Node Unavailable" in error.error.reason
    assert answering_node(error, sent) == 8
    assert answering_node(own, sent) == own.metadata.src_node_id


# -- deploy/start-supernode.sh against a stub flower-supernode -------------------------------------------------
STUB = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Stub flower-supernode: records its arguments, then plays line N of $STUB_DIR/plan on call N (the last
    # line once the plan is used up).
    n=$(( $(cat "$STUB_DIR/calls" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$STUB_DIR/calls"
    printf '%s\\0' "$@" > "$STUB_DIR/argv-$n"
    action=$(sed -n "${n}p" "$STUB_DIR/plan"); action=${action:-$(tail -n 1 "$STUB_DIR/plan")}
    case "$action" in
      lost) echo "INFO :      SuperNode ID: 42"; echo "INFO :      SuperNode terminated gracefully."; exit 0 ;;
      refused) echo "ERROR :     Exit Code: 305"; echo "Failed to initialize the connection."; exit 1 ;;
      bad-address) echo "ERROR :     Exit Code: 600"; exit 1 ;;
      serve) echo "INFO :      SuperNode ID: 7"; sleep 600 & trap 'kill $!; exit 0' TERM; wait ;;
    esac
""")


def _stub(tmp_path: Path, *plan: str) -> dict[str, str]:
    folder = tmp_path / "stub"
    folder.mkdir()
    (folder / "flower-supernode").write_text(STUB)
    (folder / "flower-supernode").chmod(0o755)
    (folder / "plan").write_text("\n".join(plan) + "\n")
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(folder), str(Path(sys.executable).parent), os.environ["PATH"]]),  # + fedst
        "STUB_DIR": str(folder),
        "FEDST_RECONNECT_MIN_S": "0",
        "FEDST_RECONNECT_MAX_S": "1",
    }


def _script(env, data: Path, work: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    args = ["bash", str(SCRIPT), "127.0.0.1:9", "ca.crt", "site.key", str(data), str(work), "9999"]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def _calls(env) -> int:
    return int((Path(env["STUB_DIR"]) / "calls").read_text())


def _argv(env, n: int) -> list[str]:
    return (Path(env["STUB_DIR"]) / f"argv-{n}").read_text().split("\0")[:-1]


def test_node_config_keeps_paths_with_quotes(tmp_path):
    """The SuperNode reads the node config with Flower's own parser; quotes, spaces and backslashes survive."""
    data = tmp_path / 'it\'s a "site"' / "site.toml"
    data.parent.mkdir()
    data.write_text("")
    work = tmp_path / "work 'w' \\ \"x\""
    env = {**_stub(tmp_path, "bad-address"), "SITE_NAME": "hospital-b"}
    done = _script(env, data, work)
    assert done.returncode == 3 and "Flower exit code 600, a setup problem" in done.stderr  # not retried
    argv = _argv(env, 1)
    config_arg = argv[argv.index("--node-config") + 1]
    assert parse_config_args([config_arg]) == {  # what flower-supernode does with --node-config
        "data-path": str(data.resolve()),
        "work-dir": str(work.resolve()),
        "site": "hospital-b",
        "worker-socket": str(work.resolve() / "worker" / "site.sock"),  # the site worker the script started
    }
    bad = tmp_path / "line\nbreak"
    bad.mkdir()
    done = _script(env, bad, tmp_path / "w2")
    assert done.returncode == 2 and "DATA_PATH contains a control character" in done.stderr


def test_refused_before_ever_connecting_is_explained_not_retried(tmp_path):
    env = _stub(tmp_path, "refused")
    done = _script(env, tmp_path, tmp_path / "work")
    assert done.returncode == 3 and _calls(env) == 1
    assert "refused this SuperNode (Flower exit code 305)" in done.stderr
    assert "has not connected once" in done.stderr and "deploy/register-node.sh" in done.stderr


def test_reconnects_after_losing_the_superlink_and_gives_up_on_refusal_after_grace(tmp_path):
    env = {**_stub(tmp_path, "lost", "lost", "refused"), "FEDST_REFUSED_GRACE_S": "2"}
    started = time.monotonic()
    done = _script(env, tmp_path, tmp_path / "work")
    assert done.returncode == 3 and time.monotonic() - started < 30
    assert _calls(env) >= 4  # two reconnects after a lost link, then refusals retried for the grace period
    assert done.stderr.count("the SuperLink went away or restarted") == 2
    assert "waiting for the operator to register this site's key again" in done.stderr
    assert "still refused 2 s after the SuperLink came back" in done.stderr


def test_sigterm_stops_the_supernode_and_the_script(tmp_path):
    env = _stub(tmp_path, "serve")
    proc = start(
        ["bash", str(SCRIPT), "127.0.0.1:9", "ca", "key", str(tmp_path), str(tmp_path / "w")], tmp_path / "log", env
    )
    try:
        deadline = time.monotonic() + 30
        while not (Path(env["STUB_DIR"]) / "calls").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        log = (tmp_path / "log").read_text()
        assert _calls(env) == 1 and "stopped" in log
        assert "site worker started" in log  # and stopped with the script: nothing left below it
        assert not family(proc.pid)
    finally:
        stop_tree(proc)


# -- real processes -------------------------------------------------------------------------------------------
def _run_and_kill(link: SuperLink, tmp_path: Path, name: str, victim: subprocess.Popen, **overrides):
    """Submit the fedst app, SIGKILL ``victim`` once pretraining round 1 is checkpointed; (run info, seconds from
    the kill until the run finished, run id)."""
    config = toy_config(tmp_path, **{"run-name": name, "min-sites": 2, "failure-tolerance": 1, **overrides})
    run_id = link.submit(REPO, config)
    latest = tmp_path / "runs" / name / "checkpoints" / "pretrain" / "latest.json"
    deadline = time.monotonic() + 240
    while not latest.exists():
        assert time.monotonic() < deadline, link.logs(run_id)[-3000:]
        time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)  # the SuperNode only: its SuperExec and ClientApps are left to notice
    killed = time.monotonic()
    info = link.wait(run_id, timeout=300)
    return info, time.monotonic() - killed, run_id


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_killed_supernode_run_goes_on_with_the_rest_then_stops_cleanly(tmp_path):
    stores = write_toy_consortium(tmp_path / "stores")
    link = SuperLink(tmp_path / "flwr", simulation=False)
    nodes: list[subprocess.Popen] = []
    try:
        with link:
            for i, store in enumerate(stores):
                node_config = {"data-path": str(store), "work-dir": str(tmp_path / f"work-{i}"), "site": f"site-{i}"}
                cmd = supernode_command(link.address, node_config, free_port())
                nodes.append(start(cmd, tmp_path / f"supernode-{i}.log", env=link.env))
            # 3 sites, min-sites 2, failure-tolerance 1: one SuperNode killed after round 1, the run completes
            info, _, run_id = _run_and_kill(
                link,
                tmp_path,
                "goes-on",
                nodes[2],
                phases="pretrain",  # a broadcast phase samples the same way (tested in process above)
                **{"rounds-pretrain": 3, "round-timeout": 90.0},
            )
            assert info["status"] == "finished:completed", link.logs(run_id)[-3000:]
            # 2 sites left, min-sites 2: one more killed after round 1, the run fails with a clear error, in time
            info, after_kill, run_id = _run_and_kill(
                link, tmp_path, "too-few", nodes[1], phases="pretrain", **{"rounds-pretrain": 2, "round-timeout": 60.0}
            )
            assert info["status"] == "finished:failed"
            assert after_kill < 150  # heartbeat expiry (<= 60 s) or round-timeout (60 s), then the run stops
            assert "min-sites 2" in link.logs(run_id)
    finally:
        for proc in nodes:
            stop_tree(proc)
    results = json.loads((tmp_path / "runs" / "goes-on" / "results.json").read_text())
    rounds = results["phases"]["pretrain"]["rounds"]
    assert results["status"] == "completed" and [r["round"] for r in rounds] == [1, 2, 3]
    assert set(rounds[0]["sites"]) == {"site-0", "site-1", "site-2"}
    assert set(rounds[1]["sites"]) == set(rounds[2]["sites"]) == {"site-0", "site-1"}
    assert set(rounds[1]["failed"]) == {"site-2"}  # still listed: Flower's "Node Unavailable" error reply
    assert rounds[2]["failed"] == {"site-2": GONE}  # heartbeat expired: not sampled, counted as failed
    failed = json.loads((tmp_path / "runs" / "too-few" / "results.json").read_text())
    assert failed["status"] == "failed" and "min-sites 2" in failed["error"]
    assert "1 valid replies" in failed["error"] or "only 1 site(s) connected" in failed["error"], failed["error"]
    assert not any(family(proc.pid) for proc in [*nodes, link.proc])


def _wait_online(link: SuperLink, count: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        listed = json.loads(link.flwr("supernode", "list", link.name, "--format", "json").stdout)["nodes"]
        if sum(node["status"] == "online" for node in listed) == count:
            return
        assert time.monotonic() < deadline, listed
        time.sleep(1.0)


def _wait_for_text(path: Path, text: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert time.monotonic() < deadline, path.read_text()[-3000:]
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("ssh-keygen") is None, reason="needs openssl and ssh-keygen"
)
@pytest.mark.timeout(420)
def test_start_script_brings_the_site_back_after_a_superlink_restart(tmp_path):
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    for name, *args in (
        ("make-certs.sh", certs),
        ("make-node-key.sh", keys, "site"),
        ("make-node-key.sh", keys, "rogue"),
    ):
        subprocess.run(["bash", str(REPO / "deploy" / name), *map(str, args)], check=True, capture_output=True)
    quoted = tmp_path / 'it\'s "quoted"'  # a real SuperNode started with quotes in both node-config paths
    store = write_toy_store(quoted / "store", n_spots=8, n_tiles=4, panel=TOY_PANEL, patch_px=16, seed=0).path
    tls = {"ca": certs / "ca.crt", "cert": certs / "server.crt", "key": certs / "server.key"}
    link = SuperLink(tmp_path / "flwr", simulation=False, auth=True, tls=tls)
    env = {**link.env, "FEDST_RECONNECT_MIN_S": "1", "FEDST_RECONNECT_MAX_S": "2", "SITE_NAME": "site-q"}

    def script(key: str, work: Path, log: Path) -> subprocess.Popen:
        args = [link.address, certs / "ca.crt", keys / key, store, work, free_port()]
        return start(["bash", str(SCRIPT), *map(str, args)], log, env=env)

    started: list[subprocess.Popen] = []
    try:
        with link:
            link.flwr("supernode", "register", str(keys / "site.pub"), link.name)
            started.append(rogue := script("rogue", tmp_path / "rogue-work", tmp_path / "rogue.log"))
            started.append(site := script("site", quoted / "work", tmp_path / "site.log"))
            assert rogue.wait(timeout=120) == 3  # never registered: explained, not retried
            assert "has not connected once" in (tmp_path / "rogue.log").read_text()
            _wait_online(link, 1)
            stop_tree(link.proc)  # SuperLink restart: in-memory state, the registered key is forgotten
            link.__enter__()
            _wait_for_text(tmp_path / "site.log", "waiting for the operator to register this site's key again")
            link.flwr("supernode", "register", str(keys / "site.pub"), link.name)  # the runbook's recovery step
            _wait_online(link, 1)
            assert site.poll() is None  # the same script brought the site back
            site.send_signal(signal.SIGTERM)
            assert site.wait(timeout=30) == 0
    finally:
        for proc in started:
            stop_tree(proc)
    log = (tmp_path / "site.log").read_text()
    assert "the SuperLink went away or restarted" in log and log.count("SuperNode ID:") >= 2
    assert parse_config_args([str(quoted / "work" / "node-config.toml")]) == {
        "data-path": str(store.resolve()),
        "work-dir": str((quoted / "work").resolve()),
        "site": "site-q",
        "worker-socket": str((quoted / "work").resolve() / "worker" / "site.sock"),  # the script's site worker
    }
    assert not any(family(proc.pid) for proc in [*started, link.proc])
