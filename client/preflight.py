"""`fedst site check`: a partner's pre-join check, run before the first SuperNode start.

Each check answers in one line (ok / FAIL, and for a failure the fix in plain words) so that a partner can fix
everything a run would trip over (unreadable data, the wrong gene panel, a full disk, a firewall, a CA file that
is not the consortium's) before the operator's first run, where the same problems show only as an error category.
It reads the data exactly as `fedst data prepare` does and writes nothing: a plain JPEG/PNG image is converted
into a temporary folder that is removed afterwards. The SuperLink check opens a TCP connection and a TLS
handshake against the consortium CA and then closes it; it sends no Flower request, so it needs no registered key.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shared.errors import FedstError

CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Check:
    """The outcome of one check: its name, whether it passed, what was found and (on failure) what to do."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        head = f"{'ok' if self.ok else 'FAIL':<4}  {self.name}: {self.detail}"
        return head if self.ok or not self.fix else f"{head}\n      fix: {self.fix}"


@dataclass(frozen=True)
class Limits:
    """The thresholds a site must meet; the defaults suit the `base` preset on a hospital workstation."""

    min_spots: int = 100
    min_panel_overlap: float = 0.5
    min_free_gb: float = 5.0
    min_cpus: int = 2
    require_gpu: bool = False


def check_site(
    site_toml: Path,
    *,
    panel: Path | None = None,
    work_dir: Path | None = None,
    superlink: str | None = None,
    root_certificates: Path | None = None,
    private_key: Path | None = None,
    limits: Limits = Limits(),
) -> Iterator[Check]:
    """Run every check in order, yielding each result as soon as it is known (the slow data read comes first)."""
    site = None
    try:
        with tempfile.TemporaryDirectory(prefix="fedst-site-check-") as cache:
            from shared.ingest.site import load_site

            site = load_site(site_toml, cache_dir=cache)
        names = ", ".join(s.section_id for s in site.sections)
        yield Check("data", True, f"site {site.name}: {len(site.sections)} section(s) readable ({names})")
    except FedstError as exc:
        yield Check("data", False, str(exc), "correct the file or field named above (docs/data.md), then re-run")
    if site is not None:
        yield _spots(site, limits.min_spots)
        yield _panel(site, panel, limits.min_panel_overlap)
    yield _disk(work_dir or site_toml.parent, limits.min_free_gb)
    yield _cpus(limits.min_cpus)
    yield _gpu(limits.require_gpu)
    if private_key is not None:
        yield _key(private_key)
    if superlink is not None:
        yield _superlink(superlink, root_certificates)


def _spots(site, min_spots: int) -> Check:
    counts = {s.section_id: int(s.adata.n_obs) for s in site.sections}
    total = sum(counts.values())
    detail = f"{total} spots (" + ", ".join(f"{k} {v}" for k, v in counts.items()) + ")"
    if total < min_spots:
        return Check(
            "spots", False, f"{detail}, fewer than {min_spots}", "list all of the site's sections in SITE.toml"
        )
    return Check("spots", True, detail)


def _panel(site, panel: Path | None, min_overlap: float) -> Check:
    from shared.genes import GenePanel
    from shared.keys import GENE_IDS

    source = panel or site.panel_path
    if source is None:
        return Check(
            "panel",
            False,
            "no consortium panel given (neither --panel nor `panel` in SITE.toml)",
            'ask the operator for panel.txt and set `panel = "panel.txt"` in SITE.toml',
        )
    try:
        genes = GenePanel.read(source)
    except FedstError as exc:
        return Check("panel", False, str(exc), "ask the operator for the consortium's panel.txt again")
    measured = [False] * len(genes)
    empty = []
    for section in site.sections:
        var = section.adata.var
        ids = list(var[GENE_IDS].astype(str)) if GENE_IDS in var else None
        columns = genes.match(list(section.adata.var_names), ids)
        if not any(columns):
            empty.append(section.section_id)
        measured = [m or bool(c) for m, c in zip(measured, columns)]
    have = sum(measured)
    share = have / len(genes)
    detail = f"the site measures {have} of the panel's {len(genes)} genes ({share:.0%}; {Path(source).resolve()})"
    if empty:
        return Check(
            "panel",
            False,
            f"{detail}; section(s) {', '.join(empty)} measure none of them",
            "check the species and whether the sections name genes by symbol or Ensembl id (the panel uses "
            f"{', '.join(genes[:3])}, ...)",
        )
    if share < min_overlap:
        return Check(
            "panel",
            False,
            f"{detail}, below {min_overlap:.0%}",
            "make sure panel.txt is the consortium's current panel; if it is, tell the operator how many genes "
            "your assay covers",
        )
    return Check("panel", True, detail)


