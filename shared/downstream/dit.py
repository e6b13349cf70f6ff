"""The adaLN-Zero transformer block (Peebles & Xie, DiT) shared by FLAG and SpaDiT.

One definition so both models keep the same parameter names (``norm1``, ``attn``, ``norm2``, ``mlp``,
``ada``) and the same identity-at-init guarantee; their saved weights load unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Scale-shift of token features ``(B, T, D)`` by per-sample vectors ``(B, D)``."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def transformer_mlp(width: int, ratio: float) -> nn.Sequential:
    hidden = int(width * ratio)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms and residual gates come from the condition (adaLN-Zero).

    The modulation layer starts at zero, so every gate is 0 and the block is the identity at init.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = transformer_mlp(width, mlp_ratio)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1)
        x = x + gate1.unsqueeze(1) * self.attn(h, h, h, need_weights=False)[0]
        h = modulate(self.norm2(x), shift2, scale2)
        return x + gate2.unsqueeze(1) * self.mlp(h)
