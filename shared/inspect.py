"""What `fedst data inspect PATH` reports: a slide, a section (.h5ad or Space Ranger folder), a SITE.toml or a
patch store. Inspecting has no side effects: nothing is written, the slide cache included. A single slide or
h5ad is described from its header/tables; a SITE.toml or Space Ranger folder is read as `prepare` reads it, with
every check (a JPEG's corruption check too), but a plain JPEG/PNG is described from its header instead of being
converted into the slide cache (`convert=False`, shared/ingest/section.py): `prepare` converts it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from shared import keys
from shared.errors import FedstError
from shared.ingest.pil import open_plain_image
from shared.ingest.slide import (
    check_mpp,
    check_plain_image,
    is_openslide_readable,
    mpp_from_properties,
    open_osr,
    plain_image_mpp,
    require_file,
)

PLAIN_VENDOR = "plain-image"


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def describe_slide(path: Path, mpp: float | None = None) -> dict[str, Any]:
    """Slide facts. ``mpp``: the image's own, else the one given (--mpp is a fallback, as in prepare), else
    null — inspect still answers for a slide that `prepare` would refuse without --mpp."""
    source = require_file(path, "a slide image (SVS, pyramidal TIFF, JPEG or PNG)")
    given = check_mpp(mpp, str(source))
    if is_openslide_readable(source):
        osr = open_osr(source)
        try:
            width, height = (int(v) for v in osr.dimensions)
            return {
                "kind": "slide",
                "path": str(source),
                "width": width,
                "height": height,
                "levels": int(osr.level_count),
                "level_downsamples": [float(d) for d in osr.level_downsamples],
                "mpp": _first(mpp_from_properties(osr.properties), given),
                "vendor": osr.properties.get("openslide.vendor"),
            }
        finally:
            osr.close()
    check_plain_image(source)  # the checks `prepare` runs before converting it (a corrupt JPEG included)
    with open_plain_image(source) as image:
        width, height = image.size
    return {
        "kind": "slide",
        "path": str(source),
        "width": int(width),
        "height": int(height),
        "levels": 1,
        "level_downsamples": [1.0],
        "mpp": _first(plain_image_mpp(source), given),
        "vendor": PLAIN_VENDOR,
        "note": "plain image: converted once to a tiled pyramidal TIFF (cached) when a reader uses it",
    }


def describe_h5ad(path: Path) -> dict[str, Any]:
    from shared.ingest.generic import read_h5ad

    adata = read_h5ad(path)
    spatial = adata.obsm.get(keys.SPATIAL)
    extent = None
    if spatial is not None and len(spatial):
        coords = np.asarray(spatial, dtype=np.float64)[:, :2]
        extent = {
            "x": [float(coords[:, 0].min()), float(coords[:, 0].max())],
            "y": [float(coords[:, 1].min()), float(coords[:, 1].max())],
        }
    mpp = adata.uns.get(keys.MPP)
    return {
        "kind": "section",
        "path": str(path),
        "format": "h5ad",
        "spots": int(adata.n_obs),
        "genes": int(adata.n_vars),
        "mpp": float(mpp) if mpp is not None else None,
        "spatial": keys.SPATIAL in adata.obsm,
        "spatial_extent": extent,
        "layers": sorted(adata.layers.keys()),
        "gene_ids": keys.GENE_IDS in adata.var,
    }


def describe_path(path: str | os.PathLike, mpp: float | None = None) -> dict[str, Any]:
    """Dispatch on what ``path`` is: store directory, Space Ranger folder, SITE.toml, .h5ad, else a slide."""
    from shared.store.format import PatchStore, is_store

    target = Path(path)
    if not target.exists():
        raise FedstError(f"{target}: no such file or directory (expected a slide, section, SITE.toml or store)")
    if target.is_dir():
        if is_store(target) or (target / "manifest.json").exists():
            return PatchStore(target).describe()
        from shared.ingest.visium import MATRIX, load_visium_section

        if (target / MATRIX).is_file():
            section = load_visium_section(target, mpp=mpp, convert=False)
            return {"kind": "section", "path": str(target), **section.describe()}
        raise FedstError(
            f"{target}: directory is neither a fedst store (manifest.json) nor a Space Ranger folder ({MATRIX})"
        )
    if target.suffix.lower() == ".toml":
        from shared.ingest.site import load_site

        return load_site(target, mpp=mpp, convert=False).describe()
    if target.suffix.lower() == ".h5ad":
        return describe_h5ad(target)
    return describe_slide(target, mpp)


def format_description(info: dict[str, Any]) -> str:
    """Human-readable lines for `fedst data inspect` without --json."""
    kind = info.get("kind")
    lines = [f"{kind}: {info.get('path', '')}"]
    if kind == "site":
        lines[0] = f"site {info['site']}: {info.get('path', '')}"
        if info.get("panel"):
            lines.append(f"  panel: {info['panel']}")
        lines.append(f"  {'id':<16} {'format':<10} {'spots':>7} {'genes':>7} {'mpp':>8} {'width':>7} {'height':>7}")
        for s in info["sections"]:
            lines.append(
                f"  {s['id']:<16} {s['format']:<10} {s['spots']:>7} {s['genes']:>7} {s['mpp']:>8.4f} "
                f"{s['width']:>7} {s['height']:>7}"
            )
        return "\n".join(lines)
    for key, value in info.items():
        if key in ("kind", "path"):
            continue
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, list) and value and isinstance(value[0], float):
            value = ", ".join(f"{v:.4g}" for v in value)
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)
