"""Legacy Spatial Transcriptomics (Stahl et al. 2016; e.g. her2st): counts `.tsv.gz` (spots x genes, first
column the spot id "<x>x<y>" in array coordinates), a spot selection `.tsv` (x, y, new_x, new_y, pixel_x,
pixel_y[, selected]) and a full-resolution JPEG.

Microns per pixel: the user's, else the image's own, else derived from the array geometry: ST spots sit on a
square grid with a 200 um centre-to-centre pitch, so the slope of pixel position against the (sub-spot
adjusted) array coordinate new_x/new_y is 200 um in pixels (her2st C2: ~0.69 um/px).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared import keys
from shared.errors import FedstError
from shared.ingest import validate
from shared.ingest.section import Section, finish_section
from shared.ingest.slide import require_file, resolve_mpp

if TYPE_CHECKING:
    import pandas as pd

ST_PITCH_UM = 200.0
SPOT_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def read_table(path: Path, what: str, **kwargs) -> pd.DataFrame:
    """A tab-separated table, or a FedstError naming the file when it cannot be parsed."""
    import pandas as pd

    try:
        return pd.read_csv(path, sep="\t", **kwargs)
    except (OSError, EOFError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise FedstError(f"{path}: unreadable {what} ({type(exc).__name__}: {exc})") from None


def _array_id(value: object) -> str:
    number = float(value)  # type: ignore[arg-type]
    return str(int(number)) if number.is_integer() else str(value)


def spot_ids(spots: pd.DataFrame) -> list[str]:
    return [f"{_array_id(x)}x{_array_id(y)}" for x, y in zip(spots["x"], spots["y"])]


def derive_mpp(spots: pd.DataFrame) -> float | None:
    """200 um / (pixels per array unit), fitted on pixel_x ~ new_x and pixel_y ~ new_y; None if unfit."""
    slopes = []
    for array_col, pixel_col in (("new_x", "pixel_x"), ("new_y", "pixel_y")):
        column = array_col if array_col in spots else array_col.removeprefix("new_")
        a = spots[column].to_numpy(dtype=np.float64)
        p = spots[pixel_col].to_numpy(dtype=np.float64)
        if len(a) < 3 or np.ptp(a) == 0 or not np.isfinite(a).all() or not np.isfinite(p).all():
            continue
        slopes.append(abs(np.polyfit(a, p, 1)[0]))
    if not slopes or min(slopes) == 0:
        return None
    return ST_PITCH_UM / float(np.mean(slopes))


def load_legacy_st_section(
    counts: str | os.PathLike,
    spots: str | os.PathLike,
    image: str | os.PathLike,
    *,
    section_id: str | None = None,
    mpp: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    convert: bool = True,
) -> Section:
    """Join counts and spot table on "<x>x<y>" (keeping spots in both and, when the column exists, selected),
    with pixel_x/pixel_y as obsm[SPATIAL]. ``convert=False``: every check, no conversion into the slide cache
    (see `finish_section`)."""
    import anndata
    import scipy.sparse as sp

    counts_path = require_file(counts, "a legacy-ST counts .tsv(.gz): spots x genes, first column '<x>x<y>'")
    spots_path = require_file(spots, "a legacy-ST spot table .tsv with x, y, pixel_x, pixel_y")
    table = read_table(counts_path, "counts table", index_col=0)
    if table.shape[1] == 0:
        raise FedstError(f"{counts_path}: no gene columns (expected tab-separated spots x genes counts)")
    spot_table = read_table(spots_path, "spot table")
    missing = [c for c in SPOT_COLUMNS if c not in spot_table.columns]
    if missing:
        raise FedstError(
            f"{spots_path}: missing column(s) {', '.join(missing)} (expected x, y, pixel_x, pixel_y; "
            f"found {', '.join(map(str, spot_table.columns))})"
        )
    if "selected" in spot_table:
        spot_table = spot_table[spot_table["selected"].astype(float) == 1]
    spot_table.index = spot_ids(spot_table)
    table.index = table.index.astype(str)
    validate.check_unique_ids(list(table.index), str(counts_path), "the first column (spot id)")
    validate.check_unique_ids(list(spot_table.index), str(spots_path), "columns x, y")
    common = validate.shared_ids(list(table.index), list(spot_table.index), str(counts_path), str(spots_path))
    non_numeric = [str(c) for c, dtype in table.dtypes.items() if dtype.kind not in "iufb"]
    if non_numeric:
        raise FedstError(f"{counts_path}: non-numeric values in gene column(s) {non_numeric[:3]} (expected raw counts)")
    values = table.loc[common].to_numpy(dtype=np.float32)
    validate.check_counts(values, str(counts_path))
    adata = anndata.AnnData(X=sp.csr_matrix(values))
    adata.obs_names = common
    adata.var_names = [str(g) for g in table.columns]
    adata.var_names_make_unique()
    pixels = spot_table.loc[common, ["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)
    adata.obsm[keys.SPATIAL] = pixels
    for column in ("x", "y"):
        adata.obs[f"array_{column}"] = spot_table.loc[common, column].to_numpy()
    image_path, value, origin = resolve_mpp(
        image, mpp, fallback_mpp=derive_mpp(spot_table), fallback_reason="ST array pitch 200 um"
    )
    sid = section_id or counts_path.name.split(".")[0]
    provenance = {
        "format": "legacy-st",
        "counts": counts_path.resolve(),
        "spots": spots_path.resolve(),
        "mpp_source": origin,
        "spots_without_counts": int(len(spot_table) - len(common)),
        "counts_without_spot": int(len(table) - len(common)),
    }
    return finish_section(sid, adata, image_path, value, provenance, str(counts_path), cache_dir, convert)
