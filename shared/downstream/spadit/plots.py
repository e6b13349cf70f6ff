"""PNG figures people look at: spatial maps of imputed genes (truth | SpaDiT | kNN) and the training curve."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def spatial_maps(
    path: str | Path,
    coords: np.ndarray,
    genes: list[str],
    panels: dict[str, np.ndarray],
    max_genes: int = 4,
    title: str = "",
) -> Path:
    """One row per gene, one column per panel (e.g. truth, spadit, knn); panels are (spots, genes).

    Each panel has its own colour range (1st-99th percentile): the methods' outputs differ in scale and the
    scores that matter here (PCC, SSIM on min-max values) compare patterns; NaN panels are left blank.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(max_genes, len(genes))
    cols = list(panels)
    fig, axes = plt.subplots(n, len(cols), figsize=(3.2 * len(cols), 3.0 * n), squeeze=False)
    xy = np.asarray(coords, dtype=float)
    size = float(np.clip(6000.0 / max(len(xy), 1), 2.0, 30.0))
    for r in range(n):
        values = [np.asarray(panels[c][:, r], dtype=float) for c in cols]
        for c, (name, v) in enumerate(zip(cols, values)):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
            if np.isfinite(v).any():
                lo, hi = np.percentile(v[np.isfinite(v)], [1, 99])
                ax.scatter(xy[:, 0], xy[:, 1], c=v, s=size, cmap="viridis", vmin=lo, vmax=hi, linewidths=0)
            else:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.invert_yaxis()
            ax.set_title(f"{genes[r]} — {name}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def training_curve(path: str | Path, train_loss: list[float], val_loss: list[float]) -> Path:
    """Denoising loss per epoch (train, and fixed-noise validation when present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(train_loss, label="train")
    if np.isfinite(val_loss).any():
        ax.plot(val_loss, label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("epsilon MSE")
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
