"""`fedst data ...`: inspect site data, prepare a site's patch store, generate a synthetic consortium."""

from pathlib import Path

import typer

app = typer.Typer(help="Prepare, inspect and generate site data.", no_args_is_help=True)


@app.command()
def inspect(
    path: Path = typer.Argument(
        ...,
        help="A slide (SVS, TIFF, JPEG, PNG), a section (.h5ad or Space Ranger "
        "folder), a SITE.toml or a patch store directory.",
    ),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    mpp: float | None = typer.Option(None, "--mpp", help="Microns per pixel for images that carry none."),
) -> None:
    """Describe PATH: size, pyramid levels and mpp of a slide; spots/genes per section; a store's contents."""
    import json

    from shared.inspect import describe_path, format_description

    info = describe_path(path, mpp=mpp)
    typer.echo(json.dumps(info, indent=2, default=str) if json_out else format_description(info))


@app.command()
def prepare(
    site_toml: Path = typer.Argument(..., help="SITE.toml listing the site's sections."),
    out: Path = typer.Option(..., "--out", help="Store directory to write (atomic; a no-op when up to date)."),
    panel: Path | None = typer.Option(
        None, "--panel", help="Consortium gene panel, one symbol per line (default: the SITE.toml's `panel`)."
    ),
    patch_px: int = typer.Option(64, "--patch-px", help="Patch side in pixels."),
    field_um: float = typer.Option(112.0, "--field-um", help="Patch field of view in microns."),
    mpp: float | None = typer.Option(
        None,
        "--mpp",
        help="Microns per pixel for sections whose image carries none and whose SITE.toml entry gives none.",
    ),
    tile_px: int | None = typer.Option(None, "--tile-px", help="Tissue tile side in pixels (default: patch px)."),
    max_tiles: int | None = typer.Option(None, "--max-tiles", help="Most unlabeled tiles per section."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    cache_dir: Path | None = typer.Option(
        None,
        "--cache-dir",
        help="Where plain JPEG/PNG images are converted "
        "to pyramidal TIFF once (default: $FEDST_CACHE/slides or "
        "~/.cache/fedst/slides).",
    ),
) -> None:
    """Build a site's patch store: spot-centred patches, tissue tiles and expression on the panel."""
    from shared.store.prepare import prepare_store

    kwargs = {
        "panel": panel,
        "patch_px": patch_px,
        "field_um": field_um,
        "tile_px": tile_px,
        "mpp": mpp,
        "progress": progress,
        "cache_dir": cache_dir,
    }
    if max_tiles is not None:
        kwargs["max_tiles_per_section"] = max_tiles
    store = prepare_store(site_toml, out, **kwargs)
    typer.echo(
        f"store {store.path}: {store.n_spots} spots, {len(store.panel)} genes, {store.n_tiles} tiles, "
        f"{store.patch_px} px, sections {', '.join(store.sections)}"
    )


@app.command()
def synthetic(
    sites: int = typer.Option(3, "--sites", min=1, help="Number of sites."),
    out: Path = typer.Option(..., "--out", help="Output directory (panel.txt, site-<i>/site.toml, ...)."),
    seed: int = typer.Option(0, "--seed", help="Random seed (output is deterministic by seed)."),
) -> None:
    """Generate a synthetic consortium in the real on-disk formats (pyramidal TIFF + h5ad + SITE.toml)."""
    from shared.synthetic import generate_consortium

    root = generate_consortium(out, n_sites=sites, seed=seed)
    typer.echo(f"synthetic consortium: {root} ({sites} sites, seed {seed})")


def register(root: typer.Typer) -> None:
    """Add `fedst data ...` to the top-level app."""
    root.add_typer(app, name="data")
