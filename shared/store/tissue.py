"""Where the tissue is: a mask on a slide thumbnail and a tile grid over it.

Unlabeled tiles feed generative pretraining, so they must show tissue, not glass: stained tissue is
saturated (pink/purple) while glass and the slide background are grey-white. Otsu on the HSV saturation of
a thumbnail separates the two; the threshold is clamped so that a slide that is almost all tissue (where
Otsu would split tissue into light and dark) or almost all glass (where it would split noise) still works.
"""

from __future__ import annotations

import numpy as np

SATURATION_BOUNDS = (0.04, 0.15)
"""The Otsu threshold on saturation is clamped into this range (glass < 0.04 < tissue ~ 0.15-0.6)."""
MIN_TISSUE_FRACTION = 0.5
"""A tile is kept when at least this share of its area is tissue on the mask."""


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold maximising the between-class variance of ``values`` (Otsu 1979)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or values.min() == values.max():
        return float(values.min()) if values.size else 0.0
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight0 = np.cumsum(hist)
    weight1 = weight0[-1] - weight0
    sum0 = np.cumsum(hist * centres)
    mean0 = sum0 / np.maximum(weight0, 1)
    mean1 = (sum0[-1] - sum0) / np.maximum(weight1, 1)
    between = weight0 * weight1 * (mean0 - mean1) ** 2
    return float(edges[1:][np.argmax(between[:-1])])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of an (H, W, 3) uint8 image."""
    rgb = rgb.astype(np.float32) / 255.0
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)


def tissue_mask(thumbnail: np.ndarray, *, min_object_frac: float = 0.002) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: Otsu on saturation, then close, fill holes, drop specks."""
    from scipy import ndimage

    sat = saturation(thumbnail)
    threshold = float(np.clip(otsu_threshold(sat), *SATURATION_BOUNDS))
    dark = thumbnail.max(axis=2) < 30  # pen marks / black borders are not tissue
    mask = (sat > threshold) & ~dark
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2)
    mask = ndimage.binary_fill_holes(mask)
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3)))
    labels, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= min_object_frac * mask.size) + 1
        mask = np.isin(labels, keep)
    return mask


def tile_grid(
    mask: np.ndarray,
    scale: float,
    tile_px: float,
    width: int,
    height: int,
    *,
    max_tiles: int | None = None,
    min_fraction: float = MIN_TISSUE_FRACTION,
) -> np.ndarray:
    """(n, 2) tile centres (x, y) in level-0 px on a non-overlapping grid of ``tile_px``-wide squares whose
    mask coverage is >= ``min_fraction``. ``scale`` = thumbnail px per level-0 px. With ``max_tiles``, an
    evenly spaced (deterministic, spatially spread) subset in row-major order is kept."""
    nx, ny = int(width // tile_px), int(height // tile_px)
    if nx == 0 or ny == 0 or not mask.any():
        return np.zeros((0, 2), dtype=np.float64)
    # mask coverage per tile: integral image over the thumbnail
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    mh, mw = mask.shape
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
    x0 = np.clip(np.floor(gx * tile_px * scale).astype(int), 0, mw)
    x1 = np.clip(np.ceil((gx + 1) * tile_px * scale).astype(int), 0, mw)
    y0 = np.clip(np.floor(gy * tile_px * scale).astype(int), 0, mh)
    y1 = np.clip(np.ceil((gy + 1) * tile_px * scale).astype(int), 0, mh)
    x1, y1 = np.maximum(x1, x0 + 1).clip(max=mw), np.maximum(y1, y0 + 1).clip(max=mh)
    area = np.maximum((x1 - x0) * (y1 - y0), 1)
    covered = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    keep = (covered / area) >= min_fraction
    centres = np.stack([(gx[keep] + 0.5) * tile_px, (gy[keep] + 0.5) * tile_px], axis=1).astype(np.float64)
    if max_tiles is not None and len(centres) > max_tiles:
        chosen = np.unique(np.linspace(0, len(centres) - 1, num=max(int(max_tiles), 0)).round().astype(int))
        centres = centres[chosen] if max_tiles > 0 else centres[:0]
    return centres
