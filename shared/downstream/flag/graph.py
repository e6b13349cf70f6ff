"""FLAG's spatial graph: a section tiled into square crops, each crop a fully connected graph of its spots.

Edge conditions (the paper's equation; its released default config ignores them, here a switch):
  - Gaussian distance kernel exp(-d^2 / (2 sigma^2)), sigma = 224 px at the reference 0.5 um/px;
  - cosine similarity of the two spots' image features.
Crop size and sigma are given in pixels at ``REFERENCE_MPP`` and rescaled to the section's own mpp, so the
graph covers the same tissue area whatever the scan resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import require

REFERENCE_MPP = 0.5
DEFAULT_CROP_PX = 2048.0
DEFAULT_SIGMA_PX = 224.0
N_EDGE_CONDITIONS = 2


@dataclass(frozen=True)
class Crop:
    """Spots of one crop: row indices into the caller's spot arrays."""

    section: str
    index: np.ndarray


def tile_crops(
    coords: np.ndarray,
    sections: np.ndarray,
    mpp: dict[str, float] | float | None = None,
    crop_px: float = DEFAULT_CROP_PX,
    max_spots: int | None = None,
) -> list[Crop]:
    """Partition spots into crops of ``crop_px`` (at REFERENCE_MPP) per section; never mixes sections.

    ``max_spots`` splits an over-full crop into consecutive chunks (ordered by y then x) so attention memory
    stays bounded on dense platforms.
    """
    coords = np.asarray(coords, dtype=np.float64)
    sections = np.asarray(sections).astype(str)
    require(coords.ndim == 2 and coords.shape[1] == 2, f"coords: expected (N, 2), got {coords.shape}")
    require(len(coords) == len(sections), "coords and sections differ in length")
    crops: list[Crop] = []
    for section in dict.fromkeys(sections):
        rows = np.flatnonzero(sections == section)
        size = crop_px * REFERENCE_MPP / _mpp_of(mpp, section)
        xy = coords[rows]
        cell = np.floor((xy - xy.min(0)) / size).astype(np.int64)
        keys = cell[:, 1] * (cell[:, 0].max() + 1) + cell[:, 0]
        for key in np.unique(keys):
            members = rows[keys == key]
            order = np.lexsort((coords[members, 0], coords[members, 1]))
            members = members[order]
            step = max_spots or len(members)
            for start in range(0, len(members), step):
                crops.append(Crop(section=str(section), index=members[start : start + step]))
    return crops


def _mpp_of(mpp: dict[str, float] | float | None, section: str) -> float:
    if mpp is None:
        return REFERENCE_MPP
    if isinstance(mpp, dict):
        return float(mpp.get(section, REFERENCE_MPP))
    return float(mpp)


def edge_conditions(coords: np.ndarray, features: np.ndarray, sigma_px: float, use: bool = True) -> np.ndarray:
    """(n, n, 2) float32: [Gaussian distance kernel, feature cosine similarity]; zeros when ``use`` is off.

    Pass standardised features (the FLAG model z-scores them with training statistics): raw post-ReLU
    features are all non-negative and their cosine is ~1 for every pair, which carries no information.
    """
    n = len(coords)
    if not use:
        return np.zeros((n, n, N_EDGE_CONDITIONS), dtype=np.float32)
    xy = np.asarray(coords, dtype=np.float64)
    d2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    kernel = np.exp(-d2 / (2.0 * sigma_px**2))
    f = np.asarray(features, dtype=np.float64)
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    unit = f / np.where(norm == 0, 1.0, norm)
    cosine = unit @ unit.T
    return np.stack([kernel, cosine], axis=-1).astype(np.float32)


def sigma_for(mpp: dict[str, float] | float | None, section: str, sigma_px: float = DEFAULT_SIGMA_PX) -> float:
    """The kernel width in the section's own pixels."""
    return sigma_px * REFERENCE_MPP / _mpp_of(mpp, section)
