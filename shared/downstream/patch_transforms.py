"""Transforms of the patches around an encoder: stain normalisation and test-time dihedral augmentation.

They wrap ``ImageEncoder.embed`` (``embed_patches``) so that encoders stay simple and every encoder gets them:

- ``stain_normalise``: each section's patches are mapped onto the consortium's reference H&E stains (Macenko,
  ``shared.store.stain``) before encoding. The source stains are fitted per section, because stain chemistry,
  section thickness and scanner vary between sections as well as sites; the reference is fixed, so training
  and prediction (where the new section is fitted on its own patches) land in the same colour space.
- ``tta``: the embedding is the mean over the 8 dihedral transforms (4 rotations x optional flip) of a patch.
  Tissue has no preferred orientation, so this removes orientation noise from the features; the mean over a
  group is exactly invariant under that group (a flipped or rotated patch gets the same features).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from shared.errors import FedstError, require

if TYPE_CHECKING:
    from shared.downstream.encoders import ImageEncoder

FIT_PIXELS = 1_000_000
"""Pixels drawn (seeded) from a section to fit its stains: enough for the 1 % angle percentiles, and bounded
memory (a 600-spot section of 224 px patches has 30 M pixels)."""
CHUNK = 64
"""Patches transformed at a time (the stain transform works in float64)."""


@dataclass(frozen=True)
class PatchTransforms:
    """Which transforms a predictor applies before its encoder (persisted in ``predictor.json``)."""

    stain_normalise: bool = False
    tta: bool = False

    def to_config(self) -> dict[str, bool]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None, source: str | Path = "patch_transforms") -> PatchTransforms:
        """From a saved dict (None: the defaults, as in files written before these options existed)."""
        if config is None:
            return cls()
        fields = set(cls.__dataclass_fields__)
        unknown = sorted(set(config) - fields)
        require(not unknown, f"{source}: unknown patch transform(s) {unknown} (expected {sorted(fields)})")
        for key, value in config.items():
            require(isinstance(value, bool), f"{source}: patch transform {key!r} is {value!r}, expected true/false")
        return cls(**config)

    @property
    def active(self) -> bool:
        return self.stain_normalise or self.tta


def dihedral_views(patches: np.ndarray) -> Iterator[np.ndarray]:
    """The 8 images of (N, P, P, 3) patches under the dihedral group D4: rotations by 0/90/180/270 degrees, then
    the same after a left-right flip."""
    for flipped in (patches, patches[:, :, ::-1]):
        for k in range(4):
            yield np.ascontiguousarray(np.rot90(flipped, k, axes=(1, 2)))


def stain_normalise_sections(patches: np.ndarray, sections: np.ndarray, seed: int = 0) -> np.ndarray:
    """Patches re-rendered with the reference stains, the source stains fitted on each section's patches."""
    from shared.store.stain import StainNormaliser

    patches = np.asarray(patches)
    sections = np.asarray(sections).astype(str)
    require(len(sections) == len(patches), "stain normalisation: patches and sections differ in length")
    out = np.empty_like(patches)
    rng = np.random.default_rng(seed)
    for section in dict.fromkeys(sections):
        rows = np.flatnonzero(sections == section)
        pixels = patches[rows].reshape(-1, 3)
        if len(pixels) > FIT_PIXELS:
            pixels = pixels[np.sort(rng.choice(len(pixels), FIT_PIXELS, replace=False))]
        try:
            normaliser = StainNormaliser.fit(pixels, seed=seed)
        except FedstError as exc:
            raise FedstError(f"section {str(section)!r} ({len(rows)} patches): {exc}") from None
        for start in range(0, len(rows), CHUNK):
            chunk = rows[start : start + CHUNK]
            out[chunk] = normaliser.transform(patches[chunk])
    return out


def embed_patches(
    encoder: ImageEncoder, patches: np.ndarray, sections: np.ndarray, transforms: PatchTransforms
) -> np.ndarray:
    """``encoder.embed`` of the patches after ``transforms`` (exactly ``encoder.embed`` when none is on)."""
    if transforms.stain_normalise:
        patches = stain_normalise_sections(patches, sections)
    if not transforms.tta:
        return encoder.embed(patches)
    total = None
    for view in dihedral_views(np.asarray(patches)):
        feats = encoder.embed(view).astype(np.float64)
        total = feats if total is None else total + feats
    return (total / 8.0).astype(np.float32)
