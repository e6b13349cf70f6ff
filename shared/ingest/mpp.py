"""Microns per pixel: reading it from slide metadata and checking values users give."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from shared.errors import FedstError
from shared.ingest.pil import open_plain_image

MPP_RANGE = (0.01, 100.0)
"""Plausible microns per pixel: outside it a recorded resolution is a placeholder (e.g. 72 dpi), not a scan."""


def plausible_mpp(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or not (MPP_RANGE[0] <= value <= MPP_RANGE[1]):
        return None
    return float(value)


def mpp_from_properties(props: dict[str, str] | Any) -> float | None:
    """Microns per pixel from openslide properties: openslide.mpp-x, then Aperio MPP, then TIFF resolution."""
    for key in ("openslide.mpp-x", "aperio.MPP"):
        try:
            value = plausible_mpp(float(props[key]))
        except (KeyError, TypeError, ValueError):
            continue
        if value is not None:
            return value
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    per_um = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    try:
        resolution = float(props["tiff.XResolution"])
    except (KeyError, TypeError, ValueError):
        return None
    if per_um is None or resolution <= 0:
        return None
    return plausible_mpp(per_um / resolution)


def check_mpp(mpp: float | None, source: str) -> float | None:
    """Validate a user-given mpp (None passes through)."""
    if mpp is None:
        return None
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise FedstError(f"{source}: mpp {mpp!r} is not a number (expected microns per pixel, e.g. 0.5)") from None
    if plausible_mpp(value) is None:
        raise FedstError(
            f"{source}: mpp {mpp!r} is not a plausible microns-per-pixel value "
            f"(expected {MPP_RANGE[0]}..{MPP_RANGE[1]}, e.g. 0.25-0.5 for a 40x/20x scan)"
        )
    return value


def plain_image_mpp(path: Path) -> float | None:
    """mpp from a plain image's own resolution tag, only when it is plausible (a 72/96 dpi default is not).

    An image that cannot be opened, or exceeds the size bound, raises its FedstError here already: reporting
    it as "carries no microns-per-pixel" would send the user after the wrong problem."""
    with open_plain_image(path) as image:
        dpi = image.info.get("dpi")
        unit = image.info.get("jfif_unit")
    try:
        value = float(dpi[0]) if dpi and unit != 0 else 0.0
    except (TypeError, ValueError, IndexError):  # a malformed resolution tag is no resolution
        return None
    return plausible_mpp(25400.0 / value) if value > 300 else None
