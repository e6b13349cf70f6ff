"""`fedst drift` (heat-kernel smoothing of an h5ad) and `fedst evaluate` (all metrics of a prediction)."""

from __future__ import annotations

from pathlib import Path

import typer


def _read_h5ad(path: Path, what: str):
    import anndata

    from shared.errors import FedstError

    if not path.is_file():
        raise FedstError(f"{what}: file not found: {path}")
    try:
        return anndata.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for a non-h5ad file
        raise FedstError(f"{what}: {path} is not a readable .h5ad file ({type(exc).__name__}: {exc})") from exc


def drift(
    input: Path = typer.Argument(..., help="Input .h5ad (obsm['spatial'] required; obs['section'] splits the graph)."),
    out: Path = typer.Option(..., "--out", help="Output .h5ad."),
    t: float = typer.Option(2.0, "--t", help="Diffusion time."),
    k: int = typer.Option(3, "--k", help="Neighbour parameter (threshold: k*N-th distance; knn: k neighbours)."),
    graph: str = typer.Option("threshold", "--graph", help="threshold | knn | radius"),
    radius: float | None = typer.Option(None, "--radius", help="Radius of the radius graph (coordinate units)."),
    laplacian: str = typer.Option("unnormalised", "--laplacian", help="unnormalised | normalised"),
    embedding: str | None = typer.Option(
        None, "--embedding", help="Diffuse obsm[KEY] into obsm[KEY_drift] instead of X."
    ),
    method: str = typer.Option("chebyshev", "--method", help="chebyshev | expm_multiply | dense (parity, small N)"),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32 | float64 of the smoothed values (default: X's own float width)."
    ),
) -> None:
    """Smooth expression (or an embedding) with DRIFT's heat kernel exp(-tL) over the spatial graph."""
    import math

    import numpy as np

    from shared import keys
    from shared.downstream.drift import drift_adata
    from shared.errors import FedstError, require
    from shared.io import write_h5ad_atomic

    require(math.isfinite(t) and t >= 0, f"--t: expected a finite diffusion time >= 0, got {t}")
    require(k >= 1, f"--k: expected an integer >= 1, got {k}")
    require(
        radius is None or (math.isfinite(radius) and radius > 0), f"--radius: expected a distance > 0, got {radius}"
    )
    require(graph in ("threshold", "knn", "radius"), f"--graph: expected threshold, knn or radius, got {graph!r}")
    require(
        laplacian in ("unnormalised", "normalised"),
        f"--laplacian: expected unnormalised or normalised, got {laplacian!r}",
    )
    require(dtype in (None, "float32", "float64"), f"--dtype: expected float32 or float64, got {dtype!r}")
    adata = _read_h5ad(input, "input")
    require(adata.n_obs > 0, f"{input}: no spots (expected at least one spot to smooth over the spatial graph)")
    if dtype == "float64" and embedding is None:  # float32 X would come back float32: widen it first
        adata.X = adata.X.astype(np.float64)
    try:
        result = drift_adata(
            adata,
            t=t,
            k=k,
            graph=graph,
            radius=radius,
            laplacian_kind=laplacian,
            embedding=embedding,
            method=method,  # type: ignore[arg-type]
        )
    except FedstError as exc:  # the library's messages name the field; here they also name the file
        raise FedstError(f"{input}: {exc}") from None
    if dtype is not None:  # the heat kernel computes in float64; this is only the width that is stored
        if embedding is None:
            result.X = result.X.astype(dtype)
        else:
            result.obsm[f"{embedding}_drift"] = np.asarray(result.obsm[f"{embedding}_drift"], dtype=dtype)
        result.uns[keys.DRIFT]["dtype"] = dtype
    write_h5ad_atomic(result, out)
    info = result.uns[keys.DRIFT]
    typer.echo(
        f"drift: {adata.n_obs} spots, {info['n_edges']} edges, {info['n_isolated']} isolated, "
        f"t={t}, graph={graph} -> {out}"
    )


def evaluate(
    pred: Path = typer.Argument(..., help="Prediction .h5ad (layers['predicted'] if present, else X)."),
    truth: Path | None = typer.Argument(
        None,
        help="Truth .h5ad (X; obsm['spatial'] for SSC). Default: the prediction's own layers['log1p_norm'] "
        "(masked by layers['measured']), which `fedst predict` stores when its input measured expression.",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write all metrics (incl. per gene) as JSON."),
    top_k: int = typer.Option(50, "--top-k", help="k of pcc_top_k."),
) -> None:
    """Compare a prediction with the truth (spots and genes paired by name) and print every metric, with the
    per-slide and the HEST-Benchmark PCC labelled side by side."""

    from shared.downstream.metrics import evaluate_anndata

    truth_adata = None if truth is None else _read_h5ad(truth, "truth")
    result = evaluate_anndata(_read_h5ad(pred, "prediction"), truth_adata, top_k=top_k)
    if truth is not None:
        result["truth"] = str(truth)
    for key, value in result.items():
        if key in ("per_gene", "protocols"):
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        typer.echo(f"{key:<24} {shown}")
    for name, entry in result["protocols"].items():
        typer.echo(f"protocol {name:<15} PCC {entry['pcc']:.4f}  ({entry['metric']}: {entry['description']})")
    if json_out is not None:
        from shared.io import write_json_atomic

        write_json_atomic(json_out, result)
        typer.echo(f"metrics written to {json_out}")


def register(app: typer.Typer) -> None:
    """Add `drift` and `evaluate` to the top-level app."""
    app.command("drift")(drift)
    app.command("evaluate")(evaluate)
