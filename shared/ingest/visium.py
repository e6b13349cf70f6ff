"""10x Visium Space Ranger outputs: `filtered_feature_bc_matrix.h5`, `spatial/tissue_positions.csv` (Space
Ranger 2+, with header) or `spatial/tissue_positions_list.csv` (1.x, no header), `spatial/scalefactors_json.json`.

Only in-tissue spots that have counts are kept. Coordinates: Space Ranger gives full-resolution pixels
(pxl_col = x, pxl_row = y). With a full-resolution image the coordinates are used as they are; without one the
hires PNG stands in, coordinates are multiplied by `tissue_hires_scalef`, and the mpp is the full-resolution
mpp divided by that factor. Full-resolution mpp: the user's, else the image's own, else derived from the
spot: a Visium spot is 55 um across and `spot_diameter_fullres` gives it in full-resolution pixels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared import keys
from shared.errors import FedstError
from shared.ingest import validate
from shared.ingest.section import Section, finish_section
from shared.ingest.slide import check_mpp, require_file, resolve_mpp

if TYPE_CHECKING:
    import anndata
    import pandas as pd

VISIUM_SPOT_UM = 55.0
MATRIX = "filtered_feature_bc_matrix.h5"
POSITIONS = ("spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv")
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _strings(dataset) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in dataset[:]]


def read_10x_h5(path: Path) -> anndata.AnnData:
    """Barcodes x genes counts from a Cell Ranger / Space Ranger HDF5 (v3 `matrix/` group, or the v2
    per-genome group); gene symbols as var_names, Ensembl ids in var[GENE_IDS]; Gene Expression features only."""
    import anndata
    import h5py
    import scipy.sparse as sp

    try:
        with h5py.File(path, "r") as handle:
            if "matrix" in handle:
                group = handle["matrix"]
                names, ids = _strings(group["features/name"]), _strings(group["features/id"])
                types = _strings(group["features/feature_type"]) if "feature_type" in group["features"] else None
            else:
                genomes = [key for key in handle if isinstance(handle[key], h5py.Group)]
                if not genomes:
                    raise KeyError("no 'matrix' group and no genome group")
                group = handle[genomes[0]]
                names, ids, types = _strings(group["gene_names"]), _strings(group["genes"]), None
            n_genes, n_cells = (int(v) for v in group["shape"][:])
            matrix = sp.csc_matrix(
                (group["data"][:], group["indices"][:], group["indptr"][:]), shape=(n_genes, n_cells)
            )
            barcodes = _strings(group["barcodes"])
    except FedstError:
        raise
    except Exception as exc:  # OSError (not HDF5), KeyError (wrong layout), ValueError (bad arrays)
        raise FedstError(
            f"{path}: unreadable 10x feature-barcode matrix ({type(exc).__name__}: {exc}; "
            "expected a Space Ranger filtered_feature_bc_matrix.h5)"
        ) from None
    counts = matrix.T.tocsr().astype(np.float32)
    keep = np.array([t == "Gene Expression" for t in types]) if types is not None else np.ones(len(names), bool)
    adata = anndata.AnnData(X=counts[:, keep])
    adata.obs_names = barcodes
    adata.var_names = [n for n, k in zip(names, keep) if k]
    adata.var[keys.GENE_IDS] = [i for i, k in zip(ids, keep) if k]
    adata.var_names_make_unique()
    return adata


def read_positions(spatial_dir: Path) -> tuple[pd.DataFrame, Path]:
    """The tissue positions table (either Space Ranger version) indexed by barcode."""
    import pandas as pd

    for name in POSITIONS:
        path = spatial_dir.parent / name
        if not path.is_file():
            continue
        try:
            header = path.read_text(errors="replace").split("\n", 1)[0]
            has_header = header.lower().startswith("barcode")
            table = pd.read_csv(path, header=0 if has_header else None)
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            raise FedstError(f"{path}: unreadable tissue positions ({exc})") from None
        if not has_header:
            if table.shape[1] != len(POSITION_COLUMNS):
                raise FedstError(
                    f"{path}: {table.shape[1]} columns (expected "
                    f"{len(POSITION_COLUMNS)}: {', '.join(POSITION_COLUMNS)})"
                )
            table.columns = POSITION_COLUMNS
        missing = [c for c in POSITION_COLUMNS if c not in table.columns]
        if missing:
            raise FedstError(f"{path}: missing column(s) {', '.join(missing)} (expected {', '.join(POSITION_COLUMNS)})")
        table["barcode"] = table["barcode"].astype(str)
        validate.check_unique_ids(list(table["barcode"]), str(path), "column barcode")
        return table.set_index("barcode"), path
    raise FedstError(
        f"{spatial_dir}: no tissue positions file (expected {POSITIONS[0]} or {POSITIONS[1]} in the Space Ranger outs)"
    )


def read_scalefactors(path: Path) -> dict[str, float]:
    require_file(path, "Space Ranger scalefactors_json.json")
    try:
        factors = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FedstError(f"{path}: unreadable scale factors ({exc})") from None
    for key in ("spot_diameter_fullres", "tissue_hires_scalef"):
        value = factors.get(key)
        if not isinstance(value, (int, float)) or not value > 0:
            raise FedstError(f"{path}: field {key!r} is {value!r} (expected a positive number)")
    return factors


def load_visium_section(
    path: str | os.PathLike,
    image: str | os.PathLike | None = None,
    *,
    section_id: str | None = None,
    mpp: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    convert: bool = True,
) -> Section:
    """Read a Space Ranger `outs/` folder. ``image``: the full-resolution H&E (optional, see module doc);
    ``mpp``: microns per FULL-RESOLUTION pixel (optional). ``convert=False``: every check, no conversion into
    the slide cache (see `finish_section`)."""
    root = Path(path)
    if not root.is_dir():
        raise FedstError(f"{root}: no such directory (expected a Space Ranger outs/ folder with {MATRIX} and spatial/)")
    matrix_path = require_file(root / MATRIX, "the Space Ranger filtered feature-barcode matrix")
    adata = read_10x_h5(matrix_path)
    validate.check_unique_ids(list(adata.obs_names), str(matrix_path), "barcodes")
    positions, positions_path = read_positions(root / "spatial")
    factors = read_scalefactors(root / "spatial" / "scalefactors_json.json")
    in_tissue = positions[positions["in_tissue"].astype(int) == 1]
    common = validate.shared_ids(list(adata.obs_names), list(in_tissue.index), str(matrix_path), str(positions_path))
    adata = adata[common].copy()
    validate.check_counts(adata.X, str(matrix_path))
    full = in_tissue.loc[common, ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    adata.obs["array_row"] = in_tissue.loc[common, "array_row"].to_numpy()
    adata.obs["array_col"] = in_tissue.loc[common, "array_col"].to_numpy()
    derived = VISIUM_SPOT_UM / float(factors["spot_diameter_fullres"])
    given = check_mpp(mpp, str(root))
    if image is not None:
        image_path, value, origin = resolve_mpp(
            image, given, fallback_mpp=derived, fallback_reason="Visium spot 55 um / spot_diameter_fullres"
        )
        coords, scale = full, 1.0
    else:
        scale = float(factors["tissue_hires_scalef"])
        image_path = require_file(root / "spatial" / "tissue_hires_image.png", "the Space Ranger hires image")
        value = (given if given is not None else derived) / scale
        origin = "given" if given is not None else "Visium spot 55 um / spot_diameter_fullres"
        coords = full * scale
    adata.obsm[keys.SPATIAL] = coords
    provenance = {
        "format": "visium",
        "path": root.resolve(),
        "matrix": matrix_path.resolve(),
        "positions": positions_path.resolve(),
        "image_scale": scale,
        "mpp_source": origin,
        "in_tissue_without_counts": int(len(in_tissue) - len(common)),
    }
    sid = section_id or (root.name if root.name != "outs" else root.parent.name)
    return finish_section(sid, adata, image_path, value, provenance, str(root), cache_dir, convert)
