"""Drive Flower from Python via its CLI: a private SuperLink, `flwr run`, polling `flwr ls` until done (`wait`), or
now and then while the caller reads the run's own records (`follow`).

Imports no Flower module (the CLI runs in subprocesses), so `fedst demo`, the tests and the benchmark share
one careful path: private FLWR_HOME, free loopback ports, runtime dependency installation disabled,
telemetry off, and every process started here stopped by id (server/procs.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from server.procs import FLWR_IN_MEMORY_STATE, free_port, start, stop_tree
from shared import tomlio
from shared.errors import FedstError

REPO = Path(__file__).resolve().parents[1]
FINISHED = "finished:"


def flwr_env(home: Path, http_port: int | None = None, control_port: int | None = None) -> dict[str, str]:
    """Environment for every Flower command: private home, offline-safe switches, private local ports."""
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
    )
    # SuperExec's poll for new ClientApp/ServerApp tasks (Flower's default 1 s): a local call, cheap at 0.2 s
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    if http_port:
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    if control_port:
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def write_overrides(path: Path, overrides: dict[str, Any]) -> Path:
    """A TOML file for `flwr run -c FILE` (safe for paths with spaces, unlike inline key=value pairs)."""
    path.write_text("".join(f"{key} = {tomlio.value(value)}\n" for key, value in overrides.items()))
    return path


def add_connection(home: Path, name: str, address: str, root_certificates: Path | None = None) -> None:
    """Set ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml`` (created when missing), replacing an earlier
    connection of that name: `fedst demo` re-run in the same folder must not append a second table of the same
    name, which Flower then refuses as invalid TOML."""
    import tomllib

    from shared.errors import FedstError

    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.toml"
    try:
        data = tomllib.loads(config.read_text()) if config.is_file() else {}
    except tomllib.TOMLDecodeError as exc:
        raise FedstError(f"{config}: not valid TOML ({exc}); delete it or fix it") from None
    superlink = data.setdefault("superlink", {})
    superlink.setdefault("default", name)
    connection: dict[str, Any] = {"address": address}
    if root_certificates:
        connection["root-certificates"] = str(root_certificates)
    else:
        connection["insecure"] = True
    superlink[name] = connection
    tomlio.write_toml(config, data)


class SuperLink:
    """A SuperLink on 127.0.0.1 for the lifetime of a ``with`` block (simulation or deployment runtime)."""

    def __init__(
        self,
        home: Path,
        *,
        simulation: bool,
        tls: dict[str, Path] | None = None,
        auth: bool = False,
        name: str = "fedst",
        log: Path | None = None,
        database: str = FLWR_IN_MEMORY_STATE,
    ):
        """`database`: Flower's in-memory state by default (see procs.FLWR_IN_MEMORY_STATE); a file path for SQLite."""
        self.home, self.simulation, self.tls, self.auth, self.name = home, simulation, tls, auth, name
        self.database = database
        self.port = free_port()
        self.control_port = free_port()
        self.log = log or home / "superlink.log"
        self.env = flwr_env(home, self.port, self.control_port)
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            "flower-superlink",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--control-api-address",
            f"127.0.0.1:{self.control_port}",
            "--disable-runtime-dependency-installation",
            "--database",
            self.database,
        ]
        if self.simulation:
            cmd += ["--simulation", "--isolation", "subprocess"]
        if self.tls:
            cmd += [
                "--ssl-ca-certfile",
                str(self.tls["ca"]),
                "--ssl-certfile",
                str(self.tls["cert"]),
                "--ssl-keyfile",
                str(self.tls["key"]),
            ]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        return cmd

    def __enter__(self) -> SuperLink:
        self.home.mkdir(parents=True, exist_ok=True)
        add_connection(self.home, self.name, self.address, self.tls["ca"] if self.tls else None)
        self.proc = start(self.command(), self.log, env=self.env)
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120.0) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise FedstError(f"SuperLink exited with code {self.proc.returncode}; see {self.log}")
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.5)
        raise FedstError(f"SuperLink did not open 127.0.0.1:{self.port} within {timeout:.0f} s; see {self.log}")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None:
            stop_tree(self.proc)

    # -- the CLI -------------------------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 300.0, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if check and done.returncode != 0:
            raise FedstError(
                f"`flwr {' '.join(args[:2])}` failed ({done.returncode}): {(done.stderr or done.stdout)[-800:]}"
            )
        return done

    def submit(self, app: Path, overrides: dict[str, Any], federation_config: str | None = None) -> str:
        """`flwr run` the app; returns the run id (the run continues in the SuperLink)."""
        args = [
            "run",
            str(app),
            self.name,
            "--format",
            "json",
            "-c",
            str(write_overrides(self.home / "overrides.toml", overrides)),
        ]
        if federation_config:
            args += ["--federation-config", federation_config]
        done = self.flwr(*args)
        try:
            reply = json.loads(done.stdout[done.stdout.index("{") :])
            return str(reply["run-id"])
        except (ValueError, KeyError):
            raise FedstError(f"`flwr run` gave no run id: {done.stdout[-800:]} {done.stderr[-800:]}") from None

    def status(self, run_id: str) -> dict[str, Any]:
        done = self.flwr("ls", "--run-id", run_id, "--format", "json", self.name, timeout=120)
        runs = json.loads(done.stdout[done.stdout.index("{") :]).get("runs", [])
        return runs[0] if runs else {}

    def wait(
        self,
        run_id: str,
        timeout: float,
        on_poll: Callable[[dict[str, Any]], None] | None = None,
        interval: float = 3.0,
    ) -> dict[str, Any]:
        """Poll `flwr ls` until the run is finished (`flwr run` exits 0 even when the run fails)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.status(run_id)
            if on_poll is not None:
                on_poll(info)
            if str(info.get("status", "")).startswith(FINISHED):
                return info
            if time.monotonic() > deadline:
                self._stop_late(run_id, timeout)
            time.sleep(interval)

    def follow(
        self,
        run_id: str,
        timeout: float,
        watch: Callable[[], bool],
        *,
        interval: float = 1.0,
        status_every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> dict[str, Any]:
        """Like `wait`, cheaply: ``watch()`` every ``interval`` s reads the run's own records (no process), and
        returns True once they say the run ended; `flwr ls` (a process) runs then (at once, and every 3 polls until
        Flower agrees), and every ``status_every`` s regardless, so a ServerApp that died without writing its
        record is still noticed."""
        deadline = clock() + timeout
        last_status = clock()
        every, ended_before = status_every, False
        while True:
            ended = watch()
            now = clock()
            if ended and not ended_before:  # the records just said so: ask Flower now, then every 3 polls
                every, ended_before, last_status = min(3 * interval, status_every), True, float("-inf")
            if now - last_status >= every:
                info = self.status(run_id)
                last_status = now
                if str(info.get("status", "")).startswith(FINISHED):
                    return info
            if now > deadline:
                self._stop_late(run_id, timeout)
            sleep(interval)

    def _stop_late(self, run_id: str, timeout: float) -> None:
        self.flwr("stop", run_id, self.name, check=False)
        raise FedstError(f"run {run_id} did not finish within {timeout:.0f} s (stopped); see `flwr log {run_id}`")

    def logs(self, run_id: str) -> str:
        done = self.flwr("log", run_id, self.name, "--show", check=False, timeout=120)
        return done.stdout + done.stderr


def supernode_command(
    superlink: str, node_config: dict[str, Any], port: int, *, ca: Path | None = None, key: Path | None = None
) -> list[str]:
    """`flower-supernode` for one site (TLS + auth when ``ca``/``key`` are given, else --insecure)."""
    pairs = " ".join(f"{k}={tomlio.value(v)}" for k, v in node_config.items())
    cmd = [
        "flower-supernode",
        "--superlink",
        superlink,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        pairs,
    ]
    cmd += ["--root-certificates", str(ca)] if ca else ["--insecure"]
    if key:
        cmd += ["--auth-supernode-private-key", str(key)]
    return cmd
