"""The proxy is the only way into the SuperLink (issue 13, item 1): the shipped deploy/nginx.conf and
deploy/nginx-operator.conf run in a real nginx (Debian's package) in front of a real SuperLink started by
deploy/start-superlink.sh (TLS, SuperNode authentication, 127.0.0.1 only). An outsider holding only the address
and ca.crt can neither list, register nor run, on either listener; the operator (client certificate, added by the
operator-side forwarder) can; a site's SuperNode reaches the Fleet API through the proxy and runs the operator's
app. The configs are used as shipped except for paths, ports and the proxy's host name, which the test substitutes
(each substitution must match, so a reshaped config fails here instead of silently going untested)."""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import subprocess
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server.procs import family, free_port, start, stop_tree
from server.superlink import REPO, SuperLink, add_connection, flwr_env, supernode_command
from tests.helpers import write_flower_app

DEPLOY = REPO / "deploy"
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).is_file()), None)
NOBODY = 65534  # nginx runs as this uid/gid when the test runs as root: the proxy under test is unprivileged

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx-light)"),
    pytest.mark.skipif(
        os.geteuid() == 0 and shutil.which("setpriv") is None, reason="as root, needs setpriv to run nginx unprivileged"
    ),
    pytest.mark.skipif(
        shutil.which("openssl") is None or shutil.which("ssh-keygen") is None, reason="needs openssl and ssh-keygen"
    ),
]

# A tiny app (no torch): the ServerApp sends each of `sites` SuperNodes one message and writes what came back.
APP = textwrap.dedent("""
    import json, time
    from pathlib import Path

    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    client = ClientApp()
    server = ServerApp()


    @client.query()
    def query(msg: Message, context: Context) -> Message:
        value = msg.content.config_records["config"]["value"]
        return Message(RecordDict({"metrics": MetricRecord({"echo": float(value) + 1.0})}), reply_to=msg)


    @server.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 60
        while len(nodes := sorted(grid.get_node_ids())) < int(context.run_config["sites"]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(nodes)} SuperNodes connected")
            time.sleep(0.5)
        messages = [
            Message(RecordDict({"config": ConfigRecord({"value": 41.0})}), dst_node_id=node, message_type="query")
            for node in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=120.0))
        echoes = [reply.content.metric_records["metrics"]["echo"] for reply in replies if not reply.has_error()]
        Path(context.run_config["out"]).write_text(json.dumps({"echoes": echoes}))
""")


