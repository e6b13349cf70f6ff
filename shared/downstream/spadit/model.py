"""The SpaDiT network: per-gene tokens from the ST and reference vectors, a low-rank attention summary of the
whole reference as condition, DiT blocks with adaLN-Zero over (time + condition), epsilon output.

Constructor arguments are the config: ``save_pretrained`` writes them as config.json beside model.safetensors
and ``from_pretrained`` rebuilds the exact model (shared/persistence.py). ``forward`` is pure; the reference
summary is computed by ``encode_reference`` once per batch (training) or once per sampling run, never copied
into each batch item.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from shared.downstream.dit import DiTBlock, modulate
from shared.errors import require
from shared.persistence import Pretrained


@dataclass(frozen=True)
class SpaDiTConfig:
    """Sizes of one SpaDiT; the data sizes (spots, cells, reference genes) fix the input projections."""

    n_spots: int
    n_cells: int
    n_ref_genes: int
    width: int = 32
    depth: int = 2
    heads: int = 2
    spot_patch: int = 16
    cell_patch: int = 32
    cond_rank: int = 8
    spot_prior: bool = True
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        for name in (
            "n_spots",
            "n_cells",
            "n_ref_genes",
            "width",
            "depth",
            "heads",
            "spot_patch",
            "cell_patch",
            "cond_rank",
        ):
            require(getattr(self, name) >= 1, f"SpaDiT config: {name} must be >= 1, got {getattr(self, name)}")
        require(
            self.width % self.heads == 0,
            f"SpaDiT config: width ({self.width}) must be divisible by heads ({self.heads})",
        )


PRESETS: dict[str, dict] = {
    "tiny": dict(width=32, depth=2, heads=2, spot_patch=16, cell_patch=32, cond_rank=8),  # CPU, seconds
    "base": dict(width=128, depth=4, heads=4, spot_patch=8, cell_patch=16, cond_rank=32),  # GPU or patient CPU
}


class LowRankReferenceEncoder(nn.Module):
    """Summarises the whole reference (genes x cells) into one condition vector.

    Each reference gene is a token (its cell vector projected to ``width``); keys and values are reduced
    along the gene axis to ``rank`` tokens by learned projections (Linformer), so the cost is
    O(genes x rank) instead of O(genes^2); the attended tokens are mean-pooled.
    """

    def __init__(self, n_cells: int, n_ref_genes: int, width: int, heads: int, rank: int) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(n_cells, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.reduce_k = nn.Linear(n_ref_genes, rank, bias=False)
        self.reduce_v = nn.Linear(n_ref_genes, rank, bias=False)
        self.out = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        """(n_ref_genes, n_cells) -> (width,)."""
        tokens = self.embed(reference)  # (G, d)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        k = self.reduce_k(k.T).T  # (rank, d)
        v = self.reduce_v(v.T).T
        g, d = q.shape
        hd = d // self.heads
        q = q.view(g, self.heads, hd).transpose(0, 1)  # (H, G, hd)
        k = k.view(-1, self.heads, hd).transpose(0, 1)  # (H, rank, hd)
        v = v.view(-1, self.heads, hd).transpose(0, 1)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
        pooled = (attn @ v).transpose(0, 1).reshape(g, d).mean(dim=0)
        return self.out(pooled)


def _patchify(v: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, n) -> (B, ceil(n / patch), patch), zero-padded at the end."""
    pad = (-v.shape[1]) % patch
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    return v.view(v.shape[0], -1, patch)


