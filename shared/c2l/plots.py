"""PNG outputs people look at: loss curves and real-vs-synthetic sample grids (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(losses: Sequence[float], path: str | Path, title: str) -> Path:
    plt = _plt()
    values = np.asarray(losses, dtype=float)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(values, lw=0.8, alpha=0.5, label="loss")
    if len(values) >= 10:
        k = max(len(values) // 20, 2)
        smooth = np.convolve(np.nan_to_num(values), np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k - 1, len(values)), smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("denoising MSE")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def image_grid(rows: Sequence[tuple[str, np.ndarray]], path: str | Path, title: str) -> Path:
    """One labelled row per (label, uint8 images (N, H, W, 3))."""
    plt = _plt()
    cols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.2 * cols + 1, 1.3 * len(rows) + 0.4), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c])
        axes[r][0].set_title(label, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
