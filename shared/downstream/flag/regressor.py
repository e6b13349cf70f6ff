"""FLAG as a regressor: fit on (features, expression, coords, sections), predict the conditional mean.

Training z-scores features and genes with training statistics (kept as model buffers), builds the crop graphs
once, and minimises the denoising score-matching loss (+ 0.5 x negative cosine alignment of a middle block's
gene tokens to gene embeddings). Prediction computes each crop's graph condition once, then, for ``n_samples``
noise draws in one batch, either (``predict="sample"``, the paper's) integrates the probability-flow ODE, or
(``predict="mean"``, the default) takes the denoiser at sigma_max, D(sigma_max * eps, sigma_max), which for
a large sigma_max is E[x0 | condition]: the point prediction PCC and MSE reward. Draws are averaged,
un-standardised and clipped at 0.

Why the mean is the default: when the image explains a fraction r of a gene's variance, one sample drawn from
the conditional distribution correlates with the truth about r, the conditional mean sqrt(r); the average of
K samples r / sqrt(r + (1 - r) / K). At her2st's r ~ 0.03, 4 averaged samples reach a third of the mean's
PCC (docs/benchmarks.md, "FLAG vs ridge on the same features"). The mean needs a denoiser that is accurate at
sigma_max, hence ``precondition="edm"`` (model.py) by default; ``precondition="eps"`` + ``predict="sample"``
+ ``steps=400`` is the paper's formulation as first implemented here.

Sampler settings (``predict="sample"``): ``sample_steps=10`` Heun steps (21 network evaluations per sample)
and ``n_samples`` samples, instead of the paper's 100 steps x 8 samples (~1600 evaluations).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from shared.errors import require
from shared.persistence import Writer, json_file, model_directory, read_config_as, write_artifact

from .gene_embeddings import align_to_panel, correlation_embeddings, read_gene_embeddings
from .graph import DEFAULT_CROP_PX, DEFAULT_SIGMA_PX, edge_conditions, sigma_for, tile_crops
from .model import PRECONDITIONS, FlagModel
from .sde import dsm_loss, heun_sample

SETTINGS = "settings.json"
PREDICT_MODES = ("mean", "sample")


@dataclass
class FlagSettings:
    """Everything besides the network config that training and sampling need (saved as JSON)."""

    preset: str = "tiny"
    crop_px: float = DEFAULT_CROP_PX
    sigma_px: float = DEFAULT_SIGMA_PX
    max_spots: int = 256
    steps: int = 1200
    batch_crops: int = 4
    lr: float = 2e-3
    weight_decay: float = 1e-4
    align_weight: float = 0.5
    gene_embeddings: str | None = None
    gene_embed_dim: int = 32
    sample_steps: int = 10
    n_samples: int = 4
    predict: str = "mean"
    precondition: str = "edm"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.predict in PREDICT_MODES, f"FLAG predict {self.predict!r}: expected one of {PREDICT_MODES}")
        require(
            self.precondition in PRECONDITIONS,
            f"FLAG precondition {self.precondition!r}: expected one of {PRECONDITIONS}",
        )


@dataclass
class _CropData:
    section: str
    index: np.ndarray
    feats: torch.Tensor
    edges: torch.Tensor


def _pad_batch(crops: list[_CropData], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = max(len(c.index) for c in crops)
    f_dim = crops[0].feats.shape[1]
    feats = torch.zeros(len(crops), n, f_dim)
    edges = torch.zeros(len(crops), n, n, crops[0].edges.shape[-1])
    pad = torch.ones(len(crops), n, dtype=torch.bool)
    for b, c in enumerate(crops):
        m = len(c.index)
        feats[b, :m], edges[b, :m, :m], pad[b, :m] = c.feats, c.edges, False
    return feats.to(device), edges.to(device), pad.to(device)


class FlagRegressor:
    """Fit/predict wrapper around ``FlagModel`` with the crop graph and the VE-SDE sampler."""

    def __init__(self, settings: FlagSettings | None = None, device: str | None = None, **kw: Any):
        self.settings = settings or FlagSettings(**kw)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model: FlagModel | None = None
        self.history: list[float] = []

    # ---- data preparation ----
    def _crops(self, feats: np.ndarray, coords: np.ndarray, sections: np.ndarray, mpp: Any) -> list[_CropData]:
        assert self.model is not None
        z = (torch.as_tensor(feats, dtype=torch.float32) - self.model.feat_mean.cpu()) / self.model.feat_std.cpu()
        out = []
        use = self.model.use_edge_conditions
        for crop in tile_crops(coords, sections, mpp, self.settings.crop_px, self.settings.max_spots):
            sigma = sigma_for(mpp, crop.section, self.settings.sigma_px)
            edges = edge_conditions(coords[crop.index], z[crop.index].numpy(), sigma, use=use)
            out.append(_CropData(crop.section, crop.index, z[crop.index], torch.from_numpy(edges)))
        return out

    def _gene_targets(self, expression: np.ndarray, genes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        if s.gene_embeddings:
            names, emb = read_gene_embeddings(s.gene_embeddings)
            emb, present = align_to_panel(names, emb, genes, s.gene_embeddings)
        else:
            emb = correlation_embeddings(expression, s.gene_embed_dim)
            present = np.ones(len(genes), np.float32)
        return torch.from_numpy(emb), torch.from_numpy(present)

    # ---- training ----
    def fit(
        self,
        features: np.ndarray,
        expression: np.ndarray,
        coords: np.ndarray,
        sections: np.ndarray,
        genes: list[str],
        mpp: dict[str, float] | float | None = None,
        mask: np.ndarray | None = None,
        on_step: Callable[[int, float], None] | None = None,
    ) -> FlagRegressor:
        s = self.settings
        features = np.asarray(features, np.float32)
        expression = np.asarray(expression, np.float32)
        require(
            len(features) == len(expression) == len(coords) == len(sections),
            "FLAG: features, expression, coords and sections differ in length",
        )
        require(
            expression.shape[1] == len(genes), f"FLAG: expression has {expression.shape[1]} genes, panel {len(genes)}"
        )
        torch.manual_seed(s.seed)
        gen = torch.Generator().manual_seed(s.seed)
        rng = np.random.default_rng(s.seed)
        emb, present = (None, None) if s.align_weight <= 0 else self._gene_targets(expression, genes)
        cfg = dict(
            n_genes=len(genes),
            feat_dim=features.shape[1],
            gene_embed_dim=0 if emb is None else emb.shape[1],
            precondition=s.precondition,
        )
        self.model = FlagModel.from_preset(s.preset, **{**cfg, **s.model})
        m = self.model
        fm, fs = features.mean(0), features.std(0)
        gm, gs = expression.mean(0), expression.std(0)
        m.feat_mean.copy_(torch.from_numpy(fm)), m.feat_std.copy_(torch.from_numpy(np.where(fs > 1e-8, fs, 1.0)))
        m.gene_mean.copy_(torch.from_numpy(gm)), m.gene_std.copy_(torch.from_numpy(np.where(gs > 1e-8, gs, 1.0)))
        m.to(self.device)
        crops = self._crops(features, np.asarray(coords, np.float64), np.asarray(sections).astype(str), mpp)
        y = torch.from_numpy((expression - gm) / m.gene_std.cpu().numpy())
        msk = None if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.float32)
        opt = torch.optim.AdamW(m.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=max(1, s.steps), pct_start=0.1)
        if emb is not None:
            emb, present = emb.to(self.device), present.to(self.device)
        m.train()
        for step in range(s.steps):
            batch = [crops[i] for i in rng.choice(len(crops), size=min(s.batch_crops, len(crops)), replace=False)]
            feats, edges, pad = _pad_batch(batch, self.device)
            cond = m.condition(feats, edges, pad)[~pad]
            idx = np.concatenate([c.index for c in batch])
            x0 = y[idx].to(self.device)
            tokens: list[torch.Tensor] = []

            def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                raw, aligned = m(x, sigma, cond, return_tokens=True)  # noqa: B023 (called within this iteration)
                tokens.append(aligned)  # noqa: B023
                return m.precondition(x, sigma, raw)

            loss = dsm_loss(
                denoiser,
                x0,
                m.sigma_min,
                m.sigma_max,
                m.loss_weight,
                None if msk is None else msk[idx].to(self.device),
                gen,
            )
            if emb is not None and m.align_head is not None:
                cos = F.cosine_similarity(m.align_head(tokens[0]), emb[None], dim=-1)  # (S, G)
                loss = loss + s.align_weight * (-(cos * present).sum() / (present.sum() * len(cos)))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
            sched.step()
            self.history.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, self.history[-1])
        m.eval()
        return self

    # ---- prediction ----
    @torch.no_grad()
    def predict(
        self,
        features: np.ndarray,
        coords: np.ndarray,
        sections: np.ndarray,
        mpp: dict[str, float] | float | None = None,
        *,
        sample_steps: int | None = None,
        n_samples: int | None = None,
        seed: int | None = None,
        mode: str | None = None,
    ) -> np.ndarray:
        """(spots x genes) prediction; ``mode`` overrides ``settings.predict`` ("mean" or "sample")."""
        require(self.model is not None, "FLAG: not fitted")
        m = self.model
        assert m is not None
        m.eval().to(self.device)
        s = self.settings
        mode = s.predict if mode is None else mode
        require(mode in PREDICT_MODES, f"FLAG predict mode {mode!r}: expected one of {PREDICT_MODES}")
        steps = s.sample_steps if sample_steps is None else sample_steps
        n_samp = max(1, s.n_samples if n_samples is None else n_samples)
        gen = torch.Generator().manual_seed(s.seed if seed is None else seed)
        features = np.asarray(features, np.float32)
        out = np.zeros((len(features), m.config["n_genes"]), dtype=np.float32)
        for crop in self._crops(features, np.asarray(coords, np.float64), np.asarray(sections).astype(str), mpp):
            feats, edges, pad = _pad_batch([crop], self.device)
            cond = m.condition(feats, edges, pad)[~pad].repeat(n_samp, 1)
            n = len(crop.index)
            shape = (n * n_samp, m.config["n_genes"])
            if mode == "mean":
                x = torch.randn(shape, generator=gen).to(self.device) * m.sigma_max
                z = m.denoise(x, torch.full((shape[0],), m.sigma_max, device=self.device), cond)
            else:
                z = heun_sample(
                    lambda x, sig: m.denoise(x, sig, cond),  # noqa: B023 (sampled within this iteration)
                    shape,
                    steps,
                    m.sigma_min,
                    m.sigma_max,
                    gen,
                    self.device,
                )
            z = z.view(n_samp, n, -1).mean(0)
            out[crop.index] = (z * m.gene_std + m.gene_mean).cpu().numpy()
        return np.clip(out, 0.0, None)

    # ---- persistence ----
    def artifact_files(self) -> dict[str, Writer]:
        """settings.json (FlagSettings) + the network's config.json + weights.safetensors."""
        require(self.model is not None, "FLAG: not fitted")
        assert self.model is not None
        return {SETTINGS: json_file(asdict(self.settings)), **self.model.artifact_files()}

    def save_pretrained(self, directory: str | Path) -> Path:
        return write_artifact(directory, self.artifact_files())

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | None = None) -> FlagRegressor:
        src = model_directory(directory, (SETTINGS, FlagModel.config_name, FlagModel.weights_name))
        reg = cls(read_config_as(src / SETTINGS, FlagSettings), device=device)
        reg.model = FlagModel.from_pretrained(src).eval().to(reg.device)
        return reg
