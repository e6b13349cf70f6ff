"""Rotation-invariant colour/texture statistics of H&E patches: what the synthesis audit reads expression from,
and the colour half of the ``stats_colour`` encoder.

Per channel (RGB scaled to [-1, 1], resized to ``px``): mean, std and 10/50/90 % quantiles, an 8-bin histogram,
and mean absolute gradient / Laplacian at scales 1 and 2 (rotation- and flip-invariant: no oriented filter). No
weights, nothing to train. Why both users need exactly these: the C2L generator is trained on patches under
rotations and flips and reproduces stain colour and nuclei density well at CPU budgets, but not pixel-exact
oriented texture; a feature space where its samples match real patches (low KID, shared.c2l.audit) is where
the audit can read expression back from synthetic images and where a predictor can learn from them.
"""

from __future__ import annotations

import numpy as np

N_FEATURES = 3 * (2 + 3 + 8 + 4)
"""Per channel: mean, std, 3 quantiles, 8 histogram bins, gradient and Laplacian energy at 2 scales."""


def to_unit_images(batch: np.ndarray, px: int):
    """uint8 (B, H, W, 3) -> float tensor (B, 3, px, px) in [-1, 1] (area-downsampled / bilinear-upsampled)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(batch, dtype=np.uint8)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    if x.shape[-1] != px or x.shape[-2] != px:
        x = F.interpolate(x, size=(px, px), mode="area" if x.shape[-1] > px else "bilinear", align_corners=None)
    return x


def colour_texture_features(patches: np.ndarray, px: int = 32, chunk: int = 512) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, N_FEATURES) float64 features at resolution ``px`` (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    out = []
    for lo in range(0, len(patches), chunk):
        x = to_unit_images(np.asarray(patches[lo : lo + chunk]), px)  # (B, 3, px, px) in [-1, 1]
        flat = x.flatten(2)
        feats = [flat.mean(2), flat.std(2)]
        feats += [flat.quantile(q, dim=2) for q in (0.1, 0.5, 0.9)]
        bins = ((flat + 1) / 2 * 8).clamp(0, 7.999).long()
        hist = torch.zeros(x.shape[0], 3, 8).scatter_add_(2, bins, torch.ones_like(flat)) / flat.shape[2]
        feats.append(hist.flatten(1))
        for scale in (1, 2):
            y = F.avg_pool2d(x, scale) if scale > 1 else x
            gx, gy = y[..., :, 1:] - y[..., :, :-1], y[..., 1:, :] - y[..., :-1, :]
            feats += [gx.abs().flatten(2).mean(2) + gy.abs().flatten(2).mean(2)]
            lap = y[..., 1:-1, 1:-1] * 4 - y[..., :-2, 1:-1] - y[..., 2:, 1:-1] - y[..., 1:-1, :-2] - y[..., 1:-1, 2:]
            feats += [lap.abs().flatten(2).mean(2)]
        out.append(torch.cat(feats, 1).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))
