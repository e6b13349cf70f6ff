"""Where things are on a generated section: the Visium-like spot grid, the tissue outline, the type fields."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.synthetic import model

SPOT_PITCH_UM = 100.0
"""Centre-to-centre distance of neighbouring spots (Visium)."""
SPOT_DIAMETER_UM = 55.0
FIELD_CELL_UM = 8.0
"""Resolution of the type fields (one value per 8 x 8 um)."""
MARGIN_UM = 160.0


@dataclass
class Layout:
    width: int  # image pixels
    height: int
    mpp: float
    spots: np.ndarray  # (n, 2) float, x = column, y = row, full-resolution px; only spots on tissue
    array_rc: np.ndarray  # (n, 2) int, Visium array row / column
    tissue: np.ndarray  # (height // cell, width // cell) bool at field resolution
    proportions: np.ndarray  # (K, fh, fw) type proportions at field resolution (sum 1 over K)
    orientation: np.ndarray  # (fh, fw) fibre angle in radians

    @property
    def cell_px(self) -> float:
        return FIELD_CELL_UM / self.mpp

    def field_index(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Field-grid (row, col) of image pixel positions."""
        fh, fw = self.tissue.shape
        rows = np.clip((y / self.cell_px).astype(int), 0, fh - 1)
        cols = np.clip((x / self.cell_px).astype(int), 0, fw - 1)
        return rows, cols


def hex_grid(n_rows: int, n_cols: int, pitch_px: float, origin: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Visium layout: rows pitch*sqrt(3)/2 apart, odd rows shifted by half a pitch. Returns (xy, array_rc)."""
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    x = origin[0] + cols * pitch_px + (rows % 2) * pitch_px / 2
    y = origin[1] + rows * pitch_px * np.sqrt(3) / 2
    xy = np.stack([x.ravel(), y.ravel()], axis=1).astype(np.float64)
    # Visium array columns are even on even rows and odd on odd rows
    rc = np.stack([rows.ravel(), 2 * cols.ravel() + rows.ravel() % 2], axis=1)
    return xy, rc


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise, standardised to mean 0, sd 1."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.normal(size=shape), sigma=sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-12)


def make_layout(
    rng: np.random.Generator,
    *,
    n_rows: int = 17,
    n_cols: int = 15,
    mpp: float = 1.0,
    type_bias: np.ndarray | None = None,
) -> Layout:
    """A tissue blob over a hex grid of spots, with smooth type domains; spots off tissue are dropped."""
    from scipy.ndimage import zoom

    k = len(model.CELL_TYPES)
    pitch = SPOT_PITCH_UM / mpp
    margin = MARGIN_UM / mpp
    width = int(np.ceil(2 * margin + (n_cols - 0.5) * pitch))
    height = int(np.ceil(2 * margin + (n_rows - 1) * pitch * np.sqrt(3) / 2))
    cell = FIELD_CELL_UM / mpp
    fh, fw = int(np.ceil(height / cell)), int(np.ceil(width / cell))

    # tissue: an ellipse whose radius wobbles with a smooth field, so outlines are irregular
    yy, xx = np.mgrid[0:fh, 0:fw].astype(np.float64)
    cy, cx = fh / 2, fw / 2
    ry, rx = fh / 2 - 0.8 * margin / cell, fw / 2 - 0.8 * margin / cell
    radius = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    wobble = smooth_field(rng, (fh, fw), sigma=200.0 / FIELD_CELL_UM)
    tissue = radius < 0.97 + 0.10 * wobble

    bias = np.zeros(k) if type_bias is None else np.asarray(type_bias, dtype=np.float64)
    sigma = model.DOMAIN_SIGMA_UM / FIELD_CELL_UM
    logits = np.stack([smooth_field(rng, (fh, fw), sigma) for _ in range(k)])
    logits = model.DOMAIN_TEMPERATURE * logits + bias[:, None, None]
    logits -= logits.max(axis=0, keepdims=True)
    proportions = np.exp(logits)
    proportions /= proportions.sum(axis=0, keepdims=True)

    # fibre orientation: a slowly varying angle field
    angle_lo = smooth_field(rng, (max(2, fh // 8), max(2, fw // 8)), sigma=2.0)
    orientation = zoom(angle_lo, (fh / angle_lo.shape[0], fw / angle_lo.shape[1]), order=1)[:fh, :fw] * 1.2

    xy, rc = hex_grid(n_rows, n_cols, pitch, origin=(margin, margin))
    layout = Layout(width, height, mpp, xy, rc, tissue, proportions, orientation)
    rows, cols = layout.field_index(xy[:, 0], xy[:, 1])
    keep = tissue[rows, cols]
    layout.spots, layout.array_rc = xy[keep], rc[keep]
    return layout


def spot_mixtures(layout: Layout) -> np.ndarray:
    """(n_spots, K) mean type proportions over each spot's 55 um disk."""
    radius = SPOT_DIAMETER_UM / 2 / layout.mpp
    cell = layout.cell_px
    offsets = np.arange(-radius, radius + 1e-9, cell / 2)
    ox, oy = np.meshgrid(offsets, offsets)
    inside = ox**2 + oy**2 <= radius**2
    ox, oy = ox[inside], oy[inside]
    x = layout.spots[:, 0:1] + ox[None, :]
    y = layout.spots[:, 1:2] + oy[None, :]
    rows, cols = layout.field_index(x, y)
    mix = layout.proportions[:, rows, cols].mean(axis=2).T
    return mix / mix.sum(axis=1, keepdims=True)
