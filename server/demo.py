"""`fedst demo`: the whole consortium workflow as a Flower simulation on generated (or her2st) sites."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from server.headline import HEADLINE_FILE, headline_markdown
from server.progress import LiveView, PlainLines, RunProgress
from server.superlink import REPO, SuperLink
from shared.backends import create_backend
from shared.config import RunConfig
from shared.errors import FedstError
from shared.tomlio import write_toml

HER2ST_GROUPS = [["C2", "C3"], ["C4", "C5", "C6"]]  # sections with images; >= 2 per site (one is held out)
DEMO_ADAPTATION = {"adapt.federated": True, "adapt.rounds": 2, "adapt.steps": 125}
"""The demo adapts federatedly (the consortium panel is known: it generated it): the modulation is averaged
across sites, so the data-limited site learns the gene -> morphology mapping from every site's pairs; the same
250 steps per site as the run config's local default."""
POLL_SECONDS = 1.0  # the display reads results.json and the sites' progress.json this often (no process)
STATUS_SECONDS = 30.0  # and asks Flower (`flwr ls`, a process) this often, or when results.json says it ended


def simulation_resources(sites: int, cpus: int | None = None) -> str:
    """Flower's federation config giving every simulated site a Ray actor at once, with an equal share of the cores.

    Ray runs as many ClientApps at a time as it has CPUs for. With its default (the machine's cores) and one CPU
    per site, 3 sites on 2 cores ran in two waves and the third site trained alone on one core, the other idle.
    Three single-threaded sites on 2 cores keep both busy (2 sites: 3.73 training steps/s together, 3 sites:
    3.81), so Ray is told there are at least as many CPUs as sites; each actor's torch uses its share
    (Ray sets OMP_NUM_THREADS to the actor's CPUs).
    """
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    per_site = max(1, cpus // sites)
    ray_cpus = max(cpus, per_site * sites)
    return f"num_supernodes={sites} client_resources_num_cpus={per_site} init_args_num_cpus={ray_cpus}"


def her2st_consortium(data: Path, out: Path, n_sites: int) -> Path:
    """SITE.toml files grouping the real her2st sections with images into sites; panel = HisToGene's genes."""
    import numpy as np

    if n_sites != len(HER2ST_GROUPS):
        raise FedstError(
            f"--preset her2st has {len(HER2ST_GROUPS)} sites (sections C2-C6 "
            f"grouped so each site can hold one out); got --sites {n_sites}"
        )
    for sub in ("counts", "spots", "images"):
        if not (data / sub).is_dir():
            raise FedstError(f"her2st data: {data / sub} is missing (expected ../shared/data/her2st)")
    out.mkdir(parents=True, exist_ok=True)
    genes = [str(g) for g in np.load(data / "histogene_genes.npy", allow_pickle=True)]
    (out / "panel.txt").write_text("\n".join(genes) + "\n")
    for i, group in enumerate(HER2ST_GROUPS):
        site = out / f"site-{i}"
        site.mkdir(exist_ok=True)
        sections = [
            {
                "id": section,
                "format": "legacy-st",
                "counts": data / "counts" / f"{section}.tsv.gz",
                "spots": data / "spots" / f"{section}_selection.tsv",
                "image": data / "images" / f"{section}.jpg",
            }
            for section in group
        ]
        write_toml(site / "site.toml", {"site": f"her2st-{i}", "panel": "../panel.txt", "sections": sections})
    return out


def limit_first_site(consortium: Path, fraction: float) -> None:
    """Declare (or clear, at 1.0) the first site's ``labelled-fraction`` in its SITE.toml."""
    from shared.config.node import LABELLED_FRACTION
    from shared.ingest.site import read_toml

    path = consortium / "site-0" / "site.toml"
    doc = read_toml(path)
    doc.pop(LABELLED_FRACTION, None)
    if fraction < 1.0:
        doc = {LABELLED_FRACTION: float(fraction), **doc}
    write_toml(path, doc)


def prepare_consortium(out: Path, preset: str, n_sites: int, data: Path | None) -> Path:
    if preset == "synthetic":
        consortium = out / "consortium"
        if not (consortium / "panel.txt").is_file() or len(list(consortium.glob("site-*/site.toml"))) != n_sites:
            from shared.synthetic import generate_consortium

            generate_consortium(consortium, n_sites=n_sites, seed=0)
        return consortium
    if preset == "her2st":
        return her2st_consortium(data or REPO.parent / "shared" / "data" / "her2st", out / "consortium-her2st", n_sites)
    raise FedstError(f"--preset {preset!r}: expected synthetic or her2st")


def run_demo(
    out: Path,
    *,
    sites: int = 3,
    preset: str = "synthetic",
    overrides: dict[str, Any] | None = None,
    timeout: float = 3600.0,
    data: Path | None = None,
    labelled_fraction: float = 1.0,
    echo=print,
    live: bool = False,
) -> Path:
    """Generate/point at the consortium, run the workflow as a Flower simulation, return the run directory.

    ``labelled_fraction`` < 1 makes the first site the consortium's data-limited site: it uses only that share
    of its training spots' expression (SITE.toml ``labelled-fraction``), the others keep all of theirs.
    Progress (server/progress.py): with ``live`` (a terminal) a rich display of the phase, each site's steps,
    the elapsed time and an ETA; else plain lines through ``echo``, as for a log.
    """
    if not 0.0 < labelled_fraction <= 1.0:
        raise FedstError(f"--labelled-fraction is {labelled_fraction:g}; expected a fraction in (0, 1]")
    out = out.absolute()
    run_name = f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = {
        "paths.out-dir": str(out / "runs"),
        "paths.run-name": run_name,
        "paths.sites-root": str(out / "sites" / run_name),
        "min-sites": min(2, sites),
        **DEMO_ADAPTATION,
        **(overrides or {}),
    }
    # A bad value, or a setting the chosen backend cannot honour, is an error before anything is generated/started.
    run = RunConfig.from_mapping(config)
    create_backend(run.backend, run)
    out.mkdir(parents=True, exist_ok=True)
    started, started_at = time.perf_counter(), time.time()
    echo(f"[fedst demo] consortium ({preset}, {sites} sites) ...")
    consortium = prepare_consortium(out, preset, sites, data)
    limit_first_site(consortium, labelled_fraction)
    config["paths.consortium"] = str(consortium)
    run_dir = Path(run.paths.out_dir) / run.paths.run_name
    echo(f"[fedst demo] starting a private Flower SuperLink (simulation runtime, FLWR_HOME={out / '.flwr'}) ...")
    with SuperLink(out / ".flwr", simulation=True, name="fedst-demo") as link:
        run_id = link.submit(REPO, config, federation_config=simulation_resources(sites))
        echo(
            f"[fedst demo] run {run_id} submitted; progress (from {run_dir / 'results.json'} and the sites' "
            f"{Path(run.paths.sites_root)}/<site>/progress.json):"
        )
        watcher = RunProgress(run, run_dir, Path(run.paths.sites_root), sites, started=started_at)
        with LiveView() if live else PlainLines(echo) as view:

            def watch() -> bool:
                snapshot = watcher.poll()
                view.show(snapshot)
                return snapshot.finished

            info = link.follow(run_id, timeout, watch, interval=POLL_SECONDS, status_every=STATUS_SECONDS)
            watch()
        if info.get("status") != "finished:completed":
            tail = link.logs(run_id)[-3000:]
            raise FedstError(
                f"run {run_id} ended {info.get('status')}: "
                f"{tail.strip().splitlines()[-1] if tail.strip() else 'no log'} "
                f"(full log: FLWR_HOME={out / '.flwr'} flwr log {run_id} fedst-demo --show)"
            )
    echo(f"[fedst demo] finished in {time.perf_counter() - started:.0f} s")
    if (found := headline_of(run_dir)) is not None:
        echo("")
        for line in headline_markdown(found):
            echo(line.replace("**", ""))
        echo(f"[fedst demo] headline: {run_dir / HEADLINE_FILE}")
    echo(f"[fedst demo] report: {run_dir / 'summary.md'}")
    echo(f"[fedst demo] site reports (stay on each site): {Path(run.paths.sites_root)}/<site>/report/report.md")
    return run_dir


def headline_of(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / HEADLINE_FILE
    return json.loads(path.read_text()) if path.is_file() else None
