"""Inputs of imputation as AnnData pairs (ST spots x genes with obsm[SPATIAL]; reference cells x genes).

Readers for the ../shared/data/sc-spatial folders (CSV genes x cells with the symbol in the first column),
the BDTNP in-situ atlas (spatial side only) and generic .h5ad files.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared import keys
from shared.errors import FedstError, require

if TYPE_CHECKING:
    from anndata import AnnData

CELL_TYPE = "cell_type"
"""obs column of the reference cell types (scanpy convention)."""


def _read_genes_by_obs(path: Path) -> AnnData:
    """CSV genes x observations (symbol first column, observation ids in the header) -> AnnData obs x genes."""
    import anndata as ad
    import pandas as pd

    require(path.is_file(), f"{path}: not found; expected a CSV of genes x cells with symbols in column 1")
    try:
        table = pd.read_csv(path, index_col=0)
    except (ValueError, pd.errors.ParserError) as exc:
        raise FedstError(f"{path}: unreadable CSV ({exc})") from exc
    require(table.shape[0] > 0 and table.shape[1] > 0, f"{path}: empty table {table.shape}")
    try:
        x = table.to_numpy(dtype=np.float32).T
    except ValueError as exc:
        raise FedstError(f"{path}: non-numeric expression values ({exc})") from exc
    adata = ad.AnnData(X=x)
    adata.obs_names = [str(c) for c in table.columns]
    adata.var_names = [str(g) for g in table.index]
    return adata


def _read_named_column(path: Path, ids: list[str], what: str) -> np.ndarray:
    import pandas as pd

    table = pd.read_csv(path, index_col=0)
    table.index = table.index.astype(str)
    missing = [i for i in ids if i not in table.index]
    require(not missing, f"{path}: {len(missing)} of {len(ids)} {what} lack a row (e.g. {missing[:3]})")
    return table.loc[ids]


def load_sc_spatial(folder: str | Path) -> tuple[AnnData, AnnData]:
    """A spacexr-style folder (``spatial/{counts,coords}.csv``, ``reference/{counts,cell_types}.csv``)."""
    root = Path(folder)
    st = _read_genes_by_obs(root / "spatial" / "counts.csv")
    coords = _read_named_column(root / "spatial" / "coords.csv", list(st.obs_names), "spots")
    require(
        {"x", "y"} <= set(coords.columns),
        f"{root / 'spatial' / 'coords.csv'}: expected columns x, y; got {list(coords.columns)}",
    )
    st.obsm[keys.SPATIAL] = coords[["x", "y"]].to_numpy(dtype=np.float64)
    st.uns[keys.PROVENANCE] = {"format": "sc-spatial-csv", "source": str(root / "spatial")}
    sc = _read_genes_by_obs(root / "reference" / "counts.csv")
    types = root / "reference" / "cell_types.csv"
    if types.is_file():
        sc.obs[CELL_TYPE] = _read_named_column(types, list(sc.obs_names), "cells").iloc[:, 0].astype(str).to_numpy()
    sc.uns[keys.PROVENANCE] = {"format": "sc-spatial-csv", "source": str(root / "reference")}
    return st, sc


def load_bdtnp(folder: str | Path) -> AnnData:
    """The BDTNP Drosophila atlas: ``dge.txt`` (positions x genes) + ``geometry.txt`` (x y z, first rows).

    A spatial side only (it ships no scRNA reference); obsm[SPATIAL] holds (x, y), obsm['spatial_3d'] all three.
    """
    import anndata as ad
    import pandas as pd

    root = Path(folder)
    dge = pd.read_csv(root / "dge.txt", sep="\t")
    geometry = pd.read_csv(root / "geometry.txt", sep=" ")
    require(
        len(geometry) >= len(dge),
        f"{root / 'geometry.txt'}: {len(geometry)} rows, fewer than the {len(dge)} positions of dge.txt",
    )
    adata = ad.AnnData(X=dge.to_numpy(dtype=np.float32))
    adata.var_names = [str(g) for g in dge.columns]
    xyz = geometry.iloc[: len(dge)][["xcoord", "ycoord", "zcoord"]].to_numpy(dtype=np.float64)
    adata.obsm[keys.SPATIAL] = xyz[:, :2]
    adata.obsm["spatial_3d"] = xyz
    adata.uns[keys.PROVENANCE] = {"format": "bdtnp", "source": str(root)}
    return adata


def read_h5ad_checked(path: str | Path, what: str, need_spatial: bool) -> AnnData:
    """Read an .h5ad with errors that name the file; X must be raw (non-negative) expression."""
    import anndata as ad

    p = Path(path)
    require(p.is_file(), f"{p}: {what} not found; expected an .h5ad file")
    try:
        adata = ad.read_h5ad(p)
    except Exception as exc:  # h5py/anndata raise many types for a bad file
        raise FedstError(f"{p}: not a readable .h5ad ({type(exc).__name__}: {exc})") from exc
    require(
        adata.n_obs > 0 and adata.n_vars > 0,
        f"{p}: {what} is empty ({adata.n_obs} observations x {adata.n_vars} genes)",
    )
    if need_spatial:
        require(keys.SPATIAL in adata.obsm, f"{p}: {what} lacks obsm['{keys.SPATIAL}'] (spot coordinates)")
    return adata
