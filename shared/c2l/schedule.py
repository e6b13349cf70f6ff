"""C2L-ST's use of the noise schedules (shared.diffusion): training targets, the seeded reverse process."""

from __future__ import annotations

from typing import Any, Callable

import torch

from shared.diffusion import sampling_scheduler
from shared.errors import FedstError

DEFAULT_STEPS = {"ddim": 50, "dpm": 25, "ddpm": 1000}


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
