"""Variance-exploding SDE: training loss and the Heun probability-flow sampler.

Forward process: x_sigma = x0 + sigma * eps, sigma from sigma_min = 0.01 to sigma_max = 10 (log-uniform when
training, i.e. t ~ U(0, 1) with sigma(t) = sigma_min (sigma_max / sigma_min)^t as in Song et al.).
Loss: sigma^2 * || s(x_sigma) + eps / sigma ||^2 with s = -eps_hat / sigma, i.e. || eps_hat - eps ||^2, written
on the denoiser D = x - sigma eps_hat as || D - x0 ||^2 / sigma^2 so that other parameterisations of D (the
model's ``precondition``) plug in with their own weight.
Sampling: the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (D = Tweedie denoiser) integrated
with Heun's method on a geometric sigma grid from sigma_max to sigma_min, then one final Tweedie denoise
at sigma_min. Each step costs two network evaluations (one for the last).
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""D(x (S, G), sigma (S,)) -> (S, G): the model's estimate of x0."""


def sample_sigma(n: int, sigma_min: float, sigma_max: float, generator: torch.Generator | None = None) -> torch.Tensor:
    t = torch.rand(n, generator=generator)
    return sigma_min * (sigma_max / sigma_min) ** t


def dsm_loss(
    denoise: Denoiser,
    x0: torch.Tensor,
    sigma_min: float,
    sigma_max: float,
    weight: Callable[[torch.Tensor], torch.Tensor],
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoising score matching, weight(sigma) * || D(x0 + sigma eps, sigma) - x0 ||^2 averaged over entries.

    ``weight = 1 / sigma^2`` is the sigma^2-weighted score loss (= || eps_hat - eps ||^2 for an eps-predicting
    D); ``mask`` (S, G) drops unmeasured entries from the mean.
    """
    sigma = sample_sigma(len(x0), sigma_min, sigma_max, generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    err = weight(sigma)[:, None] * (denoise(x0 + sigma[:, None] * eps, sigma) - x0) ** 2
    if mask is None:
        return err.mean()
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


def sigma_grid(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Geometric grid sigma_max -> sigma_min with ``steps`` + 1 points (the VE-SDE's natural spacing)."""
    steps = max(1, int(steps))
    t = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    return (sigma_max * (sigma_min / sigma_max) ** t).float()


@torch.no_grad()
def heun_sample(
    denoise: Denoiser,
    shape: tuple[int, int],
    steps: int,
    sigma_min: float,
    sigma_max: float,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """One sample per row from x ~ N(0, sigma_max^2) through the PF-ODE, ending with a Tweedie denoise."""
    sigmas = sigma_grid(steps, sigma_min, sigma_max).to(device)
    x = torch.randn(shape, generator=generator).to(device) * sigmas[0]
    n = shape[0]
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, s.expand(n))) / s
        x_euler = x + (s_next - s) * d
        d_next = (x_euler - denoise(x_euler, s_next.expand(n))) / s_next
        x = x + (s_next - s) * 0.5 * (d + d_next)
    return denoise(x, sigmas[-1].expand(n))
