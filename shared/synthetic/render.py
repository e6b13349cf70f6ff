"""Painting the H&E image: nuclei as hematoxylin ellipses on eosin stroma, combined by Beer-Lambert.

The image is built in optical-density space (OD = H * h_vector + E * e_vector), so a site's stain effect is
exactly a change of the two stain vectors and intensities, which is what stain normalisation undoes.
"""

from __future__ import annotations

import numpy as np

from shared.synthetic import model
from shared.synthetic.layout import Layout

BACKGROUND_OD = 0.03
"""Glass: almost white."""
STAMP_CHUNK = 4096


def sample_nuclei(rng: np.random.Generator, layout: Layout) -> dict[str, np.ndarray]:
    """Nuclei of each type as a thinned Poisson process with intensity density_k * proportion_k(x)."""
    types = model.CELL_TYPES
    densities = np.array([t.density for t in types]) / 1000.0 * layout.mpp**2  # per px^2
    max_density = densities.max()
    n_candidates = rng.poisson(max_density * layout.width * layout.height)
    x = rng.uniform(0, layout.width, n_candidates)
    y = rng.uniform(0, layout.height, n_candidates)
    rows, cols = layout.field_index(x, y)
    on_tissue = layout.tissue[rows, cols]
    x, y, rows, cols = x[on_tissue], y[on_tissue], rows[on_tissue], cols[on_tissue]
    # type from the local proportions, then accept with density_k / max_density
    probs = layout.proportions[:, rows, cols].T  # (n, K)
    cumulative = np.cumsum(probs, axis=1)
    draw = rng.uniform(size=(len(x), 1))
    kind = np.minimum((draw > cumulative).sum(axis=1), len(types) - 1)
    keep = rng.uniform(size=len(x)) < densities[kind] / max_density
    x, y, kind, rows, cols = x[keep], y[keep], kind[keep], rows[keep], cols[keep]

    radius = np.array([t.radius_um for t in types])[kind] / layout.mpp * np.exp(rng.normal(0, 0.15, len(x)))
    elongation = np.array([t.elongation for t in types])[kind] * np.exp(rng.normal(0, 0.12, len(x)))
    aligned = np.array([t.aligned for t in types])[kind]
    angle = np.where(
        aligned, layout.orientation[rows, cols] + rng.normal(0, 0.25, len(x)), rng.uniform(0, np.pi, len(x))
    )
    hema = np.array([t.hematoxylin for t in types])[kind] * np.exp(rng.normal(0, 0.1, len(x)))
    return {
        "x": x,
        "y": y,
        "kind": kind,
        "a": radius * np.sqrt(elongation),
        "b": radius / np.sqrt(elongation),
        "angle": angle,
        "hematoxylin": hema,
    }


def paint_nuclei(nuclei: dict[str, np.ndarray], height: int, width: int) -> np.ndarray:
    """(height, width) hematoxylin OD: each nucleus a soft-edged filled ellipse, overlaps add.

    Vectorised per stamp size (nuclei grouped by the half-width their major axis needs), so small dense
    immune nuclei do not pay for the stamp of the largest muscle nucleus.
    """
    hema = np.zeros(height * width, dtype=np.float64)
    halves = np.ceil(nuclei["a"]).astype(np.int64) + 1
    for half in np.unique(halves):
        chosen = np.flatnonzero(halves == half)
        offsets = np.arange(-half, half + 1, dtype=np.float32)
        oy, ox = np.meshgrid(offsets, offsets, indexing="ij")
        for start in range(0, len(chosen), STAMP_CHUNK):
            idx = chosen[start : start + STAMP_CHUNK]
            x, y = nuclei["x"][idx], nuclei["y"][idx]
            x0, y0 = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
            dx = ox[None] - (x - x0).astype(np.float32)[:, None, None]
            dy = oy[None] - (y - y0).astype(np.float32)[:, None, None]
            angle = nuclei["angle"][idx].astype(np.float32)
            cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
            u = (dx * cos + dy * sin) / nuclei["a"][idx].astype(np.float32)[:, None, None]
            v = (dy * cos - dx * sin) / nuclei["b"][idx].astype(np.float32)[:, None, None]
            inside = np.clip((1.0 - (u * u + v * v)) * 3.0, 0.0, 1.0)  # soft rim ~1/3 of the radius
            value = inside * nuclei["hematoxylin"][idx].astype(np.float32)[:, None, None]
            px = x0[:, None, None] + ox.astype(np.int64)[None]
            py = y0[:, None, None] + oy.astype(np.int64)[None]
            valid = (value > 0) & (px >= 0) & (px < width) & (py >= 0) & (py < height)
            hema += np.bincount((py * width + px)[valid], weights=value[valid], minlength=height * width)
    return np.minimum(hema, 2.0).reshape(height, width).astype(np.float32)


def stroma_eosin(rng: np.random.Generator, layout: Layout) -> np.ndarray:
    """(height, width) eosin OD: type-weighted eosin level times a fibrous texture, 0 off tissue."""
    from scipy.ndimage import gaussian_filter

    types = model.CELL_TYPES
    level = np.tensordot(np.array([t.eosin for t in types]), layout.proportions, axes=1)
    level = np.where(layout.tissue, level, 0.0)
    texture = np.tensordot(np.array([t.texture for t in types]), layout.proportions, axes=1)
    level, texture = (_upsample(f, layout.height, layout.width) for f in (level, texture))
    fibres = gaussian_filter(rng.standard_normal((layout.height, layout.width), dtype=np.float32), sigma=(1.0, 4.0))
    fibres /= fibres.std() + 1e-12
    return (level * np.clip(1.0 + texture * fibres, 0.05, 3.0)).astype(np.float32)


def _upsample(field: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a field-resolution map to exactly (height, width) image pixels (PIL: fast)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def compose(hema: np.ndarray, eosin: np.ndarray, effects: model.SiteEffects, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 by Beer-Lambert: I = 255 * exp(-(H h + E e + background)), plus mild optical blur and noise."""
    from scipy.ndimage import gaussian_filter

    eosin = eosin * (1.0 - 0.6 * np.minimum(hema, 1.0))  # nuclei displace cytoplasm / stroma
    hema = gaussian_filter(hema, sigma=0.6)
    eosin = gaussian_filter(eosin, sigma=0.6)
    h_vec = (effects.stain[0] * effects.stain_scale[0]).astype(np.float32)
    e_vec = (effects.stain[1] * effects.stain_scale[1]).astype(np.float32)
    rgb = np.empty((*hema.shape, 3), dtype=np.uint8)
    for c in range(3):
        channel = 255.0 * np.exp(-(hema * h_vec[c] + eosin * e_vec[c] + np.float32(BACKGROUND_OD)))
        channel += rng.standard_normal(hema.shape, dtype=np.float32) * np.float32(3.0)
        rgb[..., c] = np.clip(np.rint(channel), 0, 255)
    return rgb


def render_section(rng: np.random.Generator, layout: Layout, effects: model.SiteEffects) -> tuple[np.ndarray, int]:
    """The section's RGB image and its number of nuclei."""
    nuclei = sample_nuclei(rng, layout)
    hema = paint_nuclei(nuclei, layout.height, layout.width)
    eosin = stroma_eosin(rng, layout)
    return compose(hema, eosin, effects, rng), len(nuclei["x"])
