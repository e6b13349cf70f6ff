"""Every evaluation metric of fedst, each with its exact definition, shared by all methods.

Conventions (apply to every function below):

- ``pred`` and ``truth`` are (n_spots, n_genes) arrays on the SAME scale (fedst: log1p-normalised
  expression, ``keys.NORMALISED``) with rows = spots and columns = genes paired by position.
- Per-gene metrics are computed per slide (``sections``) and reported as the mean over genes within a slide,
  then the mean over slides (each slide weighs the same). Without ``sections`` all spots form one slide.
- Zero-variance rule (never a silent NaN): a gene whose TRUTH is constant within a slide has no defined
  correlation and is EXCLUDED from that slide's PCC / GSC / SSC and counted in ``n_genes_constant_truth``;
  a gene whose PREDICTION is constant while the truth varies scores PCC = 0 (a constant predictor carries no
  linear information), counted in ``n_genes_constant_pred``. Per-gene arrays use NaN only for excluded genes
  and say so; aggregates never return NaN — with nothing left to average they raise FedstError.
- Min-max normalisation of a gene: (x - min) / (max - min), pred and truth each by their own range; a
  constant vector maps to all zeros.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import scipy.sparse as sp

from shared.arrays import dense
from shared.errors import FedstError, require

HIGHER_IS_BETTER: dict[str, bool] = {
    "pcc_per_slide_mean": True,
    "pcc_pooled": True,
    "pcc_top_k": True,
    "ssim": True,
    "gsc": True,
    "ssc": True,
    "mse": False,
    "rmse": False,
    "mae": False,
    "rmse_minmax": False,
    "js_divergence": False,
    "js_distance": False,
}
"""Direction of each metric for :func:`accuracy_score` (True: larger values are better)."""

AS_METRICS = ("pcc_per_slide_mean", "ssim", "rmse_minmax", "js_divergence")
"""Metrics averaged into the accuracy score by default (SpatialBenchmarking: PCC, SSIM, RMSE, JS)."""


# --------------------------------------------------------------------------------------------- helpers
def _matrix(a: Any, name: str) -> np.ndarray:
    arr = dense(a, np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    require(arr.ndim == 2, f"{name}: expected a (n_spots, n_genes) matrix, got shape {arr.shape}")
    require(bool(np.isfinite(arr).all()), f"{name}: contains NaN or infinite values")
    return arr


def _pair(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    p, t = _matrix(pred, "pred"), _matrix(truth, "truth")
    require(
        p.shape == t.shape, f"pred has shape {p.shape} but truth has shape {t.shape}: expected the same (spots x genes)"
    )
    require(p.shape[0] >= 2, f"pred/truth: need at least 2 spots, got {p.shape[0]}")
    return p, t


def _slides(n: int, sections: Any) -> list[np.ndarray]:
    if sections is None:
        return [np.arange(n)]
    s = np.asarray(sections)
    require(s.shape == (n,), f"sections: expected {n} labels (one per spot), got shape {s.shape}")
    _, first, inv = np.unique(s, return_index=True, return_inverse=True)
    return [np.flatnonzero(inv == g) for g in np.argsort(first)]


def _constant(x: np.ndarray) -> np.ndarray:
    """Columns with zero variance (max == min exactly)."""
    return x.max(axis=0) == x.min(axis=0)


def minmax(x: np.ndarray) -> np.ndarray:
    """Per-column (x - min) / (max - min); constant columns become 0."""
    x = np.asarray(x, dtype=np.float64)
    lo, hi = x.min(axis=0), x.max(axis=0)
    span = hi - lo
    return np.divide(x - lo, span, out=np.zeros_like(x), where=span > 0)


def _mean_over_slides(values: list[float], what: str) -> float:
    require(len(values) > 0, f"{what}: no slide has a gene with a defined value (all truth genes constant?)")
    return float(np.mean(values))


# ------------------------------------------------------------------------------------------------- PCC
def pcc_per_gene(pred: Any, truth: Any) -> np.ndarray:
    """Pearson r of each gene across spots (scipy.stats.pearsonr semantics, population moments cancel).

    Returns one value per gene: NaN where the truth is constant (undefined; excluded by every aggregate),
    0.0 where only the prediction is constant (the zero-variance rule of this module).
    """
    p, t = _pair(pred, truth)
    pc, tc = p - p.mean(axis=0), t - t.mean(axis=0)
    num = (pc * tc).sum(axis=0)
    den = np.sqrt((pc**2).sum(axis=0) * (tc**2).sum(axis=0))
    r = np.divide(num, den, out=np.zeros(p.shape[1]), where=den > 0)
    r = np.clip(r, -1.0, 1.0)
    r[_constant(p)] = 0.0
    r[_constant(t)] = np.nan
    return r


def pcc_per_gene_masked(pred: Any, truth: Any, measured: Any, min_spots: int = 3) -> np.ndarray:
    """:func:`pcc_per_gene` of each gene over only the spots where it was measured (``measured > 0``).

    NaN where fewer than ``min_spots`` spots are measured or the measured truth is constant; 0.0 where only the
    prediction is constant (the zero-variance rule). For panels whose sections measure different genes.
    """
    p, t = _pair(pred, truth)
    m = _matrix(measured, "measured") > 0
    require(m.shape == p.shape, f"measured has shape {m.shape} but pred has shape {p.shape}: expected the same")
    r = np.full(p.shape[1], np.nan)
    for g in np.flatnonzero(m.sum(axis=0) >= max(2, min_spots)):
        r[g] = pcc_per_gene(p[m[:, g], g], t[m[:, g], g])[0]
    return r


def pcc_per_gene_by_slide(pred: Any, truth: Any, sections: Any = None) -> np.ndarray:
    """Per-gene PCC averaged over the slides where it is defined (NaN only if undefined on every slide)."""
    p, t = _pair(pred, truth)
    rows = [pcc_per_gene(p[i], t[i]) for i in _slides(p.shape[0], sections) if i.size >= 2]
    stack = np.vstack(rows)
    valid = ~np.isnan(stack)
    total = np.where(valid, stack, 0.0).sum(axis=0)
    count = valid.sum(axis=0)
    return np.divide(total, count, out=np.full(p.shape[1], np.nan), where=count > 0)


def pcc_per_slide_mean(pred: Any, truth: Any, sections: Any = None) -> float:
    """Mean over genes of the per-gene PCC within each slide, then mean over slides (the headline PCC)."""
    p, t = _pair(pred, truth)
    means = []
    for idx in _slides(p.shape[0], sections):
        if idx.size < 2:
            continue
        r = pcc_per_gene(p[idx], t[idx])
        if (~np.isnan(r)).any():
            means.append(float(np.nanmean(r)))
    return _mean_over_slides(means, "pcc_per_slide_mean")


def pcc_pooled(pred: Any, truth: Any) -> float:
    """Per-gene PCC over ALL spots of all slides pooled, mean over genes (slide offsets count as signal)."""
    r = pcc_per_gene(pred, truth)
    require(bool((~np.isnan(r)).any()), "pcc_pooled: every truth gene is constant")
    return float(np.nanmean(r))


def pcc_top_k(pred: Any, truth: Any, k: int = 50, sections: Any = None) -> float:
    """Mean of the k LARGEST per-gene PCCs (per-gene PCC averaged over slides); all genes when fewer than k."""
    require(k >= 1, f"k: expected >= 1, got {k}")
    r = pcc_per_gene_by_slide(pred, truth, sections)
    r = r[~np.isnan(r)]
    require(r.size > 0, "pcc_top_k: every truth gene is constant")
    return float(np.sort(r)[::-1][:k].mean())


# ------------------------------------------------------------------------------------- error metrics
def _scaled(p: np.ndarray, t: np.ndarray, scale: str) -> tuple[np.ndarray, np.ndarray]:
    if scale == "raw":
        return p, t
    if scale == "minmax":
        return minmax(p), minmax(t)
    if scale == "zscore":

        def z(x: np.ndarray) -> np.ndarray:
            sd = x.std(axis=0)
            return np.divide(x - x.mean(axis=0), sd, out=np.zeros_like(x), where=sd > 0)

        return z(p), z(t)
    raise FedstError(f"scale: expected raw, minmax or zscore, got {scale!r}")


def _per_slide_error(pred: Any, truth: Any, sections: Any, scale: str, fn) -> float:
    p, t = _pair(pred, truth)
    vals = []
    for idx in _slides(p.shape[0], sections):
        ps, ts = _scaled(p[idx], t[idx], scale)
        vals.append(float(fn(ps - ts)))
    return float(np.mean(vals))


def mse(pred: Any, truth: Any, sections: Any = None, scale: str = "raw") -> float:
    """Mean squared error over all (spot, gene) entries of a slide, mean over slides.

    ``scale``: "raw" = the values as given (fedst: log1p-normalised), "minmax" / "zscore" = each gene of
    pred and truth normalised separately within the slide first.
    """
    return _per_slide_error(pred, truth, sections, scale, lambda d: np.mean(d**2))


def rmse(pred: Any, truth: Any, sections: Any = None, scale: str = "raw") -> float:
    """sqrt(MSE) per slide (over all entries), mean over slides; ``scale`` as in :func:`mse`."""
    return _per_slide_error(pred, truth, sections, scale, lambda d: np.sqrt(np.mean(d**2)))


def rmse_minmax(pred: Any, truth: Any, sections: Any = None) -> float:
    """RMSE on per-gene min-max-normalised values (SpaDiT / SpatialBenchmarking-style, range [0, 1])."""
    return rmse(pred, truth, sections, scale="minmax")


def mae(pred: Any, truth: Any, sections: Any = None, scale: str = "raw") -> float:
    """Mean absolute error over all entries of a slide, mean over slides; ``scale`` as in :func:`mse`."""
    return _per_slide_error(pred, truth, sections, scale, lambda d: np.mean(np.abs(d)))


# ------------------------------------------------------------------------------------------------ SSIM
def ssim_per_gene(pred: Any, truth: Any, data_range: float = 1.0) -> np.ndarray:
    """Global 1-D SSIM of each gene (SpaDiT convention), defined for every gene (no exclusions).

    x, y = min-max-normalised pred and truth of the gene; mu = mean, sigma^2 = population variance,
    sigma_xy = population covariance over spots; C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = ``data_range`` = 1:
    SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)).
    """
    p, t = _pair(pred, truth)
    x, y = minmax(p), minmax(t)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = x.mean(axis=0), y.mean(axis=0)
    vx, vy = x.var(axis=0), y.var(axis=0)
    cxy = ((x - mx) * (y - my)).mean(axis=0)
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def ssim(pred: Any, truth: Any, sections: Any = None) -> float:
    """Mean over genes of :func:`ssim_per_gene` within each slide, then mean over slides."""
    p, t = _pair(pred, truth)
    return float(np.mean([ssim_per_gene(p[i], t[i]).mean() for i in _slides(p.shape[0], sections) if i.size >= 2]))


# -------------------------------------------------------------------------------------------------- JS
def js_per_gene(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    """(divergence, distance) per gene, base 2 (divergence in [0, 1]); NaN where undefined.

    Each gene's vector over spots is made a distribution by clipping negatives to 0 and dividing by its sum;
    a gene whose pred or truth sums to 0 has no distribution: NaN, excluded by the aggregates. JS divergence
    = (KL(p||m) + KL(q||m)) / 2 with m = (p + q) / 2; JS distance = sqrt(divergence) = scipy's
    ``jensenshannon(p, q, base=2)``, which computes it.
    """
    from scipy.spatial.distance import jensenshannon

    p, t = _pair(pred, truth)
    p, t = np.clip(p, 0, None), np.clip(t, 0, None)
    ok = (p.sum(axis=0) > 0) & (t.sum(axis=0) > 0)
    dist = np.full(p.shape[1], np.nan)
    if ok.any():
        # scipy takes sqrt of a divergence that rounding can leave at -1e-17 for near-identical distributions
        # (NaN plus a RuntimeWarning, tested); such a divergence is 0.
        with np.errstate(invalid="ignore"):
            dist[ok] = np.clip(np.nan_to_num(jensenshannon(p[:, ok], t[:, ok], base=2, axis=0), nan=0.0), 0.0, 1.0)
    return dist**2, dist


def js_divergence(pred: Any, truth: Any, sections: Any = None) -> float:
    """Mean over defined genes of the base-2 JS DIVERGENCE per slide, then mean over slides."""
    return _js_mean(pred, truth, sections, 0, "js_divergence")


def js_distance(pred: Any, truth: Any, sections: Any = None) -> float:
    """Mean over defined genes of the base-2 JS DISTANCE (sqrt of the divergence) per slide, mean over slides."""
    return _js_mean(pred, truth, sections, 1, "js_distance")


def _js_mean(pred: Any, truth: Any, sections: Any, which: int, name: str) -> float:
    p, t = _pair(pred, truth)
    vals = []
    for idx in _slides(p.shape[0], sections):
        v = js_per_gene(p[idx], t[idx])[which]
        if (~np.isnan(v)).any():
            vals.append(float(np.nanmean(v)))
    return _mean_over_slides(vals, name)


# ------------------------------------------------------------------------------------------ GSC / SSC
def _pearson(a: np.ndarray, b: np.ndarray, what: str) -> float:
    require(a.size >= 2, f"{what}: needs at least 2 values to correlate, got {a.size}")
    ac, bc = a - a.mean(), b - b.mean()
    den = np.sqrt((ac**2).sum() * (bc**2).sum())
    return float((ac * bc).sum() / den) if den > 0 else 0.0


def gsc(pred: Any, truth: Any) -> float:
    """Gene-gene structure correlation: Pearson r between the upper triangles (diagonal excluded) of the
    gene-gene Pearson correlation matrices of pred and truth, over genes non-constant in BOTH (needs >= 3)."""
    p, t = _pair(pred, truth)
    keep = ~(_constant(p) | _constant(t))
    require(int(keep.sum()) >= 3, f"gsc: needs >= 3 genes non-constant in both pred and truth, got {int(keep.sum())}")
    cp, ct = np.corrcoef(p[:, keep].T), np.corrcoef(t[:, keep].T)
    iu = np.triu_indices(int(keep.sum()), k=1)
    return _pearson(cp[iu], ct[iu], "gsc")


def morans_i(x: Any, weights: sp.spmatrix) -> np.ndarray:
    """Moran's I of each column: I = (N / S0) * (z^T W z) / (z^T z), z = x - mean, S0 = sum of weights.

    NaN for a constant column (z^T z = 0: undefined). ``weights`` is any (N, N) sparse matrix.
    """
    xx = _matrix(x, "x")
    w = sp.csr_matrix(weights, dtype=np.float64)
    n = xx.shape[0]
    require(w.shape == (n, n), f"weights: expected ({n}, {n}) for {n} spots, got {w.shape}")
    s0 = float(w.sum())
    require(s0 > 0, "weights: all zero (no neighbours)")
    z = xx - xx.mean(axis=0)
    num = (z * (w @ z)).sum(axis=0)
    den = (z**2).sum(axis=0)
    out = np.full(xx.shape[1], np.nan)
    ok = ~_constant(xx)
    out[ok] = (n / s0) * num[ok] / den[ok]
    return out


def ssc(pred: Any, truth: Any, weights: sp.spmatrix) -> float:
    """Spatial structure correlation: Pearson r across genes between Moran's I of pred and of truth, both with
    the SAME ``weights`` (default in :func:`evaluate_predictions`: 6-NN row-standardised); genes constant in
    pred or truth are excluded (needs >= 2)."""
    p, t = _pair(pred, truth)
    ip, it = morans_i(p, weights), morans_i(t, weights)
    keep = ~(np.isnan(ip) | np.isnan(it))
    require(int(keep.sum()) >= 2, f"ssc: needs >= 2 genes non-constant in both pred and truth, got {int(keep.sum())}")
    return _pearson(ip[keep], it[keep], "ssc")


# ------------------------------------------------------------------------------------------ ARI / NMI
def _labels(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    require(
        a.ndim == 1 and a.shape == b.shape,
        f"labels: expected two 1-D label vectors of equal length, got {a.shape} and {b.shape}",
    )
    return a, b


def ari(labels_true: Any, labels_pred: Any) -> float:
    """Adjusted Rand index (sklearn.metrics.adjusted_rand_score): 1 = identical partitions, ~0 = chance."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(*_labels(labels_true, labels_pred)))


