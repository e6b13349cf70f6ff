"""Download-free audit of synthetic pairs: conditional consistency, feature-space KID, memorisation.

Features are hand-crafted colour/texture statistics (rotation-invariant, like the augmentation): per-channel
mean, std and quantiles, 8-bin colour histograms, and gradient / Laplacian energy at two scales. They need no
weights, and a ridge model on them recovers expression from real H&E-like patches when the signal is there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared import keys
from shared.c2l.data import expression_and_mask
from shared.downstream.baselines import RidgeBaseline
from shared.downstream.colour_features import colour_texture_features, to_unit_images
from shared.downstream.metrics import pcc_per_gene_masked
from shared.errors import FedstError
from shared.store.format import PatchStore


def image_features(patches: np.ndarray, px: int = 32, chunk: int = 512) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, F) float64 colour/texture features at resolution `px`
    (shared.downstream.colour_features, also the colour half of the ``stats_colour`` encoder).

    Not the downstream's "stats" encoder (shared.downstream.encoders): the audit compares synthetic patches
    with real ones that trained the generator under rotations and flips, so its features must not change when
    a patch is rotated or flipped; the encoder's oriented Gabor bank does (both tested in test_c2l_core.py).
    """
    return colour_texture_features(patches, px, chunk)


PROBE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))


def fit_expression_probe(features: np.ndarray, expression: np.ndarray) -> RidgeBaseline:
    """Ridge (alpha by CV) from standardised image features to expression, fitted on real pairs.

    fedst's one ridge (the downstream baseline) keeping every principal component: with all of them PCA is a
    rotation, which ridge and its leave-one-out alpha choice are invariant to, so this is ridge on the
    standardised features themselves.
    """
    return RidgeBaseline(n_components=features.shape[1], alphas=PROBE_ALPHAS).fit(features, expression)