def _script(name: str, *args: object) -> None:
    subprocess.run(["bash", str(DEPLOY / name), *map(str, args)], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deploy/make-certs.sh's consortium CA, server certificate, operator CA and operator client certificate."""
    out = tmp_path_factory.mktemp("certs")
    _script("make-certs.sh", out)
    return out


class Nginx:
    """One nginx process from a shipped config, with its own prefix (conf, certificates, pid, logs, temp files) in a
    private temporary folder; started in the foreground, so the PID we hold is the master, stopped by that PID."""

    def __init__(self, shipped: Path, replacements: dict[str, str], files: list[Path]):
        text = shipped.read_text()
        for old, new in replacements.items():
            if old not in text:
                raise AssertionError(f"{shipped.name} no longer contains {old!r}: update this test with it")
            text = text.replace(old, new)
        temp_paths = "".join(f"    {name}_temp_path PREFIX/{name};\n" for name in _temp_path_modules())
        text = "pid PREFIX/nginx.pid;\n" + text.replace("http {\n", "http {\n" + temp_paths, 1)
        # not under pytest's 0700 tmp (nor a private TMPDIR) when nginx runs as nobody: it must read its prefix
        self.prefix = Path(tempfile.mkdtemp(prefix="fedst-nginx-", dir="/tmp" if os.geteuid() == 0 else None))
        (self.prefix / "certs").mkdir()
        for file in files:
            shutil.copy(file, self.prefix / "certs" / file.name)
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(text.replace("PREFIX/", f"{self.prefix}/"))
        self.error_log = self.prefix / "error.log"
        self.proc: subprocess.Popen | None = None
        if os.geteuid() == 0:
            for path in [self.prefix, *self.prefix.rglob("*")]:
                os.chown(path, NOBODY, NOBODY)

    def command(self, *args: str) -> list[str]:
        cmd = [str(NGINX), "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.error_log), *args]
        if os.geteuid() == 0:  # never a root nginx: drop to nobody before exec
            cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
        return cmd

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.command("-t"), capture_output=True, text=True, timeout=30)

    def start(self, ports: list[int]) -> None:
        self.proc = start(self.command("-g", "daemon off;"), self.prefix / "stdout.log")
        deadline = time.monotonic() + 30
        while not all(_listening(port) for port in ports):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"nginx did not start: {self.error_log.read_text() if self.error_log.exists() else ''}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            stop_tree(self.proc)
        shutil.rmtree(self.prefix, ignore_errors=True)


def _temp_path_modules() -> list[str]:
    """The temp-path directives this nginx build has (its compiled-in defaults are not writable unprivileged)."""
    built = subprocess.run([str(NGINX), "-V"], capture_output=True, text=True).stderr
    return [name.replace("-", "_") for name in re.findall(r"--http-([a-z-]+)-temp-path=", built)]


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.3)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _listen_addresses(pids: set[int]) -> set[str]:
    """host:port of every listening TCP socket the given processes hold (from /proc: no ss/netstat needed)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                address, port = fields[1].split(":")
                host = ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)) if table == "tcp" else address
                found.add(f"{host}:{int(port, 16)}")
    return found


def _logged(log: Path, text: str, timeout: float = 10.0) -> bool:
    """Whether ``text`` shows up in ``log`` within ``timeout`` s (uvicorn writes its access line after replying)."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _https_status(url: str, ca: Path, body: bytes = b"", cert: tuple[Path, Path] | None = None) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    if cert:
        context.load_cert_chain(*map(str, cert))
    request = urllib.request.Request(url, data=body or None, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _proxies(certs: Path, link_port: int) -> tuple[Nginx, Nginx, dict[str, int]]:
    ports = {"fleet": free_port(), "control": free_port(), "forwarder": free_port()}
    proxy = Nginx(
        DEPLOY / "nginx.conf",
        {
            "listen 443 ssl;": f"listen 127.0.0.1:{ports['fleet']} ssl;",
            "listen 8443 ssl;": f"listen 127.0.0.1:{ports['control']} ssl;",
            "server 127.0.0.1:9200;": f"server 127.0.0.1:{link_port};",
            "/etc/fedst/certs/": "PREFIX/certs/",
            "access_log /var/log/nginx/fedst-access.log;": "access_log PREFIX/access.log;",
        },
        [certs / name for name in ("ca.crt", "server.crt", "server.key", "operator-ca.crt")],
    )
    try:
        forwarder = Nginx(
            DEPLOY / "nginx-operator.conf",
            {
                "listen 127.0.0.1:9300;": f"listen 127.0.0.1:{ports['forwarder']};",
                "server fl.consortium.example:8443;": f"server 127.0.0.1:{ports['control']};",
                "proxy_ssl_name fl.consortium.example;": "proxy_ssl_name localhost;",  # the test's server cert SAN
                "/etc/fedst/operator/": "PREFIX/certs/",
            },
            [certs / name for name in ("ca.crt", "operator.crt", "operator.key")],
        )
    except BaseException:
        proxy.stop()  # removes its prefix
        raise
    return proxy, forwarder, ports


def test_shipped_proxy_configs_pass_nginx_t(certs):
    """Both shipped configs load in this nginx (Debian 12: 1.22), with only paths and ports substituted."""
    proxy, forwarder, _ = _proxies(certs, free_port())
    try:
        for nginx in (proxy, forwarder):
            done = nginx.check()
            assert done.returncode == 0, done.stderr
            assert "test is successful" in done.stderr
    finally:
        proxy.stop()
        forwarder.stop()


@pytest.mark.timeout(420)
def test_outsider_cannot_list_register_or_run_operator_can(certs, tmp_path):
    keys = tmp_path / "keys"
    for name in ("site-0", "intruder"):
        _script("make-node-key.sh", keys, name)
    out = tmp_path / "echo.json"
    app = write_flower_app(tmp_path / "app", "echoapp", APP, {"sites": 1, "out": str(out)})
    link = SuperLink(tmp_path / "operator", simulation=False, name="operator")  # its flwr helpers, our command
    superlink = ["bash", str(DEPLOY / "start-superlink.sh"), str(certs), str(tmp_path / "state"), str(link.port)]
    proxy, forwarder, ports = _proxies(certs, link.port)
    # The operator's CLI talks to its local forwarder (insecure on its loopback, mTLS from there on).
    add_connection(link.home, "operator", f"127.0.0.1:{ports['forwarder']}")
    # The outsider: the public address and ca.crt, nothing else (its own FLWR_HOME).
    outsider_home = tmp_path / "outsider"
    add_connection(outsider_home, "public", f"127.0.0.1:{ports['fleet']}", certs / "ca.crt")
    add_connection(outsider_home, "control", f"127.0.0.1:{ports['control']}", certs / "ca.crt")
    outsider_env = {**flwr_env(outsider_home), "COLUMNS": "200"}  # unwrapped error boxes

    def outsider(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=outsider_env, capture_output=True, text=True, timeout=120, cwd=REPO)

    started: list[subprocess.Popen] = []
    try:
        link.proc = start(superlink, link.log, env=link.env)
        link.wait_ready()
        proxy.start([ports["fleet"], ports["control"]])
        forwarder.start([ports["forwarder"]])
        # the SuperLink (and its SuperExec) listen on loopback only
        addresses = _listen_addresses(family(link.proc.pid))
        assert addresses and all(a.startswith("127.0.0.1:") for a in addresses), addresses

        # no client certificate: the Fleet listener refuses Control paths (403), the Control listener the client (400)
        for connection, refusal in (("public", "403 Forbidden"), ("control", "400 Bad Request")):
            for args in (
                ("ls", connection),
                ("supernode", "register", str(keys / "intruder.pub"), connection),
                ("run", str(app), connection),
            ):
                done = outsider(*args)
                assert done.returncode != 0 and refusal in done.stdout + done.stderr, (args, done.stdout, done.stderr)
        fleet = f"https://127.0.0.1:{ports['fleet']}"
        for path in ("/v1/control/list-runs", "/v1/runtime/get-nodes", "/health", "/docs", "/openapi.json"):
            assert _https_status(fleet + path, certs / "ca.crt", body=b"x" if path.startswith("/v1") else b"") == 403
        assert "/v1/control/" not in link.log.read_text()  # none of it reached the SuperLink

        # the operator: register the site's key, list, and run an app that a SuperNode behind the proxy executes
        link.flwr("supernode", "register", str(keys / "site-0.pub"), "operator")
        assert _logged(link.log, "POST /v1/control/register-node")  # the SuperLink logs what reaches it
        # the Control listener takes only certificates of the operator CA (the consortium CA's server cert: 400)
        control = f"https://127.0.0.1:{ports['control']}/v1/control/list-runs"
        server_cert = (certs / "server.crt", certs / "server.key")
        assert _https_status(control, certs / "ca.crt", body=b"x", cert=server_cert) == 400
        operator_cert = (certs / "operator.crt", certs / "operator.key")
        status = _https_status(control, certs / "ca.crt", body=b"x", cert=operator_cert)  # Flower refuses the body
        assert status not in (400, 403) and _logged(link.log, "POST /v1/control/list-runs"), status
        node = supernode_command(
            f"127.0.0.1:{ports['fleet']}", {"site": "site-0"}, free_port(), ca=certs / "ca.crt", key=keys / "site-0"
        )
        started.append(start(node, tmp_path / "supernode.log", env=link.env))
        run_id = link.submit(app, {})
        info = link.wait(run_id, timeout=240, interval=2.0)
        assert info["status"] == "finished:completed", link.logs(run_id)[-3000:]
        assert json.loads(out.read_text()) == {"echoes": [42.0]}
        nodes = json.loads(link.flwr("supernode", "list", "operator", "--format", "json").stdout)["nodes"]
        assert len(nodes) == 1  # the site's key; the outsider's never got registered
        listed = json.loads(link.flwr("ls", "operator", "--format", "json").stdout)["runs"]
        assert [str(r["run-id"]) for r in listed] == [run_id]  # only the operator's run
    finally:
        for proc in started:
            stop_tree(proc)
        if link.proc is not None:
            stop_tree(link.proc)
        proxy.stop()
        forwarder.stop()
    assert not any(family(proc.pid) for proc in [*started, link.proc, proxy.proc, forwarder.proc])
