"""Image sampling from a central or conditioned model, with classifier-free guidance."""

from __future__ import annotations

from typing import Callable

import torch

from shared.c2l.central import CentralDiffusion
from shared.c2l.modulation import ConditionedDiffusion
from shared.c2l.schedule import sample


def guided_fn(
    model: ConditionedDiffusion, expression: torch.Tensor, mask: torch.Tensor, guidance: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """model_fn for the sampler: out_null + g * (out_cond - out_null); g = 1 is plain conditional sampling."""
    null_e, null_m = torch.zeros_like(expression), torch.zeros_like(mask)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if guidance == 1.0:
            return model(x, t, expression, mask)
        if guidance == 0.0:
            return model(x, t, null_e, null_m)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([expression, null_e]), torch.cat([mask, null_m]))
        cond, uncond = out.chunk(2)
        return uncond + guidance * (cond - uncond)

    return fn


@torch.no_grad()
def sample_conditioned(
    model: ConditionedDiffusion,
    expression: torch.Tensor,
    mask: torch.Tensor,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    guidance: float = 2.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """(B, 3, P, P) images in [-1, 1] for the B conditions."""
    model.eval()
    px = model.central.sample_size
    fn = guided_fn(model, expression.to(device), mask.to(device), float(guidance))
    return sample(
        fn, (len(expression), 3, px, px), model.central.config, sampler=sampler, steps=steps, seed=seed, device=device
    )


@torch.no_grad()
def sample_central(
    model: CentralDiffusion,
    n: int,
    *,
    sampler: str = "ddim",
    steps: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    model.eval()
    px = model.sample_size
    return sample(model, (n, 3, px, px), model.config, sampler=sampler, steps=steps, seed=seed, device=device)
