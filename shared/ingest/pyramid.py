"""One-time conversion of a plain JPEG/PNG into a tiled JPEG pyramidal TIFF that openslide reads.

Successive pages (reduced levels with subfiletype=1; SubIFDs would hide them from openslide), 256 px JPEG
tiles, resolution in pixels per centimetre so openslide reports the mpp. Converted files live in a cache keyed
by the source's content hash and the mpp, never beside the source (which may be read-only).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from pathlib import Path

import numpy as np

from shared.errors import FedstError
from shared.ingest.jpeg import check_jpeg
from shared.ingest.mpp import check_mpp, plain_image_mpp
from shared.ingest.pil import open_plain_image
from shared.ingest.validate import require_file

log = logging.getLogger(__name__)

TILE_PX = 256
CACHE_ENV = "FEDST_CACHE"
VENDOR_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"}
"""Whole-slide formats that only openslide reads: when it does not recognise one, the file is broken."""
CONVERTER_VERSION = 1
"""Part of the cache key: bump when the converted file's layout changes."""


def default_cache_dir() -> Path:
    """Where converted slides live: ``$FEDST_CACHE/slides``, else ``~/.cache/fedst/slides``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "fedst") / "slides"


def is_openslide_readable(path: Path) -> bool:
    """True when openslide has a driver for the file (SVS, pyramidal/tiled TIFF, NDPI, MRXS, DICOM, ...)."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path)) is not None
    except openslide.OpenSlideError:
        return False


def _content_key(path: Path, mpp: float | None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    digest.update(f"|mpp={mpp!r}|v{CONVERTER_VERSION}".encode())
    return digest.hexdigest()[:32]


def _decode_jpeg(path: Path) -> np.ndarray | None:
    """libjpeg decode straight into one numpy array (PIL would hold the image twice); None if not plain RGB.

    libjpeg decodes a truncated or corrupt file without an error (grey or scrambled blocks), so the file is
    checked first (shared/ingest/jpeg.py)."""
    import imagecodecs

    with open(path, "rb") as handle:
        data = handle.read()
    check_jpeg(path, data)
    try:
        rgb = imagecodecs.jpeg8_decode(data)
    except Exception as exc:  # imagecodecs.Jpeg8Error on what the check cannot see (e.g. an unsupported variant)
        raise FedstError(f"{path}: unreadable or corrupt image ({exc})") from None
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        return None  # grayscale/CMYK: let PIL convert it
    return rgb


def read_plain_image(path: Path) -> np.ndarray:
    """Decode a JPEG/PNG/plain TIFF into (H, W, 3) uint8, transparency composited on white.

    The header is read first: an image above the size bound (shared/ingest/pil.py) is refused before any
    pixel is decoded or allocated."""
    from PIL import Image

    with open_plain_image(path) as image:
        is_jpeg = image.format in ("JPEG", "MPO")  # MPO: a camera's multi-picture JPEG
    rgb = _decode_jpeg(path) if is_jpeg else None
    if rgb is not None:
        return rgb
    with open_plain_image(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "P", "PA"):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(canvas, rgba)
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.uint8)


def _refuse_unrecognised_vendor_file(source: Path) -> None:
    if source.suffix.lower() in VENDOR_SUFFIXES:
        raise FedstError(
            f"{source}: unreadable or corrupt slide (openslide does not recognise this {source.suffix} file)"
        )


def check_plain_image(source: Path) -> None:
    """What converting a plain image would find wrong, found without converting it (nothing is written): a
    vendor slide openslide does not recognise, an image above the size bound (its header only), a file PIL's
    verify refuses, and for a JPEG the corruption check `_decode_jpeg` runs before decoding (jpeg.py)."""
    _refuse_unrecognised_vendor_file(source)
    with open_plain_image(source) as image:
        is_jpeg = image.format in ("JPEG", "MPO")
        image.verify()
    if is_jpeg:  # libjpeg decodes a corrupt JPEG without an error
        check_jpeg(source, source.read_bytes())


