"""The spot prior SpaDiT refines: kNN cell->spot transfer with k chosen on validation genes, and honest priors.

Why: on the sc-spatial pairs the kNN baseline at k=10 is hard to beat, and the diffusion model trained from
scratch on ~100 genes (samples) cannot match it. SpaDiT therefore generates the *residual* of a gene's ST
z-scores over its kNN prior, and its prior must look the same at training and at test time: a test gene's
prior is computed from the measured genes only (the gene itself is not in the similarity), so a training
gene's prior is computed with its own fold of genes left out of the similarity too (``honest_priors``).
Without that, training priors would be better than test priors and the model would learn to trust them
more than it should.
"""

from __future__ import annotations

import numpy as np

from shared.downstream.spadit.baseline import knn_impute
from shared.downstream.spadit.data import GeneFrame, GeneSplit

K_GRID = (10, 20, 50, 100)
"""Candidate neighbourhood sizes for the prior (capped at the number of cells)."""


def gene_pcc(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-row Pearson correlation of (genes, spots) arrays; a constant row scores 0 (not NaN)."""
    p = pred - pred.mean(axis=1, keepdims=True)
    t = truth - truth.mean(axis=1, keepdims=True)
    denom = np.sqrt((p**2).sum(axis=1) * (t**2).sum(axis=1))
    return np.divide((p * t).sum(axis=1), denom, out=np.zeros(len(p)), where=denom > 0)


def choose_k(frame: GeneFrame, split: GeneSplit, default: int, grid: tuple[int, ...] = K_GRID) -> int:
    """The k whose kNN (similarity on the train genes only) best predicts the validation genes (mean PCC).

    Validation genes play the role of test genes: their ST values are never in the similarity. Without
    validation genes the ``default`` k is kept.
    """
    if len(split.val) == 0:
        return default
    n_cells = frame.sc_log.shape[1]
    truth = frame.st_log[split.val]
    scores = {}
    for k in sorted({min(k, n_cells) for k in grid}):
        pred = knn_impute(frame.st_log[split.train], frame.sc_log[split.train], frame.sc_log[split.val], k=k)
        scores[k] = float(gene_pcc(pred, truth).mean())
    return max(scores, key=lambda k: (scores[k], -k))


def honest_priors(frame: GeneFrame, split: GeneSplit, k: int, folds: int = 5, seed: int = 0) -> np.ndarray:
    """(genes, spots) log-scale kNN priors; no gene's own ST values enter the similarity that predicts it.

    Test genes (and genes the ST lacks): similarity over all measured genes, as for the kNN baseline.
    Measured genes: split into ``folds`` groups; each group is predicted from the similarity over the
    other measured genes (one kNN per group).
    """
    prior = knn_impute(frame.st_log[split.measured], frame.sc_log[split.measured], frame.sc_log, k=k)
    measured = np.random.default_rng(seed).permutation(split.measured)
    for group in np.array_split(measured, min(folds, len(measured))):
        rest = np.setdiff1d(split.measured, group)
        if len(group) == 0 or len(rest) == 0:
            continue
        prior[group] = knn_impute(frame.st_log[rest], frame.sc_log[rest], frame.sc_log[group], k=k)
    return prior
