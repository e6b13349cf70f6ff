"""HEST-1k layout: `<id>.h5ad` (spots x genes raw counts, obsm['spatial'] in full-resolution pixels of the
WSI) + `<id>.tif` pyramidal TIFF whole-slide image (mpp recorded in the TIFF, else give `mpp`)."""

from __future__ import annotations

import os

from shared.ingest.generic import load_h5ad_section
from shared.ingest.section import Section


def load_hest_section(
    h5ad: str | os.PathLike,
    image: str | os.PathLike,
    *,
    section_id: str | None = None,
    mpp: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    convert: bool = True,
) -> Section:
    """Read one HEST-style section; the same checks as the generic reader, recorded as format 'hest'."""
    return load_h5ad_section(
        h5ad, image, section_id=section_id, mpp=mpp, cache_dir=cache_dir, fmt="hest", convert=convert
    )
