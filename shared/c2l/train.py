"""Central pretraining on unlabeled tiles and spot patches (denoising score matching), FedProx-ready."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from shared.c2l.central import CentralDiffusion
from shared.c2l.data import PretrainImages, augment
from shared.c2l.progress import StepBar
from shared.c2l.schedule import edm_sigmas, edm_training_pair, min_snr_weight, training_target
from shared.diffusion import train_scheduler
from shared.errors import FedstError
from shared.store.format import PatchStore

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel

LOSS_WEIGHTINGS = ("none", "min_snr")
PARAMETRIZATIONS = ("ddpm", "edm")


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
    loss_weighting: str = "none",
    min_snr_gamma: float = 5.0,
    parametrization: str = "ddpm",
    on_step: Callable[[int, float], bool] | None = None,
    on_advance: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train `model` in place for `steps` optimizer steps; deterministic given `seed` on CPU.

    With `prox_mu > 0` the loss adds mu/2 * ||w - w_ref||^2 over the parameters (FedProx), `prox_reference`
    being the global state dict (defaults to the weights at the start of this call). The model is returned
    to the device it came from, so the caller's `model.state_dict()` is what was trained.

    `loss_weighting="min_snr"` weights the DDPM loss by min-SNR-`min_snr_gamma` (shared.c2l.schedule);
    `parametrization="edm"` trains the network as the EDM denoiser's F (log-normal noise levels, c_noise as
    the timestep input), to be sampled with the `edm_*` samplers. The defaults are the DDPM recipe, unchanged.
    `on_step(step, seconds)` runs after each optimizer step (and EMA update); returning True stops training
    there (benchmarks snapshot the model at wall-clock budgets this way). `on_advance(done, steps)` runs after
    each step too, with the progress bar on or off (a federated site's progress record, shared.progress).
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise FedstError(f"train_central: steps ({steps}) and batch_size ({batch_size}) must be >= 1, lr ({lr}) > 0")
    if prox_mu < 0:
        raise FedstError(f"train_central: prox_mu must be >= 0, got {prox_mu}")
    if loss_weighting not in LOSS_WEIGHTINGS or parametrization not in PARAMETRIZATIONS:
        raise FedstError(
            f"train_central: loss_weighting {loss_weighting!r} (expected {LOSS_WEIGHTINGS}) / parametrization "
            f"{parametrization!r} (expected {PARAMETRIZATIONS})"
        )
    if parametrization == "edm" and loss_weighting != "none":
        raise FedstError(
            "train_central: the EDM parametrisation carries its own loss weighting (loss_weighting='none')"
        )
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
    with StepBar(steps, "pretrain", progress, on_advance) as bar:
        for step in range(steps):
            idx = torch.randint(0, len(images), (batch_size,), generator=gen)
            x0 = images.batch(idx)
            if augmentation:
                x0 = augment(x0, gen)
            noise = torch.randn(x0.shape, generator=gen)
            if parametrization == "edm":
                sigma = edm_sigmas(batch_size, gen)
                x0, noise, sigma = x0.to(dev), noise.to(dev), sigma.to(dev)
                model_in, c_noise, target = edm_training_pair(x0, noise, sigma)
                per_example = diffusion_loss(model(model_in, c_noise), target)
            else:
                t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
                x0, noise, t = x0.to(dev), noise.to(dev), t.to(dev)
                x_t = scheduler.add_noise(x0, noise, t)
                per_example = diffusion_loss(model(x_t, t), training_target(scheduler, x0, noise, t))
                if loss_weighting == "min_snr":
                    per_example = per_example * min_snr_weight(scheduler, t, min_snr_gamma)
            loss = per_example.mean()
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
            if on_step is not None and on_step(step + 1, time.perf_counter() - start):
                break
    seconds = time.perf_counter() - start
    model.to(home)
    if ema is not None:
        ema.to(home)
    return {
        "losses": losses,
        "mean_loss": float(sum(losses) / len(losses)),
        "n_examples": len(images),
        "steps": len(losses),
        "batch_size": batch_size,
        "seconds": seconds,
        "steps_per_s": len(losses) / seconds,
        "device": str(dev),
        "prox_mu": prox_mu,
    }
