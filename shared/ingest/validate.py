"""Input checks shared by every reader (and by the store's prepare): each failure is one FedstError line that
names the file/field and says what was expected, raised before anything is written."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared import keys
from shared.errors import FedstError

if TYPE_CHECKING:
    import anndata


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path, or a FedstError naming it and what was expected there."""
    path = Path(path)
    if not path.exists():
        raise FedstError(f"{path}: no such file (expected {what})")
    if not path.is_file():
        raise FedstError(f"{path}: is not a file (expected {what})")
    return path


def _preview(values: Iterable[Any], limit: int = 3) -> str:
    items = [str(v) for v in values]
    shown = ", ".join(repr(v) for v in items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def check_unique_ids(ids: Sequence[Any], source: str, field: str) -> None:
    """Duplicate spot ids would silently merge two spots' expression or patches."""
    import pandas as pd

    index = pd.Index([str(v) for v in ids])
    if index.has_duplicates:
        dupes = index[index.duplicated()].unique()
        raise FedstError(f"{source}: duplicate spot ids in {field}: {_preview(dupes)} (expected one row per spot)")


def check_counts(matrix: Any, source: str) -> None:
    """Counts must be finite and non-negative (sparse matrices are checked on their stored values only)."""
    import scipy.sparse as sp

    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.number):
        raise FedstError(f"{source}: counts are not numeric (dtype {values.dtype}; expected raw counts)")
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise FedstError(f"{source}: counts contain {bad} NaN/infinite value(s) (expected finite raw counts >= 0)")
    if values.min() < 0:
        bad = int((values < 0).sum())
        raise FedstError(
            f"{source}: counts contain {bad} negative value(s), min {values.min()} (expected raw counts >= 0)"
        )


def shared_ids(counts_ids: Sequence[str], spot_ids: Sequence[str], counts_file: str, spots_file: str) -> list[str]:
    """Ids present in both tables, in the counts' order; an empty intersection is an error (wrong file pair?)."""
    spot_set = set(map(str, spot_ids))
    common = [str(i) for i in counts_ids if str(i) in spot_set]
    if not common:
        raise FedstError(
            f"{counts_file} and {spots_file} share no spot ids (counts e.g. {_preview(counts_ids)}, "
            f"spots e.g. {_preview(spot_ids)}; expected the same spot ids in both)"
        )
    return common


def check_coordinates(coords: np.ndarray, width: int, height: int, source: str, image: str) -> None:
    """Spot centres must be finite and inside the image (x = column in [0, width), y = row in [0, height))."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FedstError(f"{source}: obsm[{keys.SPATIAL!r}] has shape {coords.shape} (expected (n_spots, 2))")
    if not np.isfinite(coords).all():
        raise FedstError(f"{source}: spot coordinates contain NaN/infinite values (expected pixel positions)")
    outside = (coords[:, 0] < 0) | (coords[:, 0] >= width) | (coords[:, 1] < 0) | (coords[:, 1] >= height)
    if outside.any():
        first = coords[np.argmax(outside)]
        raise FedstError(
            f"{source}: {int(outside.sum())} spot coordinate(s) lie outside the image {image} "
            f"({width} x {height} px), e.g. x={first[0]:.1f}, y={first[1]:.1f} "
            "(expected full-resolution pixels, x = column, y = row; wrong image or scale factor?)"
        )


def check_gene_overlap(
    var_names: Sequence[str], panel: Sequence[str], source: str, gene_ids: Sequence[str] | None = None
) -> list[int]:
    """Positions in ``var_names`` of each panel gene (-1 where absent), matched case-insensitively on symbols
    and, when given, Ensembl ids. No overlap at all is an error (wrong species, ids vs symbols, wrong panel)."""
    lookup: dict[str, int] = {}
    for names in (gene_ids or [], var_names):
        for position, name in enumerate(names):
            lookup.setdefault(str(name).upper(), position)
    matched = [lookup.get(str(gene).upper(), -1) for gene in panel]
    if panel and all(position < 0 for position in matched):
        raise FedstError(
            f"{source}: no gene overlaps the panel ({len(panel)} genes, e.g. {_preview(panel)}; section has "
            f"{len(var_names)} genes, e.g. {_preview(var_names)}); expected gene symbols or Ensembl ids of the panel"
        )
    return matched


def check_section_adata(adata: anndata.AnnData, source: str) -> None:
    """The data-model invariants of a section's AnnData (see shared/keys.py)."""
    if adata.n_obs == 0:
        raise FedstError(f"{source}: no spots (expected at least one spot with counts)")
    if adata.n_vars == 0:
        raise FedstError(f"{source}: no genes (expected a spots x genes count matrix)")
    if keys.SPATIAL not in adata.obsm:
        raise FedstError(
            f"{source}: no obsm[{keys.SPATIAL!r}] (expected spot centres in full-resolution pixels; "
            f"found obsm keys {sorted(adata.obsm.keys())})"
        )
    check_unique_ids(list(adata.obs_names), source, "obs_names")
    check_counts(adata.X, source)
