"""`fedst site ...`: what a partner runs at their site before (and besides) the SuperNode."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Partner-site commands.", no_args_is_help=True, add_completion=False)


@app.command()
def check(
    site_toml: Path = typer.Argument(..., help="the site's SITE.toml (the SuperNode's data-path)"),
    panel: Path | None = typer.Option(
        None, "--panel", help="the consortium's panel.txt from the operator (default: the SITE.toml's `panel`)"
    ),
    work_dir: Path | None = typer.Option(
        None, "--work-dir", help="the SuperNode's work dir, for the free-disk check (default: the SITE.toml's folder)"
    ),
    superlink: str | None = typer.Option(
        None, "--superlink", help="HOST:PORT of the SuperLink (the address given to start-supernode.sh)"
    ),
    root_certificates: Path | None = typer.Option(
        None, "--root-certificates", help="the consortium's ca.crt (needed with --superlink)"
    ),
    key: Path | None = typer.Option(None, "--key", help="this site's SuperNode private key (make-node-key.sh)"),
    min_spots: int = typer.Option(100, "--min-spots", min=0, help="fewest spots the site must have"),
    min_panel_overlap: float = typer.Option(
        0.5, "--min-panel-overlap", min=0.0, max=1.0, help="smallest share of the panel's genes the site must measure"
    ),
    min_free_gb: float = typer.Option(5.0, "--min-free-gb", min=0.0, help="least free disk at the work dir, in GB"),
    min_cpus: int = typer.Option(2, "--min-cpus", min=1, help="fewest usable CPU cores"),
    require_gpu: bool = typer.Option(False, "--require-gpu", help="fail when torch sees no CUDA GPU"),
) -> None:
    """Check that this site is ready to join: data readable, spots, panel overlap, disk, CPU/GPU, key, SuperLink.

    One line per check (ok / FAIL with the fix); exit 0 when all pass, 2 otherwise. Writes nothing and sends no
    Flower request (the SuperLink check is a TCP connection and a TLS handshake against ca.crt).
    """
    from client.preflight import Limits, check_site

    limits = Limits(
        min_spots=min_spots,
        min_panel_overlap=min_panel_overlap,
        min_free_gb=min_free_gb,
        min_cpus=min_cpus,
        require_gpu=require_gpu,
    )
    results = []
    for result in check_site(
        site_toml,
        panel=panel,
        work_dir=work_dir,
        superlink=superlink,
        root_certificates=root_certificates,
        private_key=key,
        limits=limits,
    ):
        typer.echo(result.line())
        results.append(result)
    failed = [r.name for r in results if not r.ok]
    if failed:
        typer.echo(f"{len(failed)} of {len(results)} checks failed ({', '.join(failed)}): fix them and run again")
        raise typer.Exit(2)
    typer.echo(f"all {len(results)} checks passed")


@app.command()
def worker(
    socket_path: Path = typer.Option(
        ..., "--socket", help="the Unix socket to listen on; give the same path as node config 'worker-socket'"
    ),
) -> None:
    """Run this site's worker: a long-lived process that runs the phases for the SuperNode's ClientApps.

    torch, the C2L code and the store are loaded once instead of in a fresh process per Flower message. Only
    processes of this user can connect (the socket's folder is made 0700, the socket 0600, and each peer's uid
    is checked). deploy/start-supernode.sh starts it; stop it with SIGTERM or Ctrl-C.
    """
    from client.worker import run_worker

    try:
        run_worker(socket_path, echo=typer.echo)
    except (OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def register(root: typer.Typer) -> None:
    """Add `fedst site ...` to the top-level app."""
    root.add_typer(app, name="site")
