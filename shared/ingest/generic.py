"""Generic reader: any `.h5ad` with obsm['spatial'] (full-resolution pixels) + any image (`mpp` when the
image carries none). The HEST-1k reader is this one with the HEST conventions (see hest.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared import keys
from shared.errors import FedstError
from shared.ingest.section import Section, finish_section
from shared.ingest.slide import require_file, resolve_mpp

if TYPE_CHECKING:
    import anndata


def read_h5ad(path: Path) -> anndata.AnnData:
    """An AnnData from disk, or a FedstError naming the file when it is not a readable h5ad."""
    import anndata

    try:
        return anndata.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise OSError, KeyError, ValueError on broken files
        raise FedstError(f"{path}: unreadable or corrupt .h5ad ({type(exc).__name__}: {exc})") from None


def load_h5ad_section(
    h5ad: str | os.PathLike,
    image: str | os.PathLike,
    *,
    section_id: str | None = None,
    mpp: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    spatial_key: str = keys.SPATIAL,
    counts_layer: str | None = None,
    fmt: str = "h5ad",
    convert: bool = True,
) -> Section:
    """Read a section from an h5ad + image. Raw counts come from ``layers[counts_layer]`` when named, else
    from layers[keys.COUNTS] when present, else X. Coordinates must already be full-resolution pixels.
    ``convert=False``: every check, no conversion into the slide cache (see `finish_section`)."""
    path = require_file(h5ad, "an .h5ad with obsm['spatial']")
    adata = read_h5ad(path)
    if spatial_key not in adata.obsm:
        raise FedstError(
            f"{path}: no obsm[{spatial_key!r}] (expected spot centres in full-resolution pixels, x = column, "
            f"y = row; found obsm keys {sorted(adata.obsm.keys())})"
        )
    layer = counts_layer or (keys.COUNTS if keys.COUNTS in adata.layers else None)
    if counts_layer and counts_layer not in adata.layers:
        raise FedstError(f"{path}: no layers[{counts_layer!r}] (found layers {sorted(adata.layers.keys())})")
    import anndata

    counts = adata.layers[layer] if layer else adata.X
    if counts is None:
        raise FedstError(f"{path}: X is empty (expected a spots x genes count matrix)")
    # Annotations (labels, ground truth of generated data) travel with the spots into the store.
    clean = anndata.AnnData(X=counts, obs=adata.obs.copy(), var=adata.var[[]].copy())
    for key, value in adata.obsm.items():
        if key != spatial_key:
            clean.obsm[key] = value
    clean.obsm[keys.SPATIAL] = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    if keys.GENE_IDS in adata.var:
        clean.var[keys.GENE_IDS] = adata.var[keys.GENE_IDS].astype(str).to_numpy()
    clean.obs_names = adata.obs_names.astype(str)
    clean.var_names = adata.var_names.astype(str)
    clean.var_names_make_unique()
    image_path, value, origin = resolve_mpp(image, mpp)
    sid = section_id or path.stem
    provenance = {
        "format": fmt,
        "h5ad": path.resolve(),
        "counts": f"layers[{layer!r}]" if layer else "X",
        "mpp_source": origin,
    }
    return finish_section(sid, clean, image_path, value, provenance, str(path), cache_dir, convert)