def nmi(labels_true: Any, labels_pred: Any) -> float:
    """Normalised mutual information (sklearn, arithmetic-mean normalisation), in [0, 1]."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(*_labels(labels_true, labels_pred)))


# ------------------------------------------------------------------------------------- accuracy score
def accuracy_score(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    metrics: Sequence[str] = AS_METRICS,
) -> dict[str, float]:
    """SpatialBenchmarking accuracy score of each METHOD from ``results[dataset][method][metric]``.

    For every (dataset, metric) the methods are ranked 1..M with M = best (direction from
    :data:`HIGHER_IS_BETTER`; ties share their average rank, scipy ``rankdata``); a method's score is the mean
    of its ranks over all (dataset, metric) pairs, divided by M so that 1.0 = best everywhere. Every method
    must have every metric on every dataset.
    """
    from scipy.stats import rankdata

    require(len(results) > 0, "accuracy_score: no datasets")
    scores: dict[str, list[float]] = {}
    methods_all: set[str] | None = None
    for dataset, by_method in results.items():
        methods = sorted(by_method)
        require(len(methods) >= 1, f"accuracy_score: dataset {dataset!r} has no methods")
        if methods_all is None:
            methods_all = set(methods)
        require(
            set(methods) == methods_all,
            f"accuracy_score: dataset {dataset!r} has methods {methods}, expected {sorted(methods_all)}",
        )
        for metric in metrics:
            require(
                metric in HIGHER_IS_BETTER,
                f"accuracy_score: unknown metric {metric!r} (known: {sorted(HIGHER_IS_BETTER)})",
            )
            try:
                vals = np.array([float(by_method[m][metric]) for m in methods])
            except KeyError as exc:
                raise FedstError(f"accuracy_score: dataset {dataset!r} lacks metric {metric!r} for a method") from exc
            ranks = rankdata(vals if HIGHER_IS_BETTER[metric] else -vals)
            for m, r in zip(methods, ranks):
                scores.setdefault(m, []).append(float(r) / len(methods))
    return {m: float(np.mean(v)) for m, v in scores.items()}


# --------------------------------------------------------------------------------------- evaluation
def evaluate_predictions(
    pred: Any,
    truth: Any,
    coords: np.ndarray | None = None,
    sections: np.ndarray | None = None,
    genes: Sequence[str] | None = None,
    *,
    top_k: int = 50,
    moran_k: int = 6,
) -> dict[str, Any]:
    """All metrics of this module for one prediction, as a JSON-ready dict.

    ``truth`` may also be an AnnData (truth = X; coords, sections and genes are then read from
    ``obsm[keys.SPATIAL]``, ``obs[keys.SECTION]`` and ``var_names``). SSC needs coordinates (omitted
    without them); GSC and SSC are per slide, then averaged like the rest. ``per_gene`` holds each gene's
    slide-averaged PCC and SSIM (null where undefined).
    """
    from shared import keys

    if hasattr(truth, "obsm") and hasattr(truth, "var_names"):
        adata = truth
        truth = adata.X
        if coords is None and keys.SPATIAL in adata.obsm:
            coords = np.asarray(adata.obsm[keys.SPATIAL])
        if sections is None and keys.SECTION in adata.obs:
            sections = adata.obs[keys.SECTION].astype(str).to_numpy()
        if genes is None:
            genes = list(map(str, adata.var_names))
    p, t = _pair(pred, truth)
    n, g = p.shape
    if genes is not None:
        require(len(genes) == g, f"genes: {len(genes)} names for {g} gene columns")
    else:
        genes = [f"gene_{i}" for i in range(g)]
    slides = _slides(n, sections)
    const_truth = sum(int(_constant(t[i]).sum()) for i in slides)
    const_pred = sum(int((_constant(p[i]) & ~_constant(t[i])).sum()) for i in slides)
    out: dict[str, Any] = {
        "n_spots": n,
        "n_genes": g,
        "n_slides": len(slides),
        "n_genes_constant_truth": const_truth,
        "n_genes_constant_pred": const_pred,
        "pcc_per_slide_mean": pcc_per_slide_mean(p, t, sections),
        "pcc_pooled": pcc_pooled(p, t),
        "pcc_top_k": pcc_top_k(p, t, top_k, sections),
        "top_k": min(top_k, g),
        "mse": mse(p, t, sections),
        "rmse": rmse(p, t, sections),
        "mae": mae(p, t, sections),
        "rmse_minmax": rmse_minmax(p, t, sections),
        "ssim": ssim(p, t, sections),
        "js_divergence": js_divergence(p, t, sections),
        "js_distance": js_distance(p, t, sections),
        "scale": "as given (raw); rmse_minmax on per-gene min-max-normalised values",
    }
    gsc_vals = []
    for idx in slides:
        keep = ~(_constant(p[idx]) | _constant(t[idx]))
        if keep.sum() >= 3:
            gsc_vals.append(gsc(p[idx], t[idx]))
    out["gsc"] = float(np.mean(gsc_vals)) if gsc_vals else None
    if coords is not None:
        from shared.downstream.graph import moran_weights

        c = np.asarray(coords, dtype=np.float64)
        require(c.shape == (n, 2), f"coords: expected ({n}, 2), got {c.shape}")
        ssc_vals = []
        for idx in slides:
            if idx.size < 3:
                continue
            w = moran_weights(c[idx], k=moran_k)
            ip, it = morans_i(p[idx], w), morans_i(t[idx], w)
            if int((~(np.isnan(ip) | np.isnan(it))).sum()) >= 2:
                ssc_vals.append(ssc(p[idx], t[idx], w))
        out["ssc"] = float(np.mean(ssc_vals)) if ssc_vals else None
    else:
        out["ssc"] = None
    r = pcc_per_gene_by_slide(p, t, sections)
    s = np.mean([ssim_per_gene(p[i], t[i]) for i in slides if i.size >= 2], axis=0)
    out["per_gene"] = {
        name: {"pcc": None if np.isnan(r[j]) else float(r[j]), "ssim": float(s[j])} for j, name in enumerate(genes)
    }
    return out


PROTOCOLS: dict[str, tuple[str, str]] = {
    "per_slide": (
        "pcc_per_slide_mean",
        "fedst per-slide protocol: per-gene PCC within each slide (obs['section']), mean over genes, then mean "
        "over slides; a gene with constant truth in a slide is excluded there",
    ),
    "hest": (
        "pcc_pooled",
        "HEST-Benchmark protocol: per-gene PCC over all test spots concatenated (slides pooled), mean over "
        "genes; its model is StandardScaler -> PCA 256 -> ridge (fedst's ridge predictor)",
    ),
}
"""Labelled headline PCCs: protocol name -> (the metric key holding its number, what it measures)."""


def protocols(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``protocols`` block of a result: each protocol's PCC beside its metric key and description, so a
    number quoted from fedst can be compared with the per-slide literature or with HEST-Benchmark's tables."""
    return {name: {"pcc": result[key], "metric": key, "description": text} for name, (key, text) in PROTOCOLS.items()}