class SpaDiT(nn.Module, Pretrained):
    """Predicts the noise added to a gene's ST vector, given its reference vector and the reference summary.

    Tokens (DiT "patchify"): consecutive runs of ``spot_patch`` spots (order spots spatially so a run is a
    neighbourhood) and of ``cell_patch`` reference cells (order cells by type), each projected to ``width``;
    the two token sequences are concatenated. With ``spot_prior`` each ST token also sees the gene's
    reference vector carried to the spots by a fixed cell->spot affinity (see ``baseline.knn_impute``).
    The condition of every block is time + the gene's reference embedding + the reference summary.
    """

    kind = "spadit"

    def __init__(
        self,
        n_spots: int,
        n_cells: int,
        n_ref_genes: int,
        width: int = 32,
        depth: int = 2,
        heads: int = 2,
        spot_patch: int = 16,
        cell_patch: int = 32,
        cond_rank: int = 8,
        spot_prior: bool = True,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        num_train_timesteps: int = 1000,
    ) -> None:
        super().__init__()
        self.config = SpaDiTConfig(
            n_spots=n_spots,
            n_cells=n_cells,
            n_ref_genes=n_ref_genes,
            width=width,
            depth=depth,
            heads=heads,
            spot_patch=spot_patch,
            cell_patch=cell_patch,
            cond_rank=cond_rank,
            spot_prior=spot_prior,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            num_train_timesteps=num_train_timesteps,
        )
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps

        self.n_st_tokens = -(-n_spots // spot_patch)
        n_sc_tokens = -(-n_cells // cell_patch)
        self.st_in = nn.Linear(spot_patch * (2 if spot_prior else 1), width)
        self.sc_in = nn.Linear(cell_patch, width)
        self.pos = nn.Parameter(torch.randn(1, self.n_st_tokens + n_sc_tokens, width) * 0.02)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(width, width)
        self.gene_embed = nn.Sequential(nn.Linear(n_cells, width), nn.SiLU(), nn.Linear(width, width))
        self.reference_encoder = LowRankReferenceEncoder(n_cells, n_ref_genes, width, heads, cond_rank)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.head = nn.Linear(width, spot_patch)
        for layer in (self.final_ada[1], self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def encode_reference(self, reference: torch.Tensor) -> torch.Tensor:
        """(n_ref_genes, n_cells) reference z-scores -> (width,) condition; call once, reuse for all genes."""
        require(
            tuple(reference.shape) == (self.config.n_ref_genes, self.config.n_cells),
            f"reference matrix has shape {tuple(reference.shape)}; this SpaDiT expects "
            f"({self.config.n_ref_genes}, {self.config.n_cells})",
        )
        return self.reference_encoder(reference)

    def forward(
        self,
        noisy_st: torch.Tensor,
        timesteps: torch.Tensor,
        sc_genes: torch.Tensor,
        reference_condition: torch.Tensor,
        spot_prior: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """noisy_st (B, n_spots), timesteps (B,), sc_genes (B, n_cells), condition (width,),
        spot_prior (B, n_spots) when configured -> predicted noise (B, n_spots)."""
        cfg = self.config
        require(
            (spot_prior is not None) == cfg.spot_prior,
            f"this SpaDiT was built with spot_prior={cfg.spot_prior}; forward got "
            f"{'a' if spot_prior is not None else 'no'} spot prior",
        )
        st = _patchify(noisy_st, cfg.spot_patch)
        if spot_prior is not None:
            st = torch.cat([st, _patchify(spot_prior, cfg.spot_patch)], dim=-1)
        x = torch.cat([self.st_in(st), self.sc_in(_patchify(sc_genes, cfg.cell_patch))], dim=1) + self.pos
        t = self.time_embed(self.time_proj(timesteps).to(noisy_st.dtype))
        c = t + self.gene_embed(sc_genes) + reference_condition.unsqueeze(0)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        x = modulate(self.final_norm(x[:, : self.n_st_tokens]), shift, scale)
        return self.head(x).reshape(x.shape[0], -1)[:, : cfg.n_spots]


def create_spadit(preset: str, *, n_spots: int, n_cells: int, n_ref_genes: int, **overrides) -> SpaDiT:
    """A SpaDiT from a named preset (``tiny`` for CPU tests, ``base`` for real runs) plus overrides."""
    require(preset in PRESETS, f"unknown SpaDiT preset {preset!r}; expected one of {sorted(PRESETS)}")
    return SpaDiT(n_spots=n_spots, n_cells=n_cells, n_ref_genes=n_ref_genes, **{**PRESETS[preset], **overrides})
