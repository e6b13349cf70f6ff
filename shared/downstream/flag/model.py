"""FLAG network: graph transformer over the spots of a crop -> per-spot condition -> gene-token DiT.

The DiT's raw output F is turned into the denoiser D(x_sigma) ~ E[x0 | x_sigma] of a variance-exploding
perturbation ``x_sigma = x0 + sigma * eps`` by ``precondition`` (config ``precondition``):
  - ``"eps"`` (the paper's): F predicts the noise, D = x - sigma * F, loss weight 1 / sigma^2, i.e. the
    sigma^2-weighted score loss = plain MSE on eps. An error in F is multiplied by sigma in D, so at
    sigma_max = 10 the denoiser (the conditional mean the point prediction needs) is learnt worst.
  - ``"edm"`` (Karras et al. 2022, sigma_data = 1 since genes are z-scored): D = c_skip x + c_out F with
    c_skip = 1 / (sigma^2 + 1), c_out = sigma / sqrt(sigma^2 + 1), loss weight 1 / c_out^2: F has a unit-scale
    target at every sigma, and at sigma_max it regresses x0 directly.
Inputs are scaled by ``c_in = 1 / sqrt(sigma^2 + 1)`` (gene values are z-scored, unit variance) so the network
sees unit-scale tokens at every noise level; the noise level enters as ``log(sigma) / 4``.

Constructor arguments are the config (saved as config.json beside weights.safetensors, shared/persistence.py);
data statistics used to standardise features and genes are buffers, so they travel with the weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.errors import require
from shared.persistence import Pretrained

from ..dit import DiTBlock, modulate, transformer_mlp
from .graph import N_EDGE_CONDITIONS

PRECONDITIONS = ("eps", "edm")
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(graph_width=32, graph_depth=1, graph_heads=2, dit_width=32, dit_depth=2, dit_heads=2),
    "small": dict(graph_width=128, graph_depth=2, graph_heads=4, dit_width=128, dit_depth=4, dit_heads=4),
    "base": dict(graph_width=384, graph_depth=6, graph_heads=6, dit_width=384, dit_depth=12, dit_heads=6),
}


class GraphLayer(nn.Module):
    """Pre-norm transformer layer whose attention logits get a per-head bias from the edge conditions."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.edge_bias = nn.Linear(N_EDGE_CONDITIONS, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = transformer_mlp(width, mlp_ratio)

    def forward(self, h: torch.Tensor, edges: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.edge_bias(edges).permute(0, 3, 1, 2)  # (B, H, N, N)
        bias = bias.masked_fill(blocked[:, None], float("-inf"))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        h = h + self.proj(attn.transpose(1, 2).reshape(b, n, w))
        return h + self.mlp(self.norm2(h))


class GraphTransformer(nn.Module):
    """Spots of a crop attend to each other; output = one condition vector per spot."""

    def __init__(self, feat_dim: int, width: int, depth: int, heads: int, out_dim: int, mlp_ratio: int = 4):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(feat_dim, width), nn.LayerNorm(width))
        self.layers = nn.ModuleList(GraphLayer(width, heads, mlp_ratio) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))

    def forward(self, feats: torch.Tensor, edges: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """``blocked`` (B, N, N) bool: True where spot i must not attend to spot j (padding, ablation)."""
        h = self.inp(feats)
        for layer in self.layers:
            h = layer(h, edges, blocked)
        return self.out(h)


def timestep_embedding(c_noise: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
    args = c_noise.float()[:, None] * 1000.0 * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class FlagModel(nn.Module, Pretrained):
    """Graph-conditioned gene-token DiT for the VE-SDE score of spot expression given H&E features."""

    kind = "flag"
    weights_name = "weights.safetensors"

    def __init__(
        self,
        n_genes: int,
        feat_dim: int,
        graph_width: int = 384,
        graph_depth: int = 6,
        graph_heads: int = 6,
        dit_width: int = 384,
        dit_depth: int = 12,
        dit_heads: int = 6,
        mlp_ratio: int = 4,
        use_edge_conditions: bool = True,
        use_graph: bool = True,
        sigma_min: float = 0.01,
        sigma_max: float = 10.0,
        gene_embed_dim: int = 0,
        align_block: int | None = None,
        precondition: str = "eps",
    ):
        super().__init__()
        require(n_genes >= 1 and feat_dim >= 1, f"FlagModel: n_genes={n_genes}, feat_dim={feat_dim} must be >= 1")
        require(
            graph_width % graph_heads == 0,
            f"FlagModel: graph_width {graph_width} not divisible by graph_heads {graph_heads}",
        )
        require(dit_width % dit_heads == 0, f"FlagModel: dit_width {dit_width} not divisible by dit_heads {dit_heads}")
        require(0 < sigma_min < sigma_max, f"FlagModel: need 0 < sigma_min ({sigma_min}) < sigma_max ({sigma_max})")
        require(precondition in PRECONDITIONS, f"FlagModel: precondition {precondition!r} not in {PRECONDITIONS}")
        if align_block is None:
            align_block = dit_depth // 2
        require(0 <= align_block < dit_depth, f"FlagModel: align_block {align_block} outside 0..{dit_depth - 1}")
        self.config = dict(
            n_genes=n_genes,
            feat_dim=feat_dim,
            graph_width=graph_width,
            graph_depth=graph_depth,
            graph_heads=graph_heads,
            dit_width=dit_width,
            dit_depth=dit_depth,
            dit_heads=dit_heads,
            mlp_ratio=mlp_ratio,
            use_edge_conditions=use_edge_conditions,
            use_graph=use_graph,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            gene_embed_dim=gene_embed_dim,
            align_block=align_block,
            precondition=precondition,
        )
        self.precondition_kind = precondition
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.use_edge_conditions, self.use_graph = bool(use_edge_conditions), bool(use_graph)
        self.align_block = align_block
        self.graph = GraphTransformer(feat_dim, graph_width, graph_depth, graph_heads, dit_width, mlp_ratio)
        self.value = nn.Sequential(nn.Linear(1, dit_width), nn.SiLU(), nn.Linear(dit_width, dit_width))
        self.gene_id = nn.Parameter(torch.randn(n_genes, dit_width) * 0.02)
        self.time = nn.Sequential(nn.Linear(dit_width, dit_width), nn.SiLU(), nn.Linear(dit_width, dit_width))
        self.blocks = nn.ModuleList(DiTBlock(dit_width, dit_heads, mlp_ratio) for _ in range(dit_depth))
        self.final_norm = nn.LayerNorm(dit_width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(dit_width, 2 * dit_width))
        self.final = nn.Linear(dit_width, 1)
        for layer in (self.final_ada[1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.align_head = nn.Linear(dit_width, gene_embed_dim) if gene_embed_dim > 0 else None
        # data statistics (set by training, saved with the weights)
        self.register_buffer("feat_mean", torch.zeros(feat_dim))
        self.register_buffer("feat_std", torch.ones(feat_dim))
        self.register_buffer("gene_mean", torch.zeros(n_genes))
        self.register_buffer("gene_std", torch.ones(n_genes))

    @classmethod
    def from_preset(cls, preset: str, **kw: Any) -> FlagModel:
        require(preset in PRESETS, f"FLAG preset {preset!r}: expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[preset], **kw})

    def condition(self, feats: torch.Tensor, edges: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """(B, N, F) standardised features of padded crops -> (B, N, dit_width) per-spot condition.

        Independent of the noisy expression and of sigma: computed once per crop when sampling.
        """
        if not self.use_edge_conditions:
            edges = torch.zeros_like(edges)
        n = feats.shape[1]
        eye = torch.eye(n, dtype=torch.bool, device=feats.device)[None]
        blocked = pad[:, None, :] & ~eye  # a padded row still attends to itself: no all -inf rows
        if not self.use_graph:  # ablation: each spot sees only itself
            blocked = ~eye.expand(feats.shape[0], n, n)
        return self.graph(feats, edges, blocked)

    def forward(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor, return_tokens: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Raw output F (the noise for ``"eps"``): x (S, G) noisy z-scored expression, sigma (S,), cond (S, width)."""
        c_in = 1.0 / torch.sqrt(sigma**2 + 1.0)
        tokens = self.value((x * c_in[:, None])[..., None]) + self.gene_id[None]
        c = self.time(timestep_embedding(torch.log(sigma) / 4.0, tokens.shape[-1])) + cond
        aligned = tokens
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, c)
            if i == self.align_block:
                aligned = tokens
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        raw = self.final(modulate(self.final_norm(tokens), shift, scale))[..., 0]
        return (raw, aligned) if return_tokens else raw

    def precondition(self, x: torch.Tensor, sigma: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """The denoiser D from the network's raw output (module docstring)."""
        sig = sigma[:, None]
        if self.precondition_kind == "edm":
            return x / (sig**2 + 1.0) + raw * sig / torch.sqrt(sig**2 + 1.0)
        return x - sig * raw

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) of the denoising loss lambda * || D - x0 ||^2 (unit-scale target for F)."""
        if self.precondition_kind == "edm":
            return (sigma**2 + 1.0) / sigma**2
        return 1.0 / sigma**2

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Tweedie estimate E[x0 | x_sigma] = x + sigma^2 * score (= x - sigma * eps for ``"eps"``)."""
        return self.precondition(x, sigma, self.forward(x, sigma, cond))
