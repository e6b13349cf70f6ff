"""A procedurally drawn paired store whose images depend on the expression, for tests and benchmarks.

Two latent factors per spot drive both sides: `a` sets the stain colour (pink eosin -> purple haematoxylin,
like a cell-dense region) and `b` sets the texture amplitude; every gene's rate is a log-linear mix of them.
An image model that uses the genes can therefore reproduce colour and texture from expression alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared import keys
from shared.store.format import PatchStore, StoreWriter

PINK = np.array([235.0, 170.0, 205.0])
PURPLE = np.array([95.0, 45.0, 140.0])


def draw_patches(a: np.ndarray, b: np.ndarray, px: int, rng: np.random.Generator) -> np.ndarray:
    n = len(a)
    colour = PINK[None] * (1 - a[:, None]) + PURPLE[None] * a[:, None]
    low = rng.normal(size=(n, px // 4, px // 4, 1))
    texture = np.repeat(np.repeat(low, 4, axis=1), 4, axis=2) * (8 + 40 * b[:, None, None, None])
    img = colour[:, None, None, :] + texture + rng.normal(scale=4.0, size=(n, px, px, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_toy_store(
    out: str | Path,
    *,
    n_spots: int = 256,
    n_tiles: int = 256,
    n_genes: int = 8,
    panel: list[str] | None = None,
    patch_px: int = 32,
    seed: int = 0,
    missing_gene_in_section_b: bool = True,
) -> PatchStore:
    """fedst's one generated patch store (tests, benchmarks, the toy backend's federations): sections A and B
    (half the spots each), genes ``panel`` (default GENE0..GENE<n_genes - 1>), ``patch_px`` a multiple of 4.

    ``missing_gene_in_section_b`` marks the last gene unmeasured in section B (a panel gap, like real sites).
    """
    import anndata
    import pandas as pd

    genes = list(panel) if panel is not None else [f"GENE{g}" for g in range(n_genes)]
    n_genes, px = len(genes), patch_px
    rng = np.random.default_rng(seed)
    weights = np.random.default_rng(1234).normal(scale=1.5, size=(n_genes, 2))  # same genes in every toy store
    a, b = rng.uniform(size=n_spots), rng.uniform(size=n_spots)
    rates = 5.0 * np.exp(np.stack([a - 0.5, b - 0.5], 1) @ weights.T)
    counts = rng.poisson(rates).astype(np.float32)
    library = counts.sum(1, keepdims=True).clip(min=1)
    normalised = np.log1p(counts / library * keys.TARGET_SUM).astype(np.float32)
    section = np.where(np.arange(n_spots) < n_spots // 2, "A", "B")
    measured = np.ones_like(counts)
    if missing_gene_in_section_b:
        measured[section == "B", -1] = 0
    counts *= measured
    normalised *= measured
    spots = anndata.AnnData(
        X=normalised,
        obs=pd.DataFrame(
            {
                keys.SECTION: section,
                keys.PATCH_INDEX: np.arange(n_spots),
                keys.SYNTHETIC: False,
                "factor_a": a,
                "factor_b": b,
            },
            index=[f"spot{i}" for i in range(n_spots)],
        ),
        var=pd.DataFrame(index=genes),
        layers={keys.COUNTS: counts, keys.MEASURED: measured},
        obsm={keys.SPATIAL: rng.uniform(0, 1000, size=(n_spots, 2))},
        uns={keys.MPP: {"A": 0.5, "B": 0.5}},
    )
    with StoreWriter(out, patch_px=px) as writer:
        writer.allocate_patches(n_spots)[:] = draw_patches(a, b, px, rng)
        ta, tb = rng.uniform(size=n_tiles), rng.uniform(size=n_tiles)
        writer.allocate_tiles(n_tiles)[:] = draw_patches(ta, tb, px, rng)
        writer.set_tile_table(
            pd.DataFrame(
                {
                    keys.SECTION: np.where(np.arange(n_tiles) % 2, "A", "B"),
                    "x": rng.uniform(0, 1000, n_tiles),
                    "y": rng.uniform(0, 1000, n_tiles),
                }
            )
        )
        writer.set_spots(spots)
        writer.manifest.update(params={"source": "c2l toy"}, provenance={"generator": "shared.c2l.toy", "seed": seed})
    return PatchStore(out)


MIXTURE_MEANS = (-0.5, 0.5)
MIXTURE_STD = 0.1


def mixture_samples(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draws of the 1-D toy distribution: equal mixture of N(-0.5, 0.1^2) and N(0.5, 0.1^2)."""
    return rng.choice(MIXTURE_MEANS, size=n) + rng.normal(scale=MIXTURE_STD, size=n)


def mixture_denoiser(config: dict):
    """The exact epsilon-predictor E[eps | x_t] for pixels drawn i.i.d. from the toy mixture.

    With the Bayes-optimal denoiser, differences between samplers are the samplers' own discretisation error,
    so this is a clean yardstick for DDIM / DPM-Solver at few steps against ancestral DDPM at 1000.
    """
    import torch

    from shared.diffusion import train_scheduler

    alphas = train_scheduler({**config, "prediction_type": "epsilon"}).alphas_cumprod.double()
    means = torch.tensor(MIXTURE_MEANS, dtype=torch.float64)
    var0 = MIXTURE_STD**2

    def fn(x, t):
        a = alphas[t.cpu()].to(x.device).view(-1, *([1] * (x.dim() - 1)))
        xd = x.double()[..., None]
        var = a[..., None] * var0 + (1 - a[..., None])
        logp = -0.5 * (xd - a[..., None].sqrt() * means) ** 2 / var
        w = torch.softmax(logp, dim=-1)
        post = means + a[..., None].sqrt() * var0 / var * (xd - a[..., None].sqrt() * means)
        x0 = (w * post).sum(-1)
        return ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).to(x.dtype)

    return fn
