"""A store holding a subset of another store's spots (and tiles): training-only views, data-limited subsets.

Written to disk because every consumer (adaptation, synthesis, predictors) reads stores by path; reused when
the folder already holds a subset made from the same parent files and rows.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np

from shared import keys
from shared.store.format import PatchStore, StoreWriter, is_store


def subset_store(
    store: PatchStore, rows: np.ndarray, out: Path, *, tile_sections: Sequence[str] | None = (), note: str = ""
) -> PatchStore:
    """Write a store holding the spot rows ``rows`` of ``store`` (and the tiles of ``tile_sections``; None = all).

    Reused when ``out`` is already a store made from the same rows (checked through the manifest).
    """
    rows = np.asarray(rows, dtype=np.int64)
    tag = {
        "parent": str(store.path),
        "parent_files": store.manifest.get("files", {}),
        "n_rows": int(len(rows)),
        "rows_sha": _hash_rows(rows),
        "tile_sections": None if tile_sections is None else list(tile_sections),
    }
    if is_store(out):
        existing = PatchStore(out)
        if existing.manifest.get("provenance", {}).get("subset_of") == tag:
            return existing
    spots = store.spots[rows].copy()
    patch_rows = spots.obs[keys.PATCH_INDEX].to_numpy().astype(np.int64)
    table = store.tile_table
    if tile_sections is None:
        tile_mask = np.ones(len(table), dtype=bool)
    else:
        tile_mask = table[keys.SECTION].astype(str).isin([str(s) for s in tile_sections]).to_numpy()
    tile_rows = np.flatnonzero(tile_mask)
    with StoreWriter(out, patch_px=store.patch_px) as writer:
        patches = writer.allocate_patches(len(rows))
        if len(rows):
            patches[:] = store.patches[patch_rows]
        tiles = writer.allocate_tiles(len(tile_rows))
        if len(tile_rows):
            tiles[:] = store.tiles[tile_rows]
        spots.obs[keys.PATCH_INDEX] = np.arange(len(rows), dtype=np.int64)
        writer.set_spots(spots)
        writer.set_tile_table(table.iloc[tile_rows].reset_index(drop=True))
        writer.manifest["params"].update({k: v for k, v in store.manifest.get("params", {}).items() if k != "patch_px"})
        writer.manifest["provenance"] = {**store.manifest.get("provenance", {}), "subset_of": tag, "note": note}
        writer.manifest["synthetic"] = store.synthetic
    return PatchStore(out)


def _hash_rows(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]