def _self_truth(adata: Any) -> tuple[Any, dict[str, int]]:
    """A prediction AnnData restricted to what its own ``layers[NORMALISED]`` measured, as (view, counts).

    ``layers[MEASURED]`` (when present) keeps the spots with any measured gene and then the genes measured at
    every kept spot: the metrics have no per-entry mask, and an unmeasured entry is not a truth of 0.
    """
    from shared import keys

    require(
        keys.NORMALISED in adata.layers,
        f"prediction: no truth file given and no layers['{keys.NORMALISED}'] (the measured expression "
        "`fedst predict` stores when its input measured any); pass a TRUTH.h5ad",
    )
    if keys.MEASURED not in adata.layers:
        return adata, {"n_spots_unmeasured": 0, "n_genes_unmeasured": 0}
    measured = dense(adata.layers[keys.MEASURED], np.float32) > 0
    rows = measured.any(axis=1)
    cols = measured[rows].all(axis=0) if rows.any() else np.zeros(adata.n_vars, dtype=bool)
    require(
        bool(rows.any() and cols.any()),
        f"prediction: layers['{keys.MEASURED}'] marks no gene as measured at every measured spot; nothing to score",
    )
    counts = {"n_spots_unmeasured": int((~rows).sum()), "n_genes_unmeasured": int((~cols).sum())}
    return adata[rows][:, cols], counts


