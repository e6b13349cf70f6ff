"""C2L-ST's use of the noise schedules (shared.diffusion): training targets, the seeded reverse process.

Two training recipes beside the default DDPM one (uniform t, unweighted MSE on the prediction target):
min-SNR-gamma loss weighting (Hang et al. 2023) of the DDPM loss, and the EDM parametrisation (Karras et al.
2022: preconditioned denoiser, log-normal noise levels, unit-weighted loss on the network output), sampled
with diffusers' EDM schedulers (`edm_dpm`: DPM-Solver++ 2M, `edm_euler`; shared.diffusion).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from shared.diffusion import EDM, EDM_SAMPLERS, sampling_scheduler
from shared.errors import FedstError

DEFAULT_STEPS = {"ddim": 50, "dpm": 25, "ddpm": 1000, "edm_dpm": 20, "edm_euler": 40}


def min_snr_weight(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example weight of the DDPM loss so the implied x0 loss is weighted by min(SNR, gamma) (Hang et al.).

    The v-MSE already equals (SNR + 1) times the x0-MSE and the epsilon-MSE equals SNR times it, hence
    min(SNR, gamma) / (SNR + 1) for v-prediction and min(SNR, gamma) / SNR for epsilon.
    """
    abar = scheduler.alphas_cumprod.to(t.device)[t].double()
    snr = abar / (1 - abar)
    base = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    return (snr.clamp(max=gamma) / base).float()


def edm_sigmas(n: int, gen: torch.Generator) -> torch.Tensor:
    """Log-normal training noise levels, ln sigma ~ N(p_mean, p_std^2)."""
    return (EDM["p_mean"] + EDM["p_std"] * torch.randn(n, generator=gen)).exp()


def edm_training_pair(
    x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(network input c_in * x, c_noise, F target) for x = x0 + sigma * noise (Karras et al. eq. 7-8).

    The EDM loss weight lambda(sigma) = 1 / c_out^2 turns the denoiser loss lambda ||D - x0||^2 into the
    unit-weighted ||F - (x0 - c_skip x) / c_out||^2, the form trained here.
    """
    sd = EDM["sigma_data"]
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    x = x0 + s * noise
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (s**2 + sd**2).sqrt()
    return c_in * x, 0.25 * sigma.log(), (x0 - c_skip * x) / c_out


def training_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


@torch.no_grad()
def sample(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    shape: tuple[int, ...],
    config: dict[str, Any],
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process from seeded Gaussian noise; returns samples in the data range ([-1, 1]).

    `model_fn(x, t)` returns the model output (epsilon or v, as the schedule's prediction_type says). The
    noise comes from a CPU generator seeded by `seed`, so results are reproducible across devices' RNGs.
    """
    scheduler = sampling_scheduler(config, sampler)
    steps = int(steps or DEFAULT_STEPS[sampler])
    if not 1 <= steps <= scheduler.config.num_train_timesteps:
        raise FedstError(f"sampling steps {steps}: expected 1..{scheduler.config.num_train_timesteps}")
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(int(seed))
    x = torch.randn(shape, generator=generator).to(device) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(x, t)
        if sampler in EDM_SAMPLERS:  # the timestep is EDM's c_noise = ln(sigma) / 4
            t_batch = torch.full((shape[0],), float(t), device=device)
        else:
            t_batch = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
        out = model_fn(model_in, t_batch)
        kwargs = {"generator": generator} if sampler == "ddpm" else {}
        if sampler == "ddpm" and x.device.type != "cpu":
            kwargs = {}  # a CPU generator cannot feed CUDA noise; seeded via torch.manual_seed instead
        x = scheduler.step(out, t, x, **kwargs).prev_sample
        if on_step is not None:
            on_step(i + 1, steps)
    return x


def to_uint8(images: torch.Tensor) -> np.ndarray:  # noqa: F821
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
