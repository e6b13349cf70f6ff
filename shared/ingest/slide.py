"""Whole-slide image access: every image is read through openslide, from the best pyramid level.

A plain JPEG/PNG (legacy ST, a Visium hires PNG, a generic image) has no pyramid and no tiles, so reading a
patch from it would decode the whole file each time. `ensure_pyramidal` (pyramid.py) converts it ONCE into a
tiled pyramidal TIFF, cached by content hash, so downstream code has exactly one path:
`open_slide(...).read_patch(...)`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.errors import FedstError
from shared.ingest.mpp import MPP_RANGE, check_mpp, mpp_from_properties, plain_image_mpp, plausible_mpp
from shared.ingest.pil import open_plain_image
from shared.ingest.pyramid import (
    CACHE_ENV,
    TILE_PX,
    VENDOR_SUFFIXES,
    check_plain_image,
    default_cache_dir,
    ensure_pyramidal,
    is_openslide_readable,
    read_plain_image,
    write_pyramidal_tiff,
)
from shared.ingest.validate import require_file

if TYPE_CHECKING:
    import openslide

__all__ = [
    "CACHE_ENV",
    "MPP_RANGE",
    "TILE_PX",
    "VENDOR_SUFFIXES",
    "Slide",
    "check_image",
    "check_mpp",
    "check_plain_image",
    "default_cache_dir",
    "ensure_pyramidal",
    "image_mpp",
    "image_size",
    "is_openslide_readable",
    "mpp_from_properties",
    "open_osr",
    "open_slide",
    "plain_image_mpp",
    "read_plain_image",
    "require_file",
    "resolve_mpp",
    "write_pyramidal_tiff",
]


class Slide:
    """An openslide-backed slide with its microns per pixel; reads spot-centred patches at a physical size."""

    def __init__(self, path: Path, osr: openslide.OpenSlide, mpp: float, source: Path | None = None):
        self.path = path
        self.source = source or path
        self._osr = osr
        self.mpp = float(mpp)
        self.width, self.height = (int(v) for v in osr.dimensions)
        self.level_count = int(osr.level_count)
        self.level_downsamples = tuple(float(d) for d in osr.level_downsamples)
        self.level_dimensions = tuple(tuple(int(v) for v in dims) for dims in osr.level_dimensions)
        self.vendor = osr.properties.get("openslide.vendor")

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._osr.properties)

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= ``downsample`` (so no detail is invented by upsampling)."""
        best = 0
        for level, factor in enumerate(self.level_downsamples):
            if factor <= downsample * (1 + 1e-6):
                best = level if factor >= self.level_downsamples[best] else best
        return best

    def _unreadable(self, what: str, exc: Exception) -> FedstError:
        """A slide whose tiles are corrupt opens fine and fails on the read that touches them (openslide
        raises OpenSlideError, and refuses every later read of that handle): one line naming slide and region."""
        converted = f", converted copy {self.path}" if self.path != self.source else ""
        return FedstError(f"{self.source}: unreadable or corrupt slide: {what} failed ({exc}{converted})")

    def read_region_rgb(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 at ``level``; (x, y) in level-0 pixels. Outside the slide reads as white."""
        import openslide

        try:
            region = self._osr.read_region((int(x), int(y)), int(level), (int(width), int(height)))
        except openslide.OpenSlideError as exc:
            raise self._unreadable(
                f"reading the {width} x {height} px region at x={x}, y={y}, level {level}", exc
            ) from None
        rgba = np.asarray(region, dtype=np.uint8)
        alpha = rgba[..., 3:4].astype(np.float32) / 255.0
        rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.rint(rgb).astype(np.uint8)

    def read_patch(self, cx: float, cy: float, field_um: float, out_px: int) -> np.ndarray:
        """(out_px, out_px, 3) uint8 of the ``field_um``-wide square centred on (cx, cy) in level-0 pixels.

        Reads from the coarsest level that still has >= out_px pixels across the field, then resizes with an
        antialiasing filter; sub-pixel placement is kept by resizing from a fractional box.
        """
        from PIL import Image

        if field_um <= 0 or out_px <= 0:
            raise FedstError(f"read_patch: field_um ({field_um}) and out_px ({out_px}) must be positive")
        field_px = field_um / self.mpp
        level = self.best_level(field_px / out_px)
        factor = self.level_downsamples[level]
        size = field_px / factor
        left = (cx - field_px / 2) / factor
        top = (cy - field_px / 2) / factor
        ix, iy = math.floor(left), math.floor(top)
        width = math.ceil(left + size) - ix + 1
        height = math.ceil(top + size) - iy + 1
        region = self.read_region_rgb(round(ix * factor), round(iy * factor), level, width, height)
        box = (left - ix, top - iy, left - ix + size, top - iy + size)
        patch = Image.fromarray(region).resize((out_px, out_px), Image.Resampling.LANCZOS, box=box)
        return np.asarray(patch, dtype=np.uint8)

    def thumbnail(self, max_px: int) -> tuple[np.ndarray, float]:
        """An RGB overview at most ``max_px`` on its long side and its scale (thumbnail px per level-0 px)."""
        import openslide

        try:
            image = self._osr.get_thumbnail((int(max_px), int(max_px))).convert("RGB")
        except openslide.OpenSlideError as exc:
            raise self._unreadable(f"reading a {max_px} px thumbnail", exc) from None
        return np.asarray(image, dtype=np.uint8), image.width / self.width

    def describe(self) -> dict[str, Any]:
        """The JSON that `fedst data inspect SLIDE --json` prints."""
        return {
            "kind": "slide",
            "path": str(self.source),
            "width": self.width,
            "height": self.height,
            "levels": self.level_count,
            "level_downsamples": list(self.level_downsamples),
            "mpp": self.mpp,
            "vendor": self.vendor,
        }

    def close(self) -> None:
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Slide({str(self.source)!r}, {self.width}x{self.height}, levels={self.level_count}, mpp={self.mpp})"


def open_osr(path: Path) -> openslide.OpenSlide:
    import openslide

    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise FedstError(f"{path}: not a slide format openslide reads (expected SVS, pyramidal TIFF, ...)") from None
    except openslide.OpenSlideError as exc:
        raise FedstError(f"{path}: unreadable or corrupt slide ({exc})") from None


def open_slide(path: str | os.PathLike, mpp: float | None = None, cache_dir: str | os.PathLike | None = None) -> Slide:
    """Open any supported image as a Slide; a plain JPEG/PNG is first converted (once) by `ensure_pyramidal`.

    ``mpp`` overrides the image's own microns per pixel; without either, a FedstError says to pass one.
    """
    source = require_file(path, "a slide image (SVS, pyramidal TIFF, JPEG or PNG)")
    given = check_mpp(mpp, str(source))
    readable = ensure_pyramidal(source, given, cache_dir)
    osr = open_osr(readable)
    # Corrupt tiles surface only on read: touch one tile of the coarsest level so a broken file fails here.
    try:
        top = osr.level_count - 1
        width, height = osr.level_dimensions[top]
        osr.read_region((0, 0), top, (min(64, width), min(64, height)))
    except Exception as exc:  # openslide raises OpenSlideError; PIL may raise on odd modes
        osr.close()
        raise FedstError(f"{source}: unreadable or corrupt slide ({exc})") from None
    found = given if given is not None else mpp_from_properties(osr.properties)
    if found is None:
        osr.close()
        raise FedstError(
            f"{source}: image carries no microns-per-pixel (no openslide.mpp-x / aperio.MPP / TIFF resolution); "
            "give it with --mpp or `mpp = ...` in SITE.toml"
        )
    return Slide(readable, osr, found, source=source)


def check_image(path: str | os.PathLike, mpp: float | None = None) -> Path:
    """Every check `open_slide` runs on an image, without its side effect: a plain JPEG/PNG is checked as its
    conversion would check it (`check_plain_image`) but not converted into the slide cache. Returns the path."""
    source = require_file(path, "a slide image (SVS, pyramidal TIFF, JPEG or PNG)")
    if is_openslide_readable(source):
        with open_slide(source, mpp=mpp):  # a slide format: used in place, nothing is converted
            return source
    check_mpp(mpp, str(source))
    check_plain_image(source)
    return source


def image_mpp(path: str | os.PathLike) -> float | None:
    """The microns per pixel an image carries itself (slide metadata or a plausible TIFF/JPEG resolution)."""
    source = require_file(path, "an image (SVS, pyramidal TIFF, JPEG or PNG)")
    if not is_openslide_readable(source):
        return plain_image_mpp(source)
    osr = open_osr(source)
    try:
        return mpp_from_properties(osr.properties)
    finally:
        osr.close()


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the full-resolution image from its header, without decoding or converting it."""
    source = require_file(path, "an image (SVS, pyramidal TIFF, JPEG or PNG)")
    if is_openslide_readable(source):
        osr = open_osr(source)
        try:
            return tuple(int(v) for v in osr.dimensions)  # type: ignore[return-value]
        finally:
            osr.close()
    with open_plain_image(source) as image:
        return int(image.width), int(image.height)


def resolve_mpp(
    image: str | os.PathLike,
    mpp: float | None = None,
    fallback_mpp: float | None = None,
    fallback_reason: str = "derived",
) -> tuple[Path, float, str]:
    """(image path, mpp, where the mpp came from) for a section's image; converts nothing.

    Precedence: the mpp the user gave > the image's own > ``fallback_mpp`` derived by the format reader
    (e.g. from Visium's 55 um spot diameter) > a FedstError asking for --mpp.
    """
    source = require_file(image, "an image (SVS, pyramidal TIFF, JPEG or PNG)")
    given = check_mpp(mpp, str(source))
    if given is not None:
        return source, given, "given"
    carried = image_mpp(source)
    if carried is not None:
        return source, carried, "image metadata"
    if fallback_mpp is not None and plausible_mpp(fallback_mpp) is not None:
        return source, float(fallback_mpp), fallback_reason
    raise FedstError(f"{source}: image carries no microns-per-pixel; give it with --mpp or `mpp = ...` in SITE.toml")
