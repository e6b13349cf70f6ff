"""Start and reliably stop the Flower processes fedst launches (SuperLink, SuperNodes, simulation).

Flower's SuperLink spawns a SuperExec in its own process group, which spawns the simulation and Ray actors;
actors may be re-parented to init. `stop_tree` therefore collects every descendant of the process we started
and every member of those descendants' process groups (read from /proc), and signals exactly those ids.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Sequence

FLWR_IN_MEMORY_STATE = ":flwr-in-memory:"
"""`flower-superlink --database` value for Flower's in-memory LinkState/ObjectStore (its own default).

Why not a SQLite file: Flower 1.41 keeps messages and model objects (5 MB chunks) in SQLite with a fixed 5 s busy
timeout (flwr/supercore/constant.py, SQLITE_PRAGMAS). Writing a ~100 MB model on a busy host holds the write lock
longer than that; concurrent calls then fail with `database is locked` -> HTTP 500, which Flower's HTTP clients
never retry (flwr/supercore/retry/http_retry.py: only 502/503/504): the SuperNode drops its reply or leaves the
federation and the ServerApp exits. In memory there is no such timeout; the price is that registered SuperNode
keys and run history do not survive a SuperLink restart (deploy/README.md says how to re-register).
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(
    cmd: Sequence[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group), stdout+stderr to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "ab")
    try:
        return subprocess.Popen(
            list(cmd), stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
    finally:
        handle.close()


def _table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) for every process visible in /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[2]))
    return table


def family(pid: int) -> set[int]:
    """``pid``, its descendants, and every process sharing a process group with any of them."""
    table = _table()
    members = {pid}
    changed = True
    while changed:
        changed = False
        groups = {table[p][1] for p in members if p in table} | {pid}  # started with its own session: pgid == pid
        for other, (ppid, pgid) in table.items():
            if other not in members and (ppid in members or pgid in groups):
                members.add(other)
                changed = True
    return {p for p in members if p in table and p != os.getpid() and table[p][1] != os.getpgrp() and _alive(p)}


def stop_tree(proc: subprocess.Popen | int, timeout: float = 10.0) -> None:
    """SIGTERM ``proc`` and its family, then SIGKILL what is left after ``timeout`` seconds."""
    pid = proc if isinstance(proc, int) else proc.pid
    targets = family(pid) | {pid}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in targets:
            try:
                os.kill(target, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            if isinstance(proc, subprocess.Popen):
                proc.poll()
            alive = {t for t in targets if _alive(t)}
            if not alive:
                if isinstance(proc, subprocess.Popen):
                    try:
                        proc.wait(timeout=5)  # reap our direct child
                    except subprocess.TimeoutExpired:
                        pass
                return
            time.sleep(0.2)
        targets = {t for t in targets if _alive(t)} | (family(pid) if _alive(pid) else set())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"
