"""Real deployment on loopback: SuperLink with TLS + SuperNode authentication, SuperNodes as separate
processes, the multi-phase fedst app run to `finished:completed`. Every process started here is stopped."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from shared.federation import toy
from shared.federation.procs import free_port, start, stop_tree
from shared.federation.runner import REPO, SuperLink, supernode_command

pytestmark = pytest.mark.slow
PANEL = [f"G{i}" for i in range(6)]


def _script(name: str, *args: str) -> None:
    subprocess.run(["bash", str(REPO / "deploy" / name), *map(str, args)], check=True, capture_output=True, timeout=120)


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("ssh-keygen") is None, reason="needs openssl and ssh-keygen")
@pytest.mark.timeout(420)
def test_tls_and_node_auth_multi_phase_run(tmp_path):
    certs, keys = tmp_path / "certs", tmp_path / "keys"
    _script("make-certs.sh", certs)
    for name in ("site-0", "site-1", "rogue"):
        _script("make-node-key.sh", keys, name)
    stores = [toy.write_toy_store(tmp_path / f"store-{i}", panel=PANEL, patch_px=16, seed=i).path for i in range(2)]
    started: list[subprocess.Popen] = []
    link = SuperLink(tmp_path / "flwr", simulation=False, auth=True,
                     tls={"ca": certs / "ca.crt", "cert": certs / "server.crt", "key": certs / "server.key"})
    try:
        with link:
            for i in range(2):
                link.flwr("supernode", "register", str(keys / f"site-{i}.pub"), link.name)
            for i, store in enumerate(stores):
                cmd = supernode_command(link.address, {"data-path": str(store), "work-dir": str(tmp_path / f"work-{i}")},
                                        free_port(), ca=certs / "ca.crt", key=keys / f"site-{i}")
                started.append(start(cmd, tmp_path / f"supernode-{i}.log", env=link.env))
            # an unregistered key is refused: the SuperNode exits with 305
            rogue = start(supernode_command(link.address, {"data-path": str(stores[0]), "work-dir": str(tmp_path / "rogue")},
                                            free_port(), ca=certs / "ca.crt", key=keys / "rogue"),
                          tmp_path / "rogue.log", env=link.env)
            started.append(rogue)
            overrides = {"backend": "toy", "patch-px": 16, "rounds-pretrain": 2, "local-steps": 2, "adapt-steps": 2,
                         "synthetic-count": 8, "out-dir": str(tmp_path / "runs"), "run-name": "deploy", "min-sites": 2}
            run_id = link.submit(REPO, overrides)
            info = link.wait(run_id, timeout=300)
            assert info["status"] == "finished:completed", link.logs(run_id)[-3000:]
            assert rogue.wait(timeout=60) != 0  # refused: Flower logs exit code 305 (the process status is 1)
            assert "Exit Code: 305" in (tmp_path / "rogue.log").read_text()
            listed = link.flwr("supernode", "list", link.name, "--format", "json").stdout
            assert listed.count('"online"') >= 2 or "online" in listed
    finally:
        for proc in started:
            stop_tree(proc)
    run_dir = tmp_path / "runs" / "deploy"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["round"] for r in results["phases"]["pretrain"]["rounds"]] == [1, 2]
    assert all(len(r["sites"]) == 2 for r in results["phases"]["pretrain"]["rounds"])
    assert len(results["phases"]["downstream"]["sites"]) == 2
    for name in ("summary.md", "loss_per_round.png", "resolved-config.json"):
        assert (run_dir / name).is_file()
    for i in range(2):  # the site's own report is written in its work dir, not sent
        assert (tmp_path / f"work-{i}" / "report" / "report.md").is_file()
    for proc in started:
        assert proc.poll() is not None
    from shared.federation.procs import family

    assert not any(family(proc.pid) for proc in started)  # nothing left behind, not even re-parented children
