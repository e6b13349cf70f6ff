"""One imputation run: pair genes, split, train SpaDiT, sample the held-out genes, run the kNN baseline on
the same split, and score both against the truth where it exists.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from shared import keys
from shared.downstream.spadit.data import (
    GeneSplit,
    dense_counts,
    frame_genes,
    log_normalise,
    pair_genes,
    split_genes,
    unscale,
    zscore_rows,
)

if TYPE_CHECKING:
    from anndata import AnnData

    from shared.downstream.spadit.model import SpaDiT
    from shared.downstream.spadit.train import TrainHistory

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = {"tiny": 300, "base": 600}
METHODS = ("spadit", "knn")


@dataclass
class ImputationResult:
    """Imputed genes on the ST spots, log-normalised (log1p per 10k over the measured genes)."""

    genes: list[str]
    has_truth: np.ndarray  # (genes,) bool
    predictions: dict[str, np.ndarray]  # method -> (spots, genes)
    truth: np.ndarray  # (spots, genes), NaN columns where the ST lacks the gene
    metrics: dict[str, dict[str, float]]  # method -> metric -> value (over genes with truth)
    timings: dict[str, float]
    params: dict
    split: GeneSplit
    train_genes: list[str]
    model: SpaDiT
    history: TrainHistory
    per_gene: dict[str, dict[str, list[float | None]]] = field(default_factory=dict)


def reference_matrix(sc: AnnData, max_genes: int = 2000) -> np.ndarray:
    """The whole reference as (genes, cells) per-gene z-scores of log-normalised counts, top-variance capped."""
    log_norm = log_normalise(dense_counts(sc, "reference input")).T
    if log_norm.shape[0] > max_genes:
        keep = np.sort(np.argsort(-log_norm.var(axis=1), kind="stable")[:max_genes])
        log_norm = log_norm[keep]
    return zscore_rows(log_norm)[0]


def spatial_order(coords: np.ndarray | None, n: int) -> np.ndarray:
    """Spot permutation along a Z-order (Morton) curve, so consecutive spots (one token) are neighbours."""
    if coords is None:
        return np.arange(n)
    xy = np.asarray(coords, dtype=np.float64)[:, :2]
    span = np.ptp(xy, axis=0)
    grid = ((xy - xy.min(axis=0)) / np.where(span > 0, span, 1.0) * 1023).astype(np.int64)
    code = np.zeros(n, dtype=np.int64)
    for bit in range(10):
        code |= ((grid[:, 0] >> bit) & 1) << (2 * bit)
        code |= ((grid[:, 1] >> bit) & 1) << (2 * bit + 1)
    return np.argsort(code, kind="stable")


def cell_order(sc: AnnData) -> np.ndarray:
    """Reference cells grouped by type (when annotated), so one token holds cells of one type."""
    from shared.downstream.spadit.loaders import CELL_TYPE

    if CELL_TYPE in sc.obs:
        return np.argsort(sc.obs[CELL_TYPE].astype(str).to_numpy(), kind="stable")
    return np.arange(sc.n_obs)


def evaluate(pred: np.ndarray, truth: np.ndarray) -> tuple[dict[str, float], dict[str, list[float | None]]]:
    """Metrics of (spots, genes) predictions vs truth (one slide) from shared.downstream.metrics.

    pcc = per gene across spots, mean over genes; ssim = global 1-D SSIM on min-max-normalised genes;
    rmse = on min-max-normalised genes; js_divergence = base-2 JS divergence of the per-gene distributions.
    """
    from shared.downstream import metrics as m

    summary = {
        "pcc": m.pcc_per_slide_mean(pred, truth),
        "ssim": m.ssim(pred, truth),
        "rmse": m.rmse_minmax(pred, truth),
        "js_divergence": m.js_divergence(pred, truth),
    }
    per_gene = {"pcc": [None if np.isnan(v) else float(v) for v in m.pcc_per_gene(pred, truth)]}
    return {k: float(v) for k, v in summary.items()}, per_gene


BLEND_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def choose_blend(prior: np.ndarray, residual: np.ndarray, truth: np.ndarray) -> float:
    """Weight of the generated residual over the prior that maximises mean PCC on the validation genes.

    0 means the diffusion model did not help on genes it never trained on (the output is then the prior);
    without validation genes the full residual (1) is used.
    """
    from shared.downstream.spadit.prior import gene_pcc

    if len(prior) == 0:
        return 1.0
    scores = {w: float(gene_pcc(prior + w * residual, truth).mean()) for w in BLEND_GRID}
    return max(scores, key=lambda w: (scores[w], w))


def run_imputation(
    st: AnnData,
    sc: AnnData,
    *,
    genes: list[str] | None = None,
    holdout_fraction: float | None = None,
    preset: str = "tiny",
    epochs: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    k: int = 10,
    steps: int = 50,
    n_samples: int = 4,
    batch_size: int = 32,
    lr: float = 1e-3,
    device: str = "cpu",
    max_ref_genes: int = 2000,
    model_overrides: dict | None = None,
    progress: bool = True,
    prior_k: int | None = None,
    residual: bool = True,
) -> ImputationResult:
    """Impute ``genes`` (or a seeded ``holdout_fraction`` of the shared genes) with SpaDiT and kNN.

    ``k`` is the kNN baseline's; SpaDiT's prior uses ``prior_k`` (None: chosen on the validation genes).
    ``residual``: generate the departure from the prior (default) instead of the ST z-scores themselves.
    """
    timings: dict[str, float] = {}
    paired = pair_genes(st, sc, targets=genes)
    split = split_genes(
        paired,
        targets=genes,
        holdout_fraction=None if genes else holdout_fraction,
        val_fraction=val_fraction,
        seed=seed,
    )
    import torch

    from shared.downstream.spadit.baseline import knn_impute
    from shared.downstream.spadit.model import create_spadit
    from shared.downstream.spadit.prior import choose_k, honest_priors
    from shared.downstream.spadit.train import sample_genes, train_spadit

    frame = frame_genes(paired, split)
    reference = reference_matrix(sc, max_ref_genes)
    spot_perm = spatial_order(st.obsm.get(keys.SPATIAL), st.n_obs)
    cells = cell_order(sc)
    reference = reference[:, cells]
    sc_z = frame.sc_z[:, cells]
    st_z = frame.st_z[:, spot_perm]
    t0 = time.perf_counter()
    knn_all = knn_impute(frame.st_log[split.measured], frame.sc_log[split.measured], frame.sc_log, k=k)
    timings["knn_s"] = time.perf_counter() - t0
    prior_k = choose_k(frame, split, default=k) if prior_k is None else prior_k
    prior_log = honest_priors(frame, split, prior_k, seed=seed)  # reference values carried to spots
    prior = zscore_rows(prior_log[:, spot_perm])[0]  # (genes, spots) in the model's spot order
    # What the diffusion model generates: the gene's ST z-scores, or (residual) their departure from the
    # prior, scaled to unit variance over the training genes, so sampling starts at kNN quality.
    target = st_z - prior if residual else st_z
    target_scale = float(np.nanstd(target[split.train])) if residual else 1.0
    target = target / max(target_scale, 1e-6)
    epochs = DEFAULT_EPOCHS.get(preset, 300) if epochs is None else epochs
    torch.manual_seed(seed)  # the initial weights are part of the run's seed
    model = create_spadit(
        preset,
        n_spots=paired.n_spots,
        n_cells=paired.n_cells,
        n_ref_genes=reference.shape[0],
        **(model_overrides or {}),
    )
    if progress:
        log.info(
            "spadit: %d spots, %d cells, %d train / %d val / %d test genes, preset %s, %d epochs",
            paired.n_spots,
            paired.n_cells,
            len(split.train),
            len(split.val),
            len(split.test),
            preset,
            epochs,
        )

    t0 = time.perf_counter()
    use_prior = model.config.spot_prior
    history = train_spadit(
        model,
        target[split.train],
        sc_z[split.train],
        reference,
        prior=prior[split.train] if use_prior else None,
        val_st=target[split.val],
        val_sc=sc_z[split.val],
        val_prior=prior[split.val] if use_prior else None,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        progress=progress,
    )
    timings["spadit_train_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    drawn = np.concatenate([split.val, split.test])  # validation genes are sampled to choose the blend
    z = sample_genes(
        model,
        sc_z[drawn],
        reference,
        spot_prior=prior[drawn] if use_prior else None,
        steps=steps,
        n_samples=n_samples,
        seed=seed,
        device=device,
    )
    z = z * target_scale
    blend = 1.0
    if residual:
        blend = choose_blend(prior[split.val], z[: len(split.val)], st_z[split.val])
        z = prior[drawn] + blend * z
    z = z[len(split.val) :]
    z_spots = np.empty_like(z)
    z_spots[:, spot_perm] = z  # back to the input's spot order
    spadit = unscale(z_spots, frame, split.test, split.measured)
    timings["spadit_sample_s"] = time.perf_counter() - t0
    knn = knn_all[split.test]

    has_truth = paired.in_spatial[split.test]
    truth = frame.st_log[split.test].T
    predictions = {"spadit": spadit.T, "knn": knn.T}
    metrics: dict[str, dict[str, float]] = {}
    per_gene: dict[str, dict[str, list[float | None]]] = {}
    if has_truth.any():
        for name, pred in predictions.items():
            metrics[name], per_gene[name] = evaluate(pred[:, has_truth], truth[:, has_truth])
        # Reference point, not a method: the prior alone (kNN at the validation-chosen k, no diffusion).
        metrics["knn_val_k"] = evaluate(prior_log[split.test].T[:, has_truth], truth[:, has_truth])[0]
    params = dict(
        preset=preset,
        epochs=epochs,
        seed=seed,
        val_fraction=val_fraction,
        k=k,
        prior_k=prior_k,
        residual=residual,
        blend=blend,
        steps=steps,
        n_samples=n_samples,
        batch_size=batch_size,
        lr=lr,
        holdout_fraction=holdout_fraction,
        best_epoch=history.best_epoch,
        model=dict(vars(model.config)),
    )
    return ImputationResult(
        genes=[paired.genes[i] for i in split.test],
        has_truth=has_truth,
        predictions=predictions,
        truth=truth,
        metrics=metrics,
        timings=timings,
        params=params,
        split=split,
        train_genes=[paired.genes[i] for i in split.train],
        model=model,
        history=history,
        per_gene=per_gene,
    )
