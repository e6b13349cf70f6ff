"""`fedst experiment CONFIG.toml`: local vs federated (C2L-ST synthesis) vs pooled, across spot fractions."""

from pathlib import Path
from typing import List

import typer


def experiment(
    config: str = typer.Argument(..., help="CONFIG.toml, or a shipped config name: synthetic, her2st."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: experiments/<config name>)."),
    resume: bool = typer.Option(
        True,
        "--resume/--fresh",
        help="Continue a previous run in --out (default), or discard its cells and start over.",
    ),
    overrides: List[str] | None = typer.Option(
        None,
        "--set",
        help="Override a config value, KEY=VALUE in "
        "TOML syntax (repeatable), e.g. --set seeds=[0] --set run.adapt.steps=20.",
    ),
    max_cells: int | None = typer.Option(
        None, "--max-cells", min=0, help="Stop after running this many cells (the rest run on the next --resume)."
    ),
) -> None:
    """Run the experiment grid (arm x DP x spot fraction x seed), resumable cell by cell, and write
    results.json, report.md and PNG figures."""
    from server.experiment.config import load_config
    from server.experiment.runner import run_experiment

    settings = load_config(config, list(overrides or []))
    target = out if out is not None else Path("experiments") / settings.name
    typer.echo(
        f"experiment {settings.name}: {len(settings.sites)} sites, arms {', '.join(settings.arms)}, "
        f"fractions {list(settings.fractions)}, seeds {list(settings.seeds)} -> {target}"
    )
    report = run_experiment(settings, target, resume=resume, log=lambda line: typer.echo(line), limit=max_cells)
    typer.echo(f"report: {report}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("experiment")(experiment)
