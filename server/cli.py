"""`fedst demo` and `fedst federation ...`: the main job and helpers around a Flower federation."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

federation_app = typer.Typer(help="Inspect federated runs.", no_args_is_help=True, add_completion=False)


def demo(
    sites: int = typer.Option(0, "--sites", min=0, help="number of simulated sites (0: 3, or 2 with --preset her2st)"),
    out: Path = typer.Option(Path("fedst-demo"), "--out", help="folder for the consortium, runs and site work dirs"),
    preset: str = typer.Option(
        "synthetic", "--preset", help="synthetic (generated consortium) | her2st (../shared/data)"
    ),
    backend: str = typer.Option("c2l", "--backend", help="c2l (the real workflow) | toy (tiny CNN, seconds)"),
    rounds: int = typer.Option(0, "--rounds", help="pretraining rounds (0: run config default)"),
    strategy: str = typer.Option(
        "", "--strategy", help="fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg (empty: run config default)"
    ),
    dp_epsilon: float = typer.Option(
        0.0,
        "--dp-epsilon",
        min=0.0,
        help="DP-SGD target epsilon of each site's adaptation (0: DP off; the epsilon spent is reported per site)",
    ),
    labelled_fraction: float = typer.Option(
        0.25,
        "--labelled-fraction",
        help="share of the first site's training spots that keep their expression: the data-limited site "
        "(1: every site fully labelled)",
    ),
    seed: int = typer.Option(-1, "--seed", help="run seed (-1: run config default)"),
    timeout: float = typer.Option(3600.0, "--timeout", help="seconds before the run is stopped"),
) -> None:
    """Run the whole consortium workflow (pretrain, adapt, synthesize, downstream) as a Flower simulation."""
    from server.demo import HER2ST_GROUPS, run_demo

    sites = sites or (len(HER2ST_GROUPS) if preset == "her2st" else 3)
    overrides: dict = {"backend": backend}
    if rounds:
        overrides["pretrain.rounds"] = rounds
    if strategy:
        overrides["aggregation.strategy"] = strategy
    if dp_epsilon:
        overrides["dp.epsilon"] = dp_epsilon
    if seed >= 0:
        overrides["seed"] = seed
    if preset == "her2st":
        overrides.setdefault("patch-px", 32)
    run_demo(
        out,
        sites=sites,
        preset=preset,
        overrides=overrides,
        timeout=timeout,
        labelled_fraction=labelled_fraction,
        echo=typer.echo,
        live=sys.stdout.isatty(),  # a terminal gets the rich progress display, a log plain lines
    )


@federation_app.command("status")
def status(run_dir: Path = typer.Argument(..., help="a run directory (holds results.json)")) -> None:
    """Summarise a run directory: status, phases, rounds, per-site metrics, failures."""
    from server.results import load_results

    results = load_results(run_dir / "results.json")
    typer.echo(f"run {results.run}: {results.status}" + (f" ({results.error})" if results.error else ""))
    for phase, block in results.phases.items():
        rounds = len(block.rounds) if block.kind == "train" else 0
        typer.echo(f"  {phase}: {rounds} rounds" if rounds else f"  {phase}")
        if (row := block.last) is None:
            continue
        for site, metrics in sorted(row.sites.items()):
            typer.echo(f"    {site}: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
        for site, why in row.excluded().items():
            typer.echo(f"    {site} FAILED: {why}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("demo")(demo)
    app.add_typer(federation_app, name="federation")
