"""The simple baseline SpaDiT must beat: map reference cells to spots on the shared genes, average them.

Tangram-like but without optimisation: each gene is standardised within its own modality (removing the
platform's per-gene bias), spots and cells are compared by cosine similarity over the measured genes, and a
spot's imputed value of a held-out gene is the mean over its ``k`` most similar cells.
"""

from __future__ import annotations

import numpy as np

from shared.errors import require


def knn_impute(
    st_measured: np.ndarray, sc_measured: np.ndarray, sc_targets: np.ndarray, k: int = 10, chunk: int = 4096
) -> np.ndarray:
    """Impute target genes on spots.

    st_measured (genes, spots) and sc_measured (genes, cells): the same measured genes, log-normalised;
    sc_targets (targets, cells): reference values of the genes to impute. Returns (targets, spots).
    """
    require(
        st_measured.shape[0] == sc_measured.shape[0] and st_measured.shape[0] > 0,
        f"kNN baseline: spatial and reference sides must share >= 1 measured gene "
        f"(got {st_measured.shape[0]} and {sc_measured.shape[0]})",
    )
    n_cells = sc_measured.shape[1]
    k = int(min(max(1, k), n_cells))

    def unit_profiles(m: np.ndarray) -> np.ndarray:
        std = m.std(axis=1, keepdims=True)
        z = (m - m.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
        norm = np.linalg.norm(z, axis=0, keepdims=True)
        return (z / np.where(norm > 0, norm, 1.0)).T  # (obs, genes), unit rows

    spots, cells = unit_profiles(st_measured), unit_profiles(sc_measured)
    out = np.empty((sc_targets.shape[0], spots.shape[0]))
    for start in range(0, spots.shape[0], chunk):
        sim = spots[start : start + chunk] @ cells.T  # (chunk, cells) cosine similarity
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        out[:, start : start + chunk] = sc_targets[:, top].mean(axis=2)
    return out
