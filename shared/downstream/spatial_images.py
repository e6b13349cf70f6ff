"""The tissue image under a prediction, in the layout scanpy and squidpy read: ``uns['spatial'][section]``.

Space Ranger writes, per library, ``images`` (``hires``: longest side 2000 px, ``lowres``: 600 px) and
``scalefactors`` (image px per full-resolution px, spot and fiducial diameters in full-resolution px);
``scanpy.pl.spatial(adata, library_id=section)`` draws the spots (``obsm['spatial']``, full-resolution x = column,
y = row) onto the hires image at ``tissue_hires_scalef``. A patch store keeps no image of its own, only the
path of each section's slide (manifest provenance; the spot table's provenance also names the original image
the SITE.toml listed), so the images are read again here, cheaply: a pyramid level or openslide thumbnail for
openslide-readable slides, a JPEG decoded at reduced scale (libjpeg's DCT scaling) for a plain image. No
full-resolution array is ever decoded for a pyramidal slide, and nothing is converted or cached.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared import keys
from shared.errors import FedstError

if TYPE_CHECKING:
    from shared.store.format import PatchStore

log = logging.getLogger("fedst.spatial")

HIRES_PX = 2000
"""Longest side of Space Ranger's ``tissue_hires_image.png``."""
LOWRES_PX = 600
"""Longest side of Space Ranger's ``tissue_lowres_image.png``."""
SPOT_UM = {"legacy-st": 100.0, "visium": 55.0}
"""Spot diameter by technology: legacy ST spots are 100 um on a 200 um grid, Visium spots 55 um on 100 um."""
ST_PITCH_UM = 200.0
FIDUCIAL_PER_SPOT = 144.45982486939 / 89.42751063343188
"""Space Ranger's fiducial/spot diameter ratio (from its scalefactors_json.json); kept so readers that expect
``fiducial_diameter_fullres`` find a consistent value."""


def spot_diameter_um(fmt: str, coords: np.ndarray, mpp: float) -> tuple[float, str]:
    """(diameter in microns, how it was found). By the section's format when known; otherwise from the spot
    pitch: a pitch near ST's 200 um means ST's 100 um spots, else Visium's 55/100 diameter/pitch ratio."""
    if fmt in SPOT_UM:
        return SPOT_UM[fmt], f"{fmt} spot {SPOT_UM[fmt]:g} um"
    if len(coords) < 2:
        return SPOT_UM["visium"], "default (Visium 55 um)"
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(coords).query(coords, k=2)
    pitch_um = float(np.median(dist[:, 1])) * mpp
    if pitch_um >= 0.75 * ST_PITCH_UM:
        return SPOT_UM["legacy-st"], f"spot pitch {pitch_um:.0f} um (ST grid): 100 um"
    return 0.55 * pitch_um, f"spot pitch {pitch_um:.0f} um x 0.55 (Visium's diameter/pitch)"


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray(rgb)
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def read_overview(path: str | Path, mpp: float, long_px: int) -> tuple[np.ndarray, int, int]:
    """(RGB uint8 at most ``long_px`` on its long side, full-resolution width, height) of a slide or image.

    An openslide-readable slide goes through the product's reader (its coarsest sufficient level); a plain
    JPEG/PNG is opened with the product's bounded PIL opener and, for a JPEG, decoded at up to 1/8 scale."""
    from shared.ingest.pil import open_plain_image
    from shared.ingest.slide import is_openslide_readable, open_slide

    path = Path(path)
    if is_openslide_readable(path):
        with open_slide(path, mpp=mpp) as slide:
            thumb, _ = slide.thumbnail(long_px)
            return thumb, slide.width, slide.height
    with open_plain_image(path) as image:
        width, height = image.size
        scale = long_px / max(width, height)
        image.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))  # JPEG only; else a no-op
        small = image.convert("RGB")
        small.thumbnail((long_px, long_px))
        return np.asarray(small, dtype=np.uint8), width, height


