"""Torch-side views of patch stores: images for pretraining, (patch, expression, mask) pairs for adaptation.

Images are float (3, P, P) in [-1, 1] at the model resolution (area-resized when the store's patch size
differs). Augmentation suited to H&E (orientation carries no meaning; staining varies between labs):
random flips, 90-degree rotations and a mild per-channel stain jitter, all drawn from an explicit generator.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from shared import keys
from shared.arrays import dense
from shared.downstream.colour_features import to_unit_images
from shared.errors import FedstError
from shared.store.format import PatchStore


def augment(x: torch.Tensor, generator: torch.Generator, stain_jitter: float = 0.05) -> torch.Tensor:
    """Random flips, 90-degree rotations and mild per-channel scale/shift, per image."""
    b = x.shape[0]
    flips = torch.rand(b, generator=generator) < 0.5
    rots = torch.randint(0, 4, (b,), generator=generator)
    out = torch.where(flips[:, None, None, None], x.flip(-1), x)
    out = torch.stack([torch.rot90(img, int(k), dims=(-2, -1)) for img, k in zip(out, rots)])
    if stain_jitter > 0:
        scale = 1 + (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1) * stain_jitter
        shift = (torch.rand(b, 3, 1, 1, generator=generator) * 2 - 1) * stain_jitter
        out = ((out + 1) * scale - 1 + shift).clamp(-1, 1)
    return out


class PretrainImages:
    """Every unlabeled tile and spot patch of several stores, addressable by one flat index."""

    def __init__(self, stores: Sequence[PatchStore], px: int, use_patches: bool = True):
        self.px = px
        self.arrays = []
        for store in stores:
            if store.n_tiles:
                self.arrays.append(store.tiles)
            if use_patches and store.n_spots:
                self.arrays.append(store.patches)
        self.offsets = np.cumsum([0] + [len(a) for a in self.arrays])
        if self.offsets[-1] == 0:
            names = ", ".join(str(s.path) for s in stores)
            raise FedstError(f"no tiles or patches to pretrain on in {names}")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        idx = indices.numpy()
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        rows = [np.asarray(self.arrays[w][i - self.offsets[w]]) for w, i in zip(which, idx)]
        return to_unit_images(np.stack(rows), self.px)


def expression_and_mask(store: PatchStore) -> tuple[np.ndarray, np.ndarray]:
    """Dense float32 normalised expression and measured mask (all ones when the store has no mask)."""
    spots = store.spots
    x = spots.X
    x = dense(x, np.float32)
    if keys.MEASURED in spots.layers:
        m = spots.layers[keys.MEASURED]
        m = dense(m, np.float32)
    else:
        m = np.ones_like(x)
    if not np.isfinite(x).all():
        raise FedstError(f"{store.path}: spots.h5ad X holds non-finite expression values")
    return x * m, m


class PairedSpots(torch.utils.data.Dataset):
    """(patch, expression, mask) for every spot of a store, in the order of the spot table."""

    def __init__(self, store: PatchStore, px: int, panel: Sequence[str] | None = None):
        if store.n_spots == 0:
            raise FedstError(f"{store.path}: store has no paired spots (adaptation needs patch + expression pairs)")
        if panel is not None and list(panel) != store.panel:
            raise FedstError(
                f"{store.path}: gene panel ({len(store.panel)} genes, first {store.panel[:3]}) differs from the "
                f"model's panel ({len(panel)} genes, first {list(panel)[:3]})"
            )
        self.store = store
        self.px = px
        self.expression, self.mask = expression_and_mask(store)
        self.patch_rows = store.spots.obs[keys.PATCH_INDEX].to_numpy().astype(np.int64)
        self.patches = store.patches

    def __len__(self) -> int:
        return len(self.patch_rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        img = to_unit_images(np.asarray(self.patches[self.patch_rows[i]])[None], self.px)[0]
        return img, torch.from_numpy(self.expression[i]), torch.from_numpy(self.mask[i])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = indices.numpy()
        imgs = to_unit_images(np.stack([np.asarray(self.patches[r]) for r in self.patch_rows[idx]]), self.px)
        return imgs, torch.from_numpy(self.expression[idx]), torch.from_numpy(self.mask[idx])
