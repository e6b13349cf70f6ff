"""A local user on the SuperLink host cannot reach its loopback port (issue 13, item 1: "nothing protects against
a local user on the SuperLink host"): deploy/loopback-firewall.sh in front of a real SuperLink.

Everything runs inside a fresh network namespace (`unshare -n`, as root), so the rules and the SuperLink exist only
there and vanish with it: a real flower-superlink, the shipped script as is, and the real `flwr ls` run once as an
allowed user (root here, standing in for the SuperLink's own user) and once as `nobody` (any other local user)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from server.superlink import REPO

SCRIPT = REPO / "deploy" / "loopback-firewall.sh"
NEEDS = ("unshare", "setpriv", "iptables", "ip")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a network namespace and iptables rules of its own)"),
    pytest.mark.skipif(
        any(shutil.which(tool) is None for tool in NEEDS),
        reason=f"needs {', '.join(NEEDS)} (Debian: apt-get install iptables iproute2)",
    ),
]

# Runs inside the namespace: bring up lo, start the SuperLink, try `flwr ls` as root and as nobody with the
# firewall on, then as nobody again after --remove; prints one JSON line with the outcomes.
INNER = textwrap.dedent("""
    import json, os, shutil, subprocess, sys
    from pathlib import Path

    from server.superlink import SuperLink

    script, home = sys.argv[1], Path(sys.argv[2])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    out = {}
    with SuperLink(home, simulation=False) as link:
        for path in home.rglob("*"):  # nobody must read the connection config
            path.chmod(0o777 if path.is_dir() else 0o666)

        def flwr_ls(as_nobody):
            env = dict(link.env)
            cmd = [str(Path(sys.executable).with_name("flwr")), "ls", link.name, "--format", "json"]
            if as_nobody:
                cmd = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--", *cmd]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            try:  # `flwr ls --format json` exits 0 on a failed connection too; its JSON says whether it worked
                success = json.loads(done.stdout[done.stdout.index("{") :])["success"]
            except (ValueError, KeyError):
                success = False
            return {"rc": done.returncode, "success": success, "text": (done.stdout + done.stderr)[-600:]}

        ports = sorted({link.port, link.control_port})
        for port in ports:
            subprocess.run([script, str(port), "root"], check=True, capture_output=True)
        out["root"] = flwr_ls(False)
        out["nobody"] = flwr_ls(True)
        for port in ports:
            subprocess.run([script, "--remove", str(port)], check=True, capture_output=True)
        out["nobody_after_remove"] = flwr_ls(True)
    print(json.dumps(out))
""")


def test_only_allowed_local_users_reach_the_superlink(tmp_path: Path):
    probe = subprocess.run(
        ["unshare", "-n", "iptables", "-n", "-L", "OUTPUT"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode != 0:
        pytest.skip(f"iptables does not work in a network namespace here: {probe.stderr.strip()[:200]}")
    # Flower's home for both users, outside pytest's root-only tmp tree: `nobody` must read the connection config
    home = Path(tempfile.mkdtemp(prefix="fedst-firewall-"))
    try:
        home.chmod(0o777)
        (tmp_path / "inner.py").write_text(INNER)
        done = subprocess.run(
            ["unshare", "-n", sys.executable, str(tmp_path / "inner.py"), str(SCRIPT), str(home)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        shutil.rmtree(home, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["root"]["success"] is True, out["root"]  # the allowed user is served
    assert out["nobody"]["success"] is False, out["nobody"]  # any other local user is refused
    assert "unavailable" in out["nobody"]["text"], out["nobody"]  # ... by the network (not by file permissions)
    assert out["nobody_after_remove"]["success"] is True, out["nobody_after_remove"]  # it was the rule


def test_the_script_refuses_bad_arguments():
    for args, expected in (
        (["92x0", "root"], "port must be a number"),
        (["9200"], "name at least one user"),
        (["9200", "no-such-user-fedst"], "no such user"),
    ):
        done = subprocess.run(["unshare", "-n", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and expected in done.stderr, (args, done.stderr)