def section_spatial(
    path: str | Path,
    mpp: float,
    spot_um: float,
    *,
    hires_px: int = HIRES_PX,
    lowres_px: int = LOWRES_PX,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``uns['spatial'][section]`` entry of the slide at ``path``: hires/lowres uint8 images whose longest
    sides are ``hires_px``/``lowres_px``, their scale factors (image px per full-resolution px, one per image,
    ``longest side / full-resolution longest side`` as Space Ranger computes it) and the spot and fiducial
    diameters in full-resolution px (``spot_um / mpp``)."""
    if not (np.isfinite(mpp) and mpp > 0):
        raise FedstError(f"{path}: microns per pixel must be a positive number to size the spots, got {mpp!r}")
    overview, width, height = read_overview(path, mpp, hires_px)
    long_side = max(width, height)
    hires_s = min(1.0, hires_px / long_side)
    lowres_s = min(1.0, lowres_px / long_side)
    hires = _resize(overview, (max(1, round(width * hires_s)), max(1, round(height * hires_s))))
    lowres = _resize(hires, (max(1, round(width * lowres_s)), max(1, round(height * lowres_s))))
    spot_px = float(spot_um) / float(mpp)
    return {
        "images": {"hires": hires, "lowres": lowres},
        "scalefactors": {
            "tissue_hires_scalef": float(hires_s),
            "tissue_lowres_scalef": float(lowres_s),
            "spot_diameter_fullres": spot_px,
            "fiducial_diameter_fullres": spot_px * FIDUCIAL_PER_SPOT,
        },
        "metadata": {
            "source_image_path": str(path),
            "fullres_width": int(width),
            "fullres_height": int(height),
            "mpp": float(mpp),
            "spot_diameter_um": float(spot_um),
            **dict(metadata or {}),
        },
    }


def _candidates(store: PatchStore, section: str) -> tuple[list[str], str]:
    """Paths that may hold the section's slide, best first, and its format: the slide prepare read (the
    original or its converted pyramid in the cache), then the original image the SITE.toml named."""
    recorded = store.manifest.get("provenance", {}).get("sections", {}).get(section, {})
    provenance = store.spots.uns.get(keys.PROVENANCE, {})
    provenance = provenance.get(section, {}) if isinstance(provenance, Mapping) else {}
    paths = [recorded.get("slide"), provenance.get("slide"), provenance.get("image")]
    fmt = str(recorded.get("format") or provenance.get("format") or "unknown")
    return list(dict.fromkeys(str(p) for p in paths if p)), fmt


def _mpp_of(store: PatchStore, section: str) -> float | None:
    value = store.spots.uns.get(keys.MPP, store.manifest.get("params", {}).get("mpp"))
    if isinstance(value, Mapping):
        value = value.get(section)
    return float(value) if value is not None else None


def store_spatial(store: PatchStore, sections: list[str] | None = None) -> tuple[dict[str, dict], list[str]]:
    """({section: uns['spatial'] entry} for every section whose slide is reachable, [one line per section
    whose slide is not]). Nothing here raises for a missing or unreadable slide: the prediction is still
    written, only without the tissue underneath."""
    from shared import __version__

    spots = store.spots
    section_of = spots.obs[keys.SECTION].astype(str).to_numpy()
    entries: dict[str, dict] = {}
    notes: list[str] = []
    for section in sections if sections is not None else list(dict.fromkeys(section_of)):
        paths, fmt = _candidates(store, section)
        mpp = _mpp_of(store, section)
        found = [p for p in paths if Path(p).is_file()]
        if not found or mpp is None:
            why = "no microns per pixel recorded" if mpp is None and found else "no slide recorded in the store"
            if paths and not found:
                why = f"slide not found at {' or '.join(paths)}"
            notes.append(f"section {section}: no tissue image in uns['spatial'] ({why})")
            continue
        coords = np.asarray(spots.obsm[keys.SPATIAL], dtype=np.float64)[section_of == section]
        spot_um, spot_source = spot_diameter_um(fmt, coords, mpp)
        metadata = {"format": fmt, "spot_diameter_source": spot_source, "software_version": f"fedst {__version__}"}
        try:
            entries[section] = section_spatial(found[0], mpp, spot_um, metadata=metadata)
        except FedstError as exc:
            notes.append(f"section {section}: no tissue image in uns['spatial'] ({exc})")
    return entries, notes


def add_spatial_images(adata: Any, store: PatchStore) -> list[str]:
    """Put ``uns['spatial']`` on a prediction AnnData of ``store``; returns (and logs) one line per section
    left without an image."""
    entries, notes = store_spatial(store)
    if entries:
        adata.uns["spatial"] = entries
    for note in notes:
        log.warning(note)
    return notes
