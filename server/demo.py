"""`fedst demo`: the whole consortium workflow as a Flower simulation on generated (or her2st) sites."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from server.results import load_results
from server.superlink import REPO, SuperLink
from shared.backends import create_backend
from shared.config import RunConfig
from shared.errors import FedstError
from shared.tomlio import write_toml

HER2ST_GROUPS = [["C2", "C3"], ["C4", "C5", "C6"]]  # sections with images; >= 2 per site (one is held out)
HER2ST_MPP = 0.72


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
                "mpp": HER2ST_MPP,
            }
            for section in group
        ]
        write_toml(site / "site.toml", {"site": f"her2st-{i}", "panel": "../panel.txt", "sections": sections})
    return out


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
    echo=print,
) -> Path:
    """Generate/point at the consortium, run the workflow as a Flower simulation, return the run directory."""
    out = out.absolute()
    run_name = f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    config = {
        "paths.out-dir": str(out / "runs"),
        "paths.run-name": run_name,
        "paths.sites-root": str(out / "sites" / run_name),
        "min-sites": min(2, sites),
        **(overrides or {}),
    }
    # A bad value, or a setting the chosen backend cannot honour, is an error before anything is generated/started.
    run = RunConfig.from_mapping(config)
    create_backend(run.backend, run)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    echo(f"[fedst demo] consortium ({preset}, {sites} sites) ...")
    config["paths.consortium"] = str(prepare_consortium(out, preset, sites, data))
    run_dir = Path(run.paths.out_dir) / run.paths.run_name
    echo(f"[fedst demo] starting a private Flower SuperLink (simulation runtime, FLWR_HOME={out / '.flwr'}) ...")
    with SuperLink(out / ".flwr", simulation=True, name="fedst-demo") as link:
        run_id = link.submit(REPO, config, federation_config=f"num_supernodes={sites} client_resources_num_cpus=1")
        echo(f"[fedst demo] run {run_id} submitted; progress (from {run_dir / 'results.json'}):")
        seen: set[str] = set()

        def progress(info: dict[str, Any]) -> None:
            for line in _progress_lines(run_dir / "results.json"):
                if line not in seen:
                    seen.add(line)
                    echo(f"  {line}")

        info = link.wait(run_id, timeout, on_poll=progress)
        progress(info)
        if info.get("status") != "finished:completed":
            tail = link.logs(run_id)[-3000:]
            raise FedstError(
                f"run {run_id} ended {info.get('status')}: "
                f"{tail.strip().splitlines()[-1] if tail.strip() else 'no log'} "
                f"(full log: FLWR_HOME={out / '.flwr'} flwr log {run_id} fedst-demo --show)"
            )
    echo(f"[fedst demo] finished in {time.perf_counter() - started:.0f} s")
    echo(f"[fedst demo] report: {run_dir / 'summary.md'}")
    echo(f"[fedst demo] site reports (stay on each site): {Path(run.paths.sites_root)}/<site>/report/report.md")
    return run_dir


def _progress_lines(path: Path) -> list[str]:
    """One line per finished round or broadcast phase, read through the schema (server/results.py).

    The run writes results.json after every round; before the first write (or if it cannot be read yet) there is
    nothing to show, and a file of another schema is a real error.
    """
    if not path.is_file():
        return []
    results = load_results(path)
    lines = []
    for phase, block in results.phases.items():
        if block.kind == "train":
            for row in block.rounds:
                loss = f", loss {row.aggregate['loss']:.4f}" if "loss" in row.aggregate else ""
                lines.append(f"{phase} round {row.round}: {len(row.sites)} sites{loss}")
        elif (row := block.last) is not None and row.sites:
            lines.append(
                f"{phase}: done on {len(row.sites)} sites" + (f", {len(row.failed)} failed" if row.failed else "")
            )
    if results.status in ("completed", "failed"):
        lines.append(f"status: {results.status}")
    return lines
