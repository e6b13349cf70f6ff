"""Macenko stain normalisation: map a site's H&E colours onto a reference stain matrix.

Sites differ in stain chemistry and scanner, which shifts every colour a model sees. Macenko et al. (2009)
estimate the two stain vectors from the image itself (the extreme angles of optical-density pixels in
their principal plane), so the estimate does not depend on how much of each tissue type a site has,
unlike matching colour means. Fit once per site on many patches, then transform each patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.errors import require

REFERENCE_STAINS = np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]])
"""Reference H and E optical-density vectors (rows), the usual Macenko reference."""
REFERENCE_MAX_CONCENTRATION = np.array([1.9705, 1.0308])
"""99th-percentile H and E concentrations of the reference."""
LIGHT = 255.0


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) optical density -log((I + 1) / 256) of uint8 RGB."""
    return -np.log((rgb.astype(np.float64) + 1.0) / (LIGHT + 1.0))


@dataclass(frozen=True)
class StainNormaliser:
    """A fitted source stain matrix and concentration scale; ``transform`` re-renders with the reference."""

    stains: np.ndarray  # (2, 3) unit OD vectors of the source, hematoxylin first
    max_concentration: np.ndarray  # (2,) 99th percentiles of the source concentrations

    @classmethod
    def fit(
        cls,
        images: np.ndarray,
        *,
        od_threshold: float = 0.15,
        alpha: float = 1.0,
        max_pixels: int = 200_000,
        seed: int = 0,
    ) -> StainNormaliser:
        """Estimate the source stains from (..., 3) uint8 pixels (e.g. all patches of a site)."""
        od = optical_density(np.asarray(images).reshape(-1, 3))
        od = od[(od > od_threshold).all(axis=1)]
        require(len(od) >= 100, f"stain normalisation: only {len(od)} stained pixels (need >= 100; is it tissue?)")
        if len(od) > max_pixels:
            od = od[np.random.default_rng(seed).choice(len(od), max_pixels, replace=False)]
        _, vectors = np.linalg.eigh(np.cov(od.T))
        plane = vectors[:, [2, 1]]  # two largest eigenvalues
        plane[:, 0] *= np.sign(plane[:, 0].sum()) or 1.0
        plane[:, 1] *= np.sign(plane[:, 1].sum()) or 1.0
        projected = od @ plane
        angles = np.arctan2(projected[:, 1], projected[:, 0])
        low, high = np.percentile(angles, [alpha, 100 - alpha])
        v1 = plane @ np.array([np.cos(low), np.sin(low)])
        v2 = plane @ np.array([np.cos(high), np.sin(high)])
        # hematoxylin absorbs more red than eosin: it is the vector with the larger first (R) component
        stains = np.array([v1, v2] if v1[0] > v2[0] else [v2, v1])
        stains = np.abs(stains) / np.linalg.norm(stains, axis=1, keepdims=True)
        concentrations = np.linalg.lstsq(stains.T, od.T, rcond=None)[0]
        return cls(stains=stains, max_concentration=np.percentile(concentrations, 99, axis=1))

    def transform(self, images: np.ndarray) -> np.ndarray:
        """The same pixels as if stained with the reference stains and concentration scale (uint8)."""
        images = np.asarray(images)
        od = optical_density(images.reshape(-1, 3))
        concentrations = np.linalg.lstsq(self.stains.T, od.T, rcond=None)[0]
        concentrations *= (REFERENCE_MAX_CONCENTRATION / np.maximum(self.max_concentration, 1e-6))[:, None]
        rgb = (LIGHT + 1.0) * np.exp(-(REFERENCE_STAINS.T @ concentrations)) - 1.0
        return np.clip(np.rint(rgb.T), 0, 255).astype(np.uint8).reshape(images.shape)