def ensure_pyramidal(
    image_path: str | os.PathLike, mpp: float | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """A path openslide reads: the image itself when it is already a slide format, else its cached conversion.

    The conversion is keyed by the file's content hash and the mpp, written atomically into ``cache_dir``
    (default `default_cache_dir()`), never beside the source (which may be read-only).
    """
    source = require_file(image_path, "an image (SVS, pyramidal TIFF, JPEG or PNG)")
    if is_openslide_readable(source):
        return source
    _refuse_unrecognised_vendor_file(source)
    if mpp is None:
        mpp = plain_image_mpp(source)
    if mpp is None:
        raise FedstError(
            f"{source}: plain image carries no microns-per-pixel; give it with --mpp or `mpp = ...` in SITE.toml"
        )
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{_content_key(source, mpp)}.tif"
    if target.is_file():
        return target
    log.info("%s: converting to a tiled pyramidal TIFF once (mpp %.4g) -> %s", source, mpp, target)
    started = time.perf_counter()
    rgb = read_plain_image(source)
    cache.mkdir(parents=True, exist_ok=True)
    write_pyramidal_tiff(target, rgb, mpp)
    log.info("%s: converted in %.1f s", source, time.perf_counter() - started)
    return target


def halve(rgb: np.ndarray, strip: int = 1024) -> np.ndarray:
    """2x2 box-filter reduction (odd edges averaged with themselves), in row strips so the temporaries stay
    small next to a whole-slide array."""
    height, width = rgb.shape[:2]
    out = np.empty(((height + 1) // 2, (width + 1) // 2, rgb.shape[2]), dtype=np.uint8)
    for top in range(0, height, 2 * strip):
        block = rgb[top : top + 2 * strip].astype(np.uint16)
        if block.shape[0] % 2:
            block = np.concatenate([block, block[-1:]], axis=0)
        if block.shape[1] % 2:
            block = np.concatenate([block, block[:, -1:]], axis=1)
        total = block[0::2, 0::2] + block[1::2, 0::2] + block[0::2, 1::2] + block[1::2, 1::2]
        out[top // 2 : top // 2 + total.shape[0]] = ((total + 2) // 4).astype(np.uint8)
    return out


def pyramid_levels(rgb: np.ndarray, tile: int = TILE_PX) -> list[np.ndarray]:
    """Full resolution then successive 2x reductions while the level still spans a tile."""
    levels = [rgb]
    while min(levels[-1].shape[:2]) >= 2 * tile:
        levels.append(halve(levels[-1]))
    return levels


def write_pyramidal_tiff(
    path: str | os.PathLike, rgb: np.ndarray, mpp: float, *, tile: int = TILE_PX, quality: int = 90
) -> Path:
    """Write ``rgb`` (H, W, 3 uint8) as a tiled JPEG pyramidal TIFF that openslide reads with ``mpp``.

    Levels are successive pages (reduced ones with subfiletype=1; SubIFDs would hide them from openslide),
    resolution in pixels per centimetre. Written to a temporary name and renamed: no half file is left.
    """
    import tifffile

    path = Path(path)
    value = check_mpp(mpp, str(path))
    assert value is not None
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise FedstError(f"{path}: expected an (H, W, 3) uint8 RGB array, got {rgb.shape} {rgb.dtype}")
    levels = pyramid_levels(rgb, tile)
    bigtiff = sum(level.nbytes for level in levels) > 2**31
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif:
            for index, level in enumerate(levels):
                px_per_cm = 1e4 / value / (rgb.shape[1] / level.shape[1])
                tif.write(
                    level,
                    photometric="rgb",
                    tile=(tile, tile),
                    compression="jpeg",
                    compressionargs={"level": quality},
                    subfiletype=1 if index else 0,
                    resolution=(px_per_cm, px_per_cm),
                    resolutionunit="CENTIMETER",
                    metadata=None,
                )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
