"""`fedst site check`: a partner's pre-join check on a generated site, and its TLS check against a real TLS socket
served with deploy/make-certs.sh's certificate (no Flower process: the check sends no Flower request)."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from client.cli import register
from client.preflight import _superlink

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
LENIENT = ["--min-free-gb", "0", "--min-cpus", "1"]  # the CI machine's disk and cores are not the site's


def _script(name: str, *args: object) -> None:
    subprocess.run(["bash", str(DEPLOY / name), *map(str, args)], check=True, capture_output=True, timeout=120)


def _fedst() -> typer.Typer:
    """The `fedst` root with only the `site` group (the installed entry points may predate it)."""
    root = typer.Typer()
    root.callback()(lambda: None)
    register(root)
    return root


def _run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(_fedst(), ["site", "check", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _line(output: str, name: str) -> str:
    return next(line for line in output.splitlines() if line.split()[1:2] == [f"{name}:"])


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    _script("make-certs.sh", out)
    return out


@pytest.fixture(scope="module")
def tls_server(certs: Path) -> Iterator[int]:
    """A TLS listener on a free 127.0.0.1 port with the SuperLink's certificate: it completes handshakes, then
    closes each connection. Stopped (socket closed, thread joined) after the module."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    handshakes: list[str] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    handshakes.append(str(tls.version()))
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


@pytest.fixture(scope="module")
def node_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    _script("make-node-key.sh", out, "site-0")
    return out / "site-0"


def test_ready_site_passes_every_check_and_writes_nothing(
    synthetic_consortium: Path, certs: Path, tls_server: int, node_key: Path, tmp_path: Path
) -> None:
    site = synthetic_consortium / "site-0" / "site.toml"
    before = _files(synthetic_consortium)
    code, output = _run(
        site, *LENIENT, "--superlink", f"127.0.0.1:{tls_server}", "--root-certificates", certs / "ca.crt",
        "--key", node_key, "--work-dir", tmp_path / "not-yet" / "work",
    )  # fmt: skip
    assert code == 0, output
    for name in ("data", "spots", "panel", "disk", "cpu", "gpu", "key", "superlink"):
        assert _line(output, name).startswith("ok"), output
    assert "48 of the panel's 48 genes" in _line(output, "panel")
    assert "handshake verified" in _line(output, "superlink")
    assert output.rstrip().endswith("all 8 checks passed")
    assert _files(synthetic_consortium) == before
    assert not (tmp_path / "not-yet").exists()


def test_missing_file_fails_the_data_check_with_its_name(synthetic_consortium: Path, tmp_path: Path) -> None:
    site = tmp_path / "site-0"
    shutil.copytree(synthetic_consortium / "site-0", site)
    shutil.copy(synthetic_consortium / "panel.txt", tmp_path / "panel.txt")
    (site / "S0B.h5ad").unlink()
    before = _files(tmp_path)
    code, output = _run(site / "site.toml", *LENIENT)
    assert code == 2, output
    data = _line(output, "data")
    assert data.startswith("FAIL") and "S0B.h5ad" in data, output
    assert "fix:" in output and "Traceback" not in output
    assert "1 of 4 checks failed (data)" in output  # data, disk, cpu, gpu: no spots/panel without data
    assert _files(tmp_path) == before


def test_panel_without_overlap_fails(synthetic_consortium: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "panel.txt"
    foreign.write_text("NOTAGENE1\nNOTAGENE2\nNOTAGENE3\n")
    code, output = _run(synthetic_consortium / "site-1" / "site.toml", "--panel", foreign, *LENIENT)
    assert code == 2, output
    panel = _line(output, "panel")
    assert panel.startswith("FAIL") and "0 of the panel's 3 genes" in panel and "measure none" in panel, output
    assert _line(output, "data").startswith("ok")


def test_superlink_check_refused_port_and_foreign_ca(certs: Path, tls_server: int, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed = probe.getsockname()[1]
    refused = _superlink(f"127.0.0.1:{closed}", certs / "ca.crt")
    assert not refused.ok and "refused" in refused.detail and refused.fix
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=another CA", "-keyout", str(tmp_path / "other.key"), "-out", str(tmp_path / "other.crt")],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    foreign = _superlink(f"127.0.0.1:{tls_server}", tmp_path / "other.crt")
    assert not foreign.ok and "does not verify" in foreign.detail, foreign
    assert _superlink(f"localhost:{tls_server}", certs / "ca.crt").ok  # the certificate names localhost too
    for bad in ("no-port", "host:99999", ":443"):
        check = _superlink(bad, certs / "ca.crt")
        assert not check.ok and "expected HOST:PORT" in check.detail
    assert not _superlink(f"127.0.0.1:{tls_server}", None).ok
