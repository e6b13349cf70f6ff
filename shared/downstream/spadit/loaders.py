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

    require(path.is_file(), f"{path}: not found; expected a CSV with one row per {what[:-1]} id")
    try:
        table = pd.read_csv(path, index_col=0)
    except (ValueError, pd.errors.ParserError) as exc:
        raise FedstError(f"{path}: unreadable CSV ({exc})") from exc
    table.index = table.index.astype(str)
    missing = [i for i in ids if i not in table.index]
    require(not missing, f"{path}: {len(missing)} of {len(ids)} {what} lack a row (e.g. {missing[:3]})")
    return table.loc[ids]


def load_spatial_csv(folder: str | Path) -> AnnData:
    """The spatial half of an sc-spatial pair: ``counts.csv`` (genes x spots) + ``coords.csv`` (x, y per spot)."""
    root = Path(folder)
    st = _read_genes_by_obs(root / "counts.csv")
    coords = _read_named_column(root / "coords.csv", list(st.obs_names), "spots")
    require(
        {"x", "y"} <= set(coords.columns),
        f"{root / 'coords.csv'}: expected columns x, y; got {list(coords.columns)}",
    )
    try:
        st.obsm[keys.SPATIAL] = coords[["x", "y"]].to_numpy(dtype=np.float64)
    except ValueError as exc:
        raise FedstError(f"{root / 'coords.csv'}: non-numeric x/y coordinates ({exc})") from exc
    st.uns[keys.PROVENANCE] = {"format": "sc-spatial-csv", "source": str(root)}
    return st


def load_reference_csv(folder: str | Path) -> AnnData:
    """The reference half: ``counts.csv`` (genes x cells) + optional ``cell_types.csv`` (one type per cell)."""
    root = Path(folder)
    sc = _read_genes_by_obs(root / "counts.csv")
    types = root / "cell_types.csv"
    if types.is_file():
        sc.obs[CELL_TYPE] = _read_named_column(types, list(sc.obs_names), "cells").iloc[:, 0].astype(str).to_numpy()
    sc.uns[keys.PROVENANCE] = {"format": "sc-spatial-csv", "source": str(root)}
    return sc


def load_sc_spatial(folder: str | Path) -> tuple[AnnData, AnnData]:
    """A spacexr-style folder (``spatial/{counts,coords}.csv``, ``reference/{counts,cell_types}.csv``)."""
    root = Path(folder)
    return load_spatial_csv(root / "spatial"), load_reference_csv(root / "reference")


def read_input(path: str | Path, what: str, need_spatial: bool) -> AnnData:
    """An .h5ad file, or a folder in the sc-spatial CSV layout (``counts.csv`` [+ ``coords.csv``])."""
    p = Path(path)
    if p.is_dir():
        return load_spatial_csv(p) if need_spatial else load_reference_csv(p)
    return read_h5ad_checked(p, what, need_spatial)


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
