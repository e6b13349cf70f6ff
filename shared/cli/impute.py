"""`fedst impute`: SpaDiT imputation of unmeasured spatial genes from a scRNA-seq reference."""

from pathlib import Path

import typer


def impute(
    spatial: Path = typer.Option(
        ...,
        "--spatial",
        help="ST .h5ad (spots x genes, raw counts, obsm['spatial']) or a folder with counts.csv (genes x "
        "spots, symbol first) + coords.csv (x, y), e.g. ../shared/data/sc-spatial/PAIR/spatial.",
    ),
    reference: Path = typer.Option(
        ...,
        "--reference",
        help="scRNA-seq reference .h5ad (cells x genes, counts) or a folder with counts.csv (genes x cells) "
        "[+ cell_types.csv], e.g. ../shared/data/sc-spatial/PAIR/reference.",
    ),
    out: Path = typer.Option(..., "--out", help="Output .h5ad of the imputed genes (+ .metrics.json, .png)."),
    genes: str | None = typer.Option(None, "--genes", help="Comma-separated genes to impute (from the reference)."),
    holdout_fraction: float | None = typer.Option(
        None, "--holdout-fraction", help="Instead of --genes: hold out this fraction of the shared genes."
    ),
    preset: str = typer.Option("tiny", "--preset", help="Model size: tiny (CPU) or base."),
    epochs: int | None = typer.Option(None, "--epochs", help="Training epochs (default: per preset)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the gene split, training and sampling noise."),
    neighbors: int = typer.Option(10, "--neighbors", help="k of the kNN baseline (cells averaged per spot)."),
    steps: int = typer.Option(50, "--steps", help="DDIM sampling steps."),
    samples: int = typer.Option(4, "--samples", help="Independent draws averaged per gene."),
    save_model: Path | None = typer.Option(None, "--save-model", help="Directory for config.json + weights."),
) -> None:
    """Impute genes on the spatial spots with SpaDiT and the kNN baseline; score both where truth exists."""
    import logging

    from shared.errors import FedstError

    if (genes is None) == (holdout_fraction is None):
        raise FedstError("give exactly one of --genes GENE,... or --holdout-fraction F")
    targets = [g.strip() for g in genes.split(",") if g.strip()] if genes is not None else None
    if targets is not None and not targets:
        raise FedstError("--genes is empty; expected comma-separated gene symbols")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from shared.downstream.spadit.loaders import read_input
    from shared.downstream.spadit.output import write_result
    from shared.downstream.spadit.pipeline import run_imputation

    st = read_input(spatial, "spatial input", need_spatial=True)
    sc = read_input(reference, "reference input", need_spatial=False)
    result = run_imputation(
        st,
        sc,
        genes=targets,
        holdout_fraction=holdout_fraction,
        preset=preset,
        epochs=epochs,
        seed=seed,
        k=neighbors,
        steps=steps,
        n_samples=samples,
    )
    written = write_result(result, st, out)
    if save_model is not None:
        result.model.save_pretrained(save_model)
        written["model"] = save_model
    for method, values in result.metrics.items():
        typer.echo(f"{method:7s} " + "  ".join(f"{k}={v:.4f}" for k, v in values.items()))
    for kind, path in written.items():
        typer.echo(f"wrote {kind}: {path}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level app."""
    app.command("impute")(impute)
