"""Central pretraining on unlabeled tiles and spot patches (denoising score matching), FedProx-ready."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from shared.c2l.central import CentralDiffusion
from shared.c2l.data import PretrainImages, augment
from shared.c2l.progress import StepBar
from shared.c2l.schedule import training_target
from shared.diffusion import train_scheduler
from shared.errors import FedstError
from shared.store.format import PatchStore

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel


def default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def diffusion_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example mean squared error (B,) — per-example so DP-SGD can clip it."""
    return (output.float() - target.float()).pow(2).flatten(1).mean(1)


def train_central(
    model: CentralDiffusion,
    stores: Sequence[PatchStore],
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 2e-4,
    seed: int = 0,
    device: str | torch.device | None = None,
    prox_mu: float = 0.0,
    prox_reference: Mapping[str, torch.Tensor] | None = None,
    ema: EMAModel | None = None,
    progress: bool = True,
    use_patches: bool = True,
    augmentation: bool = True,
) -> dict[str, Any]:
    """Train `model` in place for `steps` optimizer steps; deterministic given `seed` on CPU.

    With `prox_mu > 0` the loss adds mu/2 * ||w - w_ref||^2 over the parameters (FedProx), `prox_reference`
    being the global state dict (defaults to the weights at the start of this call). The model is returned
    to the device it came from, so the caller's `model.state_dict()` is what was trained.
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise FedstError(f"train_central: steps ({steps}) and batch_size ({batch_size}) must be >= 1, lr ({lr}) > 0")
    if prox_mu < 0:
        raise FedstError(f"train_central: prox_mu must be >= 0, got {prox_mu}")
    images = PretrainImages(stores, model.sample_size, use_patches=use_patches)
    dev = default_device(device)
    home = next(model.parameters()).device
    model.to(dev).train()
    if ema is not None:
        ema.to(dev)  # its shadow follows the weights it averages
    scheduler = train_scheduler(model.config)
    gen = torch.Generator().manual_seed(int(seed))
    if prox_mu > 0:
        ref_source = prox_reference if prox_reference is not None else model.state_dict()
        reference = {n: ref_source[n].detach().to(dev).clone() for n, _ in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    start = time.perf_counter()
    with StepBar(steps, "pretrain", progress) as bar:
        for step in range(steps):
            idx = torch.randint(0, len(images), (batch_size,), generator=gen)
            x0 = images.batch(idx)
            if augmentation:
                x0 = augment(x0, gen)
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
            x0, noise, t = x0.to(dev), noise.to(dev), t.to(dev)
            x_t = scheduler.add_noise(x0, noise, t)
            loss = diffusion_loss(model(x_t, t), training_target(scheduler, x0, noise, t)).mean()
            total = loss
            if prox_mu > 0:
                prox = sum((p - reference[n]).pow(2).sum() for n, p in model.named_parameters())
                total = loss + 0.5 * prox_mu * prox
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if ema is not None:
                ema.step(model.parameters())
            losses.append(float(loss.detach()))
            bar.advance(step + 1, loss=losses[-1])
    seconds = time.perf_counter() - start
    model.to(home)
    if ema is not None:
        ema.to(home)
    return {
        "losses": losses,
        "mean_loss": float(sum(losses) / len(losses)),
        "n_examples": len(images),
        "steps": steps,
        "batch_size": batch_size,
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "device": str(dev),
        "prox_mu": prox_mu,
    }
