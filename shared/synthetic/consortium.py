"""Writing a synthetic consortium in the real on-disk formats (HEST-style h5ad + pyramidal TIFF + SITE.toml)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from shared import keys
from shared.errors import require
from shared.synthetic import model
from shared.synthetic.layout import make_layout, spot_mixtures
from shared.synthetic.render import render_section
from shared.tomlio import write_toml

log = logging.getLogger(__name__)

GENERATOR_VERSION = "fedst.synthetic/1"
PANEL_FILE = "panel.txt"


def sample_counts(
    rng: np.random.Generator, mixtures: np.ndarray, signatures: np.ndarray, effects: model.SiteEffects
) -> tuple[np.ndarray, np.ndarray]:
    """Counts ~ NB(mean = library * batch * mixture @ signatures, size = NB_DISPERSION). Returns (counts, mean)."""
    n = len(mixtures)
    library = model.LIBRARY_MEAN * np.exp(rng.normal(0.0, model.LIBRARY_LOG_SD, size=n))
    mean = library[:, None] * (mixtures @ signatures) * effects.gene_batch[None, :]
    theta = model.NB_DISPERSION
    rate = rng.gamma(shape=theta, scale=mean / theta)
    return rng.poisson(rate).astype(np.float32), mean


def generate_section(
    rng: np.random.Generator,
    section_id: str,
    signatures: np.ndarray,
    effects: model.SiteEffects,
    *,
    n_rows: int,
    n_cols: int,
    mpp: float,
) -> tuple[np.ndarray, object]:
    """One section: its RGB image and its AnnData (raw counts in X, obsm spatial, uns mpp, ground truth)."""
    import anndata as ad
    import pandas as pd

    layout = make_layout(rng, n_rows=n_rows, n_cols=n_cols, mpp=mpp, type_bias=effects.type_bias)
    rgb, n_nuclei = render_section(rng, layout, effects)
    mixtures = spot_mixtures(layout)
    counts, _ = sample_counts(rng, mixtures, signatures, effects)
    genes = model.source_genes()
    barcodes = [f"{section_id}-r{r:02d}c{c:02d}" for r, c in layout.array_rc]
    type_names = [t.name for t in model.CELL_TYPES]
    obs = pd.DataFrame(
        {
            "in_tissue": np.ones(len(barcodes), dtype=np.int64),
            "array_row": layout.array_rc[:, 0].astype(np.int64),
            "array_col": layout.array_rc[:, 1].astype(np.int64),
            model.TYPE_LABEL: pd.Categorical([type_names[i] for i in mixtures.argmax(axis=1)], categories=type_names),
        },
        index=pd.Index(barcodes, name=None),
    )
    var = pd.DataFrame({keys.GENE_IDS: [f"SYNG{i:011d}" for i in range(len(genes))]}, index=pd.Index(genes))
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.obsm[keys.SPATIAL] = layout.spots.astype(np.float64)
    adata.obsm[model.TYPE_MIXTURE] = mixtures.astype(np.float32)
    adata.uns[keys.MPP] = float(mpp)
    adata.uns[keys.PROVENANCE] = {"format": "synthetic", "generator": GENERATOR_VERSION, "section": section_id}
    adata.uns[model.GROUND_TRUTH] = {
        "types": type_names,
        "nuclei": int(n_nuclei),
        "image_px": [layout.height, layout.width],
    }
    return rgb, adata


def _site_table(site: str, sections: list[str]) -> dict[str, Any]:
    """The SITE.toml of a generated site: its sections in HEST format, paths relative to the site folder."""
    return {
        "site": site,
        "panel": f"../{PANEL_FILE}",
        "sections": [
            {"id": section, "format": "hest", "h5ad": f"{section}.h5ad", "image": f"{section}.tif"}
            for section in sections
        ],
    }


def generate_consortium(
    out: str | os.PathLike,
    n_sites: int = 3,
    seed: int = 0,
    sections_per_site: int = 2,
    *,
    grid: tuple[int, int] = (17, 15),
    mpp: float = 1.0,
) -> Path:
    """Write ``n_sites`` sites of synthetic data under ``out`` and return ``out``.

    Layout: ``out/panel.txt`` (48 genes), ``out/site-<i>/site.toml`` and per section ``<id>.h5ad`` (raw counts
    over 64 genes, obsm spatial in full-resolution px, uns mpp, ground-truth type mixtures) + ``<id>.tif``
    (JPEG pyramidal TIFF, ``mpp`` um/px). Same seed => byte-identical files. Grid = (rows, columns) of the
    candidate hex grid before the tissue outline removes spots (17 x 15 gives ~180-230 spots).
    """
    from shared.genes import GenePanel
    from shared.ingest.slide import write_pyramidal_tiff

    require(n_sites >= 1, f"generate_consortium: n_sites must be >= 1, got {n_sites}")
    require(sections_per_site >= 1, f"generate_consortium: sections_per_site must be >= 1, got {sections_per_site}")
    require(min(grid) >= 2, f"generate_consortium: grid must be at least 2 x 2, got {grid}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    GenePanel(model.panel_genes(), source="synthetic").write(root / PANEL_FILE)
    # one stream for the consortium-wide biology, then an independent stream per site and per section
    seeds = np.random.SeedSequence(seed)
    biology_seed, *site_seeds = seeds.spawn(1 + n_sites)
    signatures = model.expression_signatures(np.random.default_rng(biology_seed))
    for i, site_seed in enumerate(site_seeds):
        site = f"site-{i}"
        site_dir = root / site
        site_dir.mkdir(exist_ok=True)
        effects_seed, *section_seeds = site_seed.spawn(1 + sections_per_site)
        effects = model.site_effects(np.random.default_rng(effects_seed))
        sections = [f"S{i}{chr(ord('A') + j)}" if j < 26 else f"S{i}_{j}" for j in range(sections_per_site)]
        for section, section_seed in zip(sections, section_seeds):
            rgb, adata = generate_section(
                np.random.default_rng(section_seed),
                section,
                signatures,
                effects,
                n_rows=grid[0],
                n_cols=grid[1],
                mpp=mpp,
            )
            adata.uns[keys.PROVENANCE]["site"] = site
            adata.uns[keys.PROVENANCE]["seed"] = int(seed)
            adata.uns[model.GROUND_TRUTH]["site_effects"] = effects.as_dict()
            adata.uns[model.GROUND_TRUTH]["signatures"] = signatures.astype(np.float32)
            write_pyramidal_tiff(site_dir / f"{section}.tif", rgb, mpp)
            _write_h5ad(adata, site_dir / f"{section}.h5ad")
        write_toml(site_dir / "site.toml", _site_table(site, sections))
        log.info("synthetic %s: %d sections written to %s", site, len(sections), site_dir)
    return root


def _write_h5ad(adata, path: Path) -> None:
    """Write atomically (temp name + rename) so a crash never leaves a truncated h5ad."""
    tmp = path.with_name(f".{path.name}.tmp")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