def evaluate_anndata(
    pred_adata,
    truth_adata=None,
    *,
    pred_layer: str | None = None,
    truth_layer: str | None = None,
    top_k: int = 50,
) -> dict[str, Any]:
    """Evaluate two AnnData paired by NAME: spots by obs_names, genes by var_names (their intersection).

    Prediction: ``layers[pred_layer]``, else ``layers[keys.PREDICTED]`` when present, else ``X``. Truth:
    ``layers[truth_layer]`` or ``X``. Without ``truth_adata`` the truth is the prediction's own
    ``layers[keys.NORMALISED]`` (what ``fedst predict`` stores from a store that measured expression), masked by
    ``layers[keys.MEASURED]`` (:func:`_self_truth`). Coordinates/sections come from the truth. Raises FedstError
    when the two share no spot or no gene. ``protocols`` labels the per-slide and the HEST-Benchmark PCC.
    """
    from shared import keys

    extra: dict[str, Any] = {}
    if truth_adata is None:
        require(truth_layer is None, "truth_layer: only with a truth AnnData (the own truth is layers['log1p_norm'])")
        pred_adata, extra = _self_truth(pred_adata)
        truth_adata, truth_layer = pred_adata, keys.NORMALISED
        extra["truth"] = f"the prediction's own layers['{keys.NORMALISED}']"
    spots = pred_adata.obs_names.intersection(truth_adata.obs_names, sort=False)
    genes = pred_adata.var_names.intersection(truth_adata.var_names, sort=False)
    require(len(spots) > 0, "prediction and truth share no spot name (obs_names); pair them by the same spot ids")
    require(len(genes) > 0, "prediction and truth share no gene name (var_names)")
    p = pred_adata[spots, genes]
    t = truth_adata[spots, genes]
    if pred_layer is None and keys.PREDICTED in p.layers:
        pred_layer = keys.PREDICTED
    if pred_layer is not None:
        require(pred_layer in p.layers, f"prediction: layers['{pred_layer}'] not found")
    if truth_layer is not None:
        require(truth_layer in t.layers, f"truth: layers['{truth_layer}'] not found")
    pm = p.layers[pred_layer] if pred_layer else p.X
    tm = t.layers[truth_layer] if truth_layer else t.X
    coords = np.asarray(t.obsm[keys.SPATIAL]) if keys.SPATIAL in t.obsm else None
    sections = t.obs[keys.SECTION].astype(str).to_numpy() if keys.SECTION in t.obs else None
    result = evaluate_predictions(pm, tm, coords, sections, list(map(str, genes)), top_k=top_k)
    result["n_spots_pred_only"] = int(pred_adata.n_obs - len(spots))
    result["n_spots_truth_only"] = int(truth_adata.n_obs - len(spots))
    result["n_genes_pred_only"] = int(pred_adata.n_vars - len(genes))
    result["n_genes_truth_only"] = int(truth_adata.n_vars - len(genes))
    result.update(extra)
    result["protocols"] = protocols(result)
    return result