def _existing(path: Path) -> Path:
    """The nearest existing folder at or above ``path`` (the work dir may not exist before the first run)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _disk(work_dir: Path, min_free_gb: float) -> Check:
    where = _existing(work_dir)
    free_gb = shutil.disk_usage(where).free / 1e9
    detail = f"{free_gb:.1f} GB free at {where}"
    if free_gb < min_free_gb:
        return Check(
            "disk",
            False,
            f"{detail}, below {min_free_gb:g} GB",
            "free space or choose a work dir (--work-dir) on a larger disk: it holds the patch store and reports",
        )
    return Check("disk", True, detail)


def _cpus(min_cpus: int) -> Check:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if usable < min_cpus:
        return Check(
            "cpu",
            False,
            f"{usable} usable CPU core(s), fewer than {min_cpus}",
            "run the SuperNode on a machine (or container limit) with more cores",
        )
    return Check("cpu", True, f"{usable} usable CPU cores")


def _gpu(required: bool) -> Check:
    import torch

    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        return Check("gpu", True, f"CUDA available (torch {torch.__version__}): {names}")
    detail = f"no CUDA GPU visible to torch {torch.__version__}: training runs on the CPU (slower)"
    if required:
        return Check("gpu", False, detail, "install the NVIDIA driver and a CUDA build of torch, check nvidia-smi")
    return Check("gpu", True, detail)


def _key(path: Path) -> Check:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    remake = "make a new pair with deploy/make-node-key.sh and send the new .pub to the operator"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Check("key", False, f"{path}: cannot read ({exc.strerror})", remake)
    try:
        key = load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        return Check("key", False, f"{path}: not an unencrypted OpenSSH private key ({exc})", remake)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return Check("key", False, f"{path}: a {type(key).__name__}, Flower needs an ECDSA key", remake)
    if path.stat().st_mode & 0o077:
        return Check("key", False, f"{path}: readable by other users", f"chmod 600 {path}")
    return Check("key", True, f"{path}: ECDSA {key.curve.name} private key, mode 0600")


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedstError(f"--superlink {address!r}: expected HOST:PORT, e.g. fl.consortium.example:443")
    return host, int(port)


def _superlink(address: str, root_certificates: Path | None) -> Check:
    name = "superlink"
    try:
        host, port = _split_address(address)
    except FedstError as exc:
        return Check(name, False, str(exc), "use the address the operator gave you")
    if root_certificates is None:
        return Check(name, False, "no --root-certificates", "pass the consortium's ca.crt from the operator")
    try:
        context = ssl.create_default_context(cafile=str(root_certificates))
    except (OSError, ssl.SSLError) as exc:
        return Check(
            name, False, f"{root_certificates}: not a readable PEM certificate ({exc})", "ask the operator for ca.crt"
        )
    return _handshake(name, host, port, context)


def _handshake(name: str, host: str, port: int, context: ssl.SSLContext) -> Check:
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                version = tls.version()
    except OSError as exc:
        detail, fix = _connection_failure(exc, host, port)
        return Check(name, False, detail, fix)
    return Check(name, True, f"{host}:{port} reachable, {version} handshake verified against the consortium CA")


def _connection_failure(exc: OSError, host: str, port: int) -> tuple[str, str]:
    """What went wrong and what the partner does about it, in plain words (most specific error first)."""
    where = f"{host}:{port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: the server's certificate does not verify against this ca.crt ({exc.verify_message})",
            "get the current ca.crt from the operator; the host name must be one the server certificate names",
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {where} failed ({exc})", "check that the port is the SuperLink's TLS port"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host}", "check the host name and this machine's DNS"
    if isinstance(exc, ConnectionRefusedError):
        return (
            f"connection to {where} refused (nothing listens there)",
            "check the address and port with the operator; the SuperLink or its proxy may be down",
        )
    if isinstance(exc, TimeoutError):
        return (
            f"no answer from {where} within {CONNECT_TIMEOUT_S:g} s",
            "a firewall drops the connection: ask your IT to allow outgoing TCP to this host and port",
        )
    return f"cannot connect to {where} ({exc.strerror or exc})", "check the network route to the SuperLink"
