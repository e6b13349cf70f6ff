"""DRIFT in the prediction path: heat-kernel smoothing of spot features or predictions over each section's graph.

Why: neighbouring spots share tissue and expression, while an image embedding of one spot is noisy (one
patch, one focal plane, one cut). Diffusing the embeddings over the spot graph, ``X_t = exp(-t L) X``,
averages that noise away before the regressor; diffusing the predictions does the same after it. How much
(t) is data-dependent, so ``"auto"`` picks t on the training data the way ridge picks alpha: hold out one
training section at a time (:func:`shared.downstream.baselines.selection_folds`), fit on the rest, score the
mean per-gene PCC of the held-out section, keep the t with the best mean (ties: the smaller t; 0 is on the
grid, so smoothing must earn its place).

The operator is :func:`shared.downstream.drift.heat_kernel_apply` with the unnormalised Laplacian L = D - A:
exp(-tL) is symmetric with rows summing to 1, so a constant is left unchanged and the mean over a connected
section is preserved. The graph (:func:`spot_laplacian`) links each spot to its ``k`` nearest spots of the
same section (the 6-NN of the SSC metric), minus edges longer than ``max_edge_um`` micrometres
(pixels x the section's mpp): that keeps spots across a tissue gap, and synthetic spots without a layout
(placed 1e6 px apart), unconnected. Sections are never connected to each other, and the graph at prediction
time is built from the predicted section's own spots, so no held-out spot sees training data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from shared.errors import FedstError, require

AUTO = "auto"
TIME_GRID: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
"""Diffusion times tried by ``"auto"``. With ~6-9 neighbours per spot a walker makes about deg * t jumps, so
t = 2 already averages over a few spot spacings; larger t only washes out the section."""
K_NEIGHBOURS = 6
MAX_EDGE_UM = 500.0
"""Longest edge kept: 2.5 x the 200 um ST spot pitch (5 x Visium's 100 um), far below a tissue gap."""
DEFAULT_MPP = 0.5

Setting = float | str | None
"""None (off), a diffusion time t >= 0, or ``"auto"`` (t chosen by inner cross-validation)."""


def parse_setting(value: object, name: str) -> Setting:
    """None / "off" -> None, "auto" -> "auto", a number or numeric string >= 0 -> float; FedstError otherwise.

    ``name`` is what the message calls the value (a CLI flag or a keyword), so the error is one clean line.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none", "")):
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        t = float("nan")
    if isinstance(value, bool) or not np.isfinite(t) or t < 0:
        raise FedstError(f"{name}: expected off, auto or a diffusion time t >= 0, got {value!r}")
    return t


def spot_laplacian(
    coords: np.ndarray,
    sections: np.ndarray,
    mpp: Mapping[str, float] | None = None,
    *,
    k: int = K_NEIGHBOURS,
    max_edge_um: float = MAX_EDGE_UM,
) -> sp.csr_matrix:
    """L = D - A of the block-diagonal k-NN graph of the spots (one block per section), long edges removed.

    ``coords`` are full-resolution pixels; ``mpp`` maps a section to its micrometres per pixel (missing:
    0.5), so ``max_edge_um`` means the same tissue distance on every scanner.
    """
    from shared.downstream.drift import laplacian
    from shared.downstream.graph import spatial_graph

    coords = np.asarray(coords, dtype=np.float64)
    labels = np.asarray(sections).astype(str)
    require(labels.shape == (len(coords),), f"sections: expected {len(coords)} labels, got shape {labels.shape}")
    adj, _ = spatial_graph(coords, kind="knn", k=k, sections=labels)
    a = adj.tocoo()
    scale = np.array([float((mpp or {}).get(s, DEFAULT_MPP)) for s in labels])
    length_um = np.linalg.norm(coords[a.row] - coords[a.col], axis=1) * scale[a.row]
    keep = length_um <= max_edge_um
    kept = sp.csr_matrix((a.data[keep], (a.row[keep], a.col[keep])), shape=adj.shape)
    return laplacian(kept, "unnormalised")


def smooth(x: np.ndarray, lap: sp.spmatrix, t: float | None) -> np.ndarray:
    """exp(-t L) x column by column, in x's dtype; t None or 0 returns x itself (the identity, no copy)."""
    if not t:
        return x
    from shared.downstream.drift import heat_kernel_apply

    x = np.asarray(x)
    return heat_kernel_apply(lap, x, float(t)).astype(x.dtype, copy=False)


FitPredict = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""(train rows, held-out rows, training features, held-out features) -> predictions for the held-out rows."""


@dataclass
class Selection:
    """What ``"auto"`` chose and why: mean held-out PCC of every t tried, for predictor.json readers."""

    features: float | None
    predictions: float | None
    scheme: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> str:
        parts = []
        for what in ("features", "predictions"):
            if what in self.scores:
                tried = ", ".join(f"t={t}: {s:.4f}" for t, s in self.scores[what].items())
                parts.append(f"{what} t={getattr(self, what):g} ({tried})")
        return f"by {self.scheme} mean PCC: " + "; ".join(parts)


def _best(scores: Sequence[float], grid: Sequence[float]) -> float:
    """The smallest t whose score is the best (within 1e-9: a tie goes to less smoothing)."""
    s = np.asarray(scores)
    return float(grid[int(np.flatnonzero(s >= s.max() - 1e-9)[0])])


def _mean_gene_pcc(pred: np.ndarray, truth: np.ndarray) -> float:
    from shared.downstream.baselines import _mean_gene_pcc as pcc

    return pcc(np.asarray(pred, np.float64), np.asarray(truth, np.float64))


def choose_times(
    feats: np.ndarray,
    targets: np.ndarray,
    coords: np.ndarray,
    sections: np.ndarray,
    mpp: Mapping[str, float] | None,
    fit_predict: FitPredict,
    *,
    smooth_features: Setting,
    smooth_predictions: Setting,
    holdout: np.ndarray | None = None,
    grid: Sequence[float] = TIME_GRID,
    k: int = K_NEIGHBOURS,
    max_edge_um: float = MAX_EDGE_UM,
) -> Selection:
    """Resolve ``"auto"`` settings by inner cross-validation over held-out training sections.

    Feature t first (one fit per fold and t, each fold's training and held-out spots smoothed on their own
    graphs, as at prediction time), then prediction t on the out-of-fold predictions at the chosen feature t
    (no refit). A fixed setting is kept as given. With fewer than two sections the folds are spatial blocks;
    with no layout at all (no folds) ``"auto"`` falls back to 0.
    """
    from shared.downstream.baselines import selection_folds

    fixed_f = None if smooth_features == AUTO else smooth_features
    fixed_p = None if smooth_predictions == AUTO else smooth_predictions
    require(AUTO in (smooth_features, smooth_predictions), "choose_times: nothing is set to 'auto'")
    grid = sorted({float(t) for t in grid} | {0.0})
    labels = np.asarray(sections).astype(str)
    scheme, folds = selection_folds(len(feats), labels, coords, holdout)
    if not folds:
        return Selection(
            0.0 if smooth_features == AUTO else fixed_f, 0.0 if smooth_predictions == AUTO else fixed_p, scheme
        )
    f_grid = grid if smooth_features == AUTO else [fixed_f or 0.0]
    graphs = []
    for test in folds:
        train = np.setdiff1d(np.arange(len(feats)), test)
        lap_tr = spot_laplacian(coords[train], labels[train], mpp, k=k, max_edge_um=max_edge_um)
        lap_te = spot_laplacian(coords[test], labels[test], mpp, k=k, max_edge_um=max_edge_um)
        graphs.append((train, test, lap_tr, lap_te))
    preds: dict[float, list[np.ndarray]] = {}
    f_scores = []
    for t in f_grid:
        preds[t] = [
            fit_predict(train, test, smooth(feats[train], lap_tr, t), smooth(feats[test], lap_te, t))
            for train, test, lap_tr, lap_te in graphs
        ]
        f_scores.append(float(np.mean([_mean_gene_pcc(p, targets[g[1]]) for p, g in zip(preds[t], graphs)])))
    t_f = _best(f_scores, f_grid)
    out = Selection(t_f if smooth_features == AUTO else fixed_f, fixed_p, scheme)
    if smooth_features == AUTO:
        out.scores["features"] = {f"{t:g}": s for t, s in zip(f_grid, f_scores)}
    if smooth_predictions == AUTO:
        p_scores = [
            float(np.mean([_mean_gene_pcc(smooth(p, g[3], t), targets[g[1]]) for p, g in zip(preds[t_f], graphs)]))
            for t in grid
        ]
        out.predictions = _best(p_scores, grid)
        out.scores["predictions"] = {f"{t:g}": s for t, s in zip(grid, p_scores)}
    return out