def clip_to_support(features: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Clip each feature to the range it spans on `reference` (the real patches the probe was fitted on).

    A histogram bin that is (almost) always empty on real patches has a tiny standard deviation; one synthetic
    patch with a few pixels there would otherwise become a 1e4-sigma input and swamp the ridge prediction.
    """
    return np.clip(features, reference.min(0), reference.max(0))


def conditional_consistency(
    real: PatchStore, synthetic: PatchStore, px: int, seed: int = 0, genes: np.ndarray | None = None
) -> dict[str, Any]:
    """PCC between what a real-trained probe reads off synthetic images and the vectors they were made from.

    `genes` (column indices into the panel) restricts probe and PCC to the genes a caller evaluates.
    """
    real_x, real_m = expression_and_mask(real)
    syn_x, syn_m = expression_and_mask(synthetic)
    panel = list(synthetic.panel)
    if genes is not None:
        genes = np.asarray(genes)
        real_x, real_m, syn_x, syn_m = (a[:, genes] for a in (real_x, real_m, syn_x, syn_m))
        panel = [panel[g] for g in genes]
    real_f = image_features(real.patches[real.spots.obs[keys.PATCH_INDEX].to_numpy()], px)
    syn_f = image_features(synthetic.patches[synthetic.spots.obs[keys.PATCH_INDEX].to_numpy()], px)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(real_x))
    cut = max(int(0.8 * len(order)), 1)
    holdout = fit_expression_probe(real_f[order[:cut]], real_x[order[:cut]])
    real_pcc = pcc_per_gene_masked(holdout.predict(real_f[order[cut:]]), real_x[order[cut:]], real_m[order[cut:]])
    probe = fit_expression_probe(real_f, real_x)
    syn_pcc = pcc_per_gene_masked(probe.predict(clip_to_support(syn_f, real_f)), syn_x, syn_m)
    return {
        "pcc_mean": float(np.nanmean(syn_pcc)) if np.isfinite(syn_pcc).any() else float("nan"),
        "pcc_per_gene": dict(zip(panel, [None if np.isnan(v) else float(v) for v in syn_pcc])),
        "real_holdout_pcc_mean": float(np.nanmean(real_pcc)) if np.isfinite(real_pcc).any() else float("nan"),
        "probe": "ridge on colour/texture features, fitted on real pairs",
    }


KID_SCALE_FLOOR = 1e-2  # smallest per-feature scale: 1% of the pixels for a histogram bin, 1/200 of the range


def kid(
    real_f: np.ndarray,
    syn_f: np.ndarray,
    *,
    reference: np.ndarray | None = None,
    subsets: int = 50,
    subset_size: int = 100,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance formula in the given feature space: unbiased MMD^2, k(x, y) = (x.y / d + 1)^3.

    Both sets are standardised with the mean and std of `reference` (default `real_f`), each std floored at
    KID_SCALE_FLOOR: a histogram bin that is (nearly) always empty on real patches would otherwise divide by
    ~1e-8 and turn one synthetic pixel there into a 1e8-sigma coordinate (KID 1e26). With the real features
    at unit scale the cubic kernel is on the scale KID's inventors used for Inception features. Unbiased:
    two samples of one distribution give ~0, slightly negative values included. Returns (mean, std) over
    `subsets` random subsets of `subset_size` from each side.
    """
    ref = real_f if reference is None else reference
    mu, sd = ref.mean(0), np.maximum(ref.std(0), KID_SCALE_FLOOR)
    a, b = (real_f - mu) / sd, (syn_f - mu) / sd
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise FedstError("KID needs at least 2 real and 2 synthetic patches")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        values.append(
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        )
    return float(np.mean(values)), float(np.std(values))


def kid_floor(real_f: np.ndarray, *, seed: int = 0, **kwargs: Any) -> float:
    """Real-vs-real KID: two random halves of `real_f`, standardised with all of `real_f` as `kid` does."""
    order = np.random.default_rng(seed).permutation(len(real_f))
    half = len(order) // 2
    if half < 2:
        return float("nan")
    return kid(real_f[order[:half]], real_f[order[half:]], reference=real_f, seed=seed, **kwargs)[0]


def memorisation(train: np.ndarray, syn: np.ndarray, px: int, threshold: float = 0.5) -> dict[str, Any]:
    """Pixel-space NN distance of each synthetic patch to the training patches, relative to the median
    leave-one-out real-to-real NN distance; ratio < threshold flags a near-copy."""
    import torch

    t = to_unit_images(np.asarray(train), px).flatten(1)
    s = to_unit_images(np.asarray(syn), px).flatten(1)
    real_d = torch.cdist(t, t)
    real_d.fill_diagonal_(float("inf"))
    real_nn = real_d.min(1).values
    syn_nn = torch.cdist(s, t).min(1).values
    reference = float(real_nn.median())
    ratio = (syn_nn / max(reference, 1e-12)).numpy()
    flagged = np.flatnonzero(ratio < threshold)
    return {
        "real_nn_median": reference,
        "synthetic_nn_median": float(syn_nn.median()),
        "ratio_median": float(np.median(ratio)),
        "ratio_min": float(ratio.min()),
        "threshold": threshold,
        "near_copies": int(len(flagged)),
        "near_copy_fraction": float(len(flagged) / len(ratio)),
        "near_copy_indices": flagged[:100].tolist(),
    }


def audit(
    real: PatchStore,
    synthetic: PatchStore,
    *,
    px: int | None = None,
    seed: int = 0,
    memorisation_threshold: float = 0.5,
    max_train: int = 4000,
) -> dict[str, Any]:
    """All three audits of `synthetic` against the real store whose spots conditioned (and trained) it."""
    if real.n_spots < 5:
        raise FedstError(f"{real.path}: audit needs a real store with paired spots (found {real.n_spots})")
    if synthetic.n_spots < 2:
        raise FedstError(f"{synthetic.path}: audit needs at least 2 synthetic pairs")
    if real.panel != synthetic.panel:
        raise FedstError(f"{synthetic.path}: gene panel differs from the real store {real.path}")
    px = int(px or synthetic.patch_px)
    real_patches = np.asarray(real.patches[:max_train])
    syn_patches = np.asarray(synthetic.patches)
    real_f, syn_f = image_features(real_patches, px), image_features(syn_patches, px)
    kid_value, kid_std = kid(real_f, syn_f, seed=seed)
    kid_rr = kid_floor(real_f, seed=seed)
    return {
        "real_store": str(real.path),
        "synthetic_store": str(synthetic.path),
        "n_real": real.n_spots,
        "n_synthetic": synthetic.n_spots,
        "conditional_consistency": conditional_consistency(real, synthetic, px, seed),
        "kid": {
            "value": kid_value,
            "std": kid_std,
            "real_half_vs_half": kid_rr,
            "features": "colour/texture statistics (no downloaded weights)",
        },
        "memorisation": memorisation(real_patches, syn_patches, px, memorisation_threshold),
        "provenance": synthetic.manifest.get("provenance", {}),
    }


AUDIT_PASS_RATIO = 0.5
"""Synthetic pairs pass the audit when an image->expression probe fitted on the real pairs reads their
conditioning vectors back with a PCC of at least this share of what it achieves on held-out real pairs."""


def synthesis_audit(
    real: PatchStore, synthetic: PatchStore, gene_index: np.ndarray | None = None, *, seed: int
) -> dict[str, Any]:
    """Conditional consistency (shared.c2l.audit's probe) on the genes the site is evaluated on.

    A ridge probe on colour/texture features is fitted on the real spots the synthesis was conditioned on:
    ``audit_real_pcc`` is its PCC on an 80/20 split of those real spots (how much of the expression the image
    features carry at all), ``audit_synthetic_pcc`` the PCC between what it reads off the synthetic images and
    the expression they were generated for. If the second is far below the first, the synthetic images do not
    show their expression, and adding them can only add noise to the predictor.
    """
    found = conditional_consistency(real, synthetic, real.patch_px, seed=seed, genes=gene_index)
    real_pcc, syn_pcc = (
        float(found[k]) if np.isfinite(found[k]) else None for k in ("real_holdout_pcc_mean", "pcc_mean")
    )
    passed = None
    if real_pcc is not None and syn_pcc is not None:
        passed = bool(real_pcc > 0 and syn_pcc >= AUDIT_PASS_RATIO * real_pcc)
    return {"audit_real_pcc": real_pcc, "audit_synthetic_pcc": syn_pcc, "audit_passed": passed}
