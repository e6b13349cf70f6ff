"""DDPM training (epsilon prediction, cosine schedule) and sampling of genes from pure noise.

Sampling receives only the reference side of the genes to impute: it has no argument through which ST
ground truth could enter, starts from Gaussian noise, and lets the diffusers scheduler turn each epsilon
prediction into the next sample (no re-injection of measured values, no x0/epsilon confusion).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shared.diffusion import sampling_scheduler, train_scheduler
from shared.downstream.spadit.model import SpaDiT
from shared.errors import FedstError

log = logging.getLogger(__name__)


def _schedule(num_train_timesteps: int) -> dict[str, Any]:
    """SpaDiT's schedule: cosine ("squaredcos_cap_v2") betas, epsilon prediction, no sample clipping."""
    return {"num_train_timesteps": num_train_timesteps, "prediction_type": "epsilon", "clip_sample": False}


def make_scheduler(num_train_timesteps: int = 1000):
    """The training noise schedule: diffusers DDPM with the cosine betas (shared.diffusion)."""
    return train_scheduler(_schedule(num_train_timesteps))


def make_sampler(kind: str, num_train_timesteps: int = 1000):
    """DDIM (deterministic, few steps, diffusers' "leading" spacing) or DDPM (ancestral), same cosine schedule."""
    if kind not in ("ddim", "ddpm"):
        raise FedstError(f"unknown sampler {kind!r}; expected 'ddim' or 'ddpm'")
    return sampling_scheduler(_schedule(num_train_timesteps), kind, timestep_spacing="leading")


@dataclass
class TrainHistory:
    """Per-epoch mean training loss and fixed-noise validation loss (NaN when there are no val genes)."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1


def _as_tensor(a: np.ndarray, device: str) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)


def _val_loss(
    model: SpaDiT,
    scheduler,
    st: torch.Tensor,
    sc: torch.Tensor,
    prior: torch.Tensor | None,
    reference: torch.Tensor,
    draws: int = 4,
) -> float:
    """Denoising loss on validation genes with noise and timesteps fixed by a seed (comparable across epochs)."""
    g = torch.Generator().manual_seed(1234)
    model.eval()
    with torch.no_grad():
        cond = model.encode_reference(reference)
        losses = []
        for _ in range(draws):
            noise = torch.randn(st.shape, generator=g).to(st.device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (st.shape[0],), generator=g).to(st.device)
            pred = model(scheduler.add_noise(st, noise, t), t, sc, cond, prior)
            losses.append(torch.mean((pred - noise) ** 2).item())
    model.train()
    return float(np.mean(losses))


def train_spadit(
    model: SpaDiT,
    st_genes: np.ndarray,
    sc_genes: np.ndarray,
    reference: np.ndarray,
    *,
    prior: np.ndarray | None = None,
    val_st: np.ndarray | None = None,
    val_sc: np.ndarray | None = None,
    val_prior: np.ndarray | None = None,
    epochs: int = 200,
    batch_size: int = 32,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> TrainHistory:
    """Fit epsilon-prediction on (gene ST z-scores | gene reference z-scores); keeps the best-val weights.

    ``reference`` is the whole (genes x cells) reference matrix; its condition is recomputed once per
    batch (it is trained), not per batch item. ``prior``/``val_prior``: (genes, spots) spot priors when the
    model was built with ``spot_prior``.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.to(device).train()
    scheduler = make_scheduler(model.config.num_train_timesteps)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    st, sc, ref = _as_tensor(st_genes, device), _as_tensor(sc_genes, device), _as_tensor(reference, device)
    pr = None if prior is None else _as_tensor(prior, device)
    has_val = val_st is not None and len(val_st) > 0
    if has_val:
        vst, vsc = _as_tensor(val_st, device), _as_tensor(val_sc, device)
        vpr = None if val_prior is None else _as_tensor(val_prior, device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    history = TrainHistory()
    best, best_state = float("inf"), None
    n = st.shape[0]
    bs = min(batch_size, n)
    report_every = max(1, epochs // 10)
    for epoch in range(epochs):
        order = torch.as_tensor(rng.permutation(n), device=device)
        total = 0.0
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            x0, cond_genes = st[idx], sc[idx]
            noise = torch.randn_like(x0)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=device)
            pred = model(
                scheduler.add_noise(x0, noise, t),
                t,
                cond_genes,
                model.encode_reference(ref),
                None if pr is None else pr[idx],
            )
            loss = torch.mean((pred - noise) ** 2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            total += loss.item() * x0.shape[0]
        sched.step()
        history.train_loss.append(total / n)
        val = _val_loss(model, scheduler, vst, vsc, vpr, ref) if has_val else float("nan")
        history.val_loss.append(val)
        score = val if has_val else history.train_loss[-1]
        if score < best:
            best, history.best_epoch = score, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if progress and (epoch % report_every == 0 or epoch == epochs - 1):
            log.info("spadit epoch %d/%d  train %.4f  val %.4f", epoch + 1, epochs, history.train_loss[-1], val)
    if best_state is not None and has_val:
        model.load_state_dict(best_state)
    model.eval()
    return history


@torch.no_grad()
def sample_genes(
    model: SpaDiT,
    sc_genes: np.ndarray,
    reference: np.ndarray,
    *,
    spot_prior: np.ndarray | None = None,
    steps: int = 50,
    n_samples: int = 1,
    sampler: str = "ddim",
    seed: int = 0,
    device: str = "cpu",
) -> np.ndarray:
    """Generate ST z-score vectors (genes, spots) for genes given only their reference vectors.

    Starts from pure Gaussian noise (seeded); averages ``n_samples`` independent draws. ``spot_prior`` is
    derived from reference values and measured genes only (never from the genes being imputed on the ST).
    """
    model.to(device).eval()
    scheduler = make_sampler(sampler, model.config.num_train_timesteps)
    scheduler.set_timesteps(steps)
    sc = _as_tensor(sc_genes, device)
    pr = None if spot_prior is None else _as_tensor(spot_prior, device)
    cond = model.encode_reference(_as_tensor(reference, device))  # once for all genes and draws
    g = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_samples):
        x = torch.randn((sc.shape[0], model.config.n_spots), generator=g).to(device)
        for t in scheduler.timesteps:
            tt = torch.full((sc.shape[0],), int(t), device=device, dtype=torch.long)
            eps = model(x, tt, sc, cond, pr)
            x = (
                scheduler.step(eps, t, x, generator=g).prev_sample
                if sampler == "ddpm"
                else scheduler.step(eps, t, x).prev_sample
            )
        draws.append(x.float().cpu().numpy())
    return np.mean(draws, axis=0)
