"""Local adaptation: freeze the central model, train only the gene-conditioned modulation (optionally DP-SGD)."""

from __future__ import annotations

import copy
import secrets
import time
import warnings
from typing import Any, Callable

import torch

from shared.c2l.central import CentralDiffusion
from shared.c2l.data import PairedSpots, augment
from shared.c2l.dp import DPConfig, PrivacyLedger, plan
from shared.c2l.modulation import ConditionedDiffusion, create_conditioned
from shared.c2l.progress import StepBar
from shared.c2l.schedule import training_target
from shared.c2l.train import default_device, diffusion_loss
from shared.diffusion import train_scheduler
from shared.errors import FedstError
from shared.store.format import PatchStore
from shared.weights import load_state_strict


def check_panel(central: CentralDiffusion, store: PatchStore) -> None:
    if central.panel is not None and central.panel != store.panel:
        raise FedstError(
            f"{store.path}: gene panel ({len(store.panel)} genes) differs from the central model's consortium "
            f"panel ({len(central.panel)} genes); prepare the store with the consortium panel"
        )


def drop_conditions(expression: torch.Tensor, mask: torch.Tensor, p: float, gen: torch.Generator):
    """Condition dropout: with probability p a row becomes the null condition (nothing measured)."""
    if p <= 0:
        return expression, mask
    keep = (torch.rand(expression.shape[0], generator=gen) >= p).to(expression.dtype)[:, None]
    return expression * keep, mask * keep


def sample_timesteps(n: int, num_train_timesteps: int, power: float, gen: torch.Generator) -> torch.Tensor:
    """t = floor(T * u ** power), u ~ U(0, 1): power 1 is uniform, power < 1 favours high noise levels."""
    if power == 1.0:
        return torch.randint(0, num_train_timesteps, (n,), generator=gen)
    u = torch.rand(n, generator=gen)
    return (u.pow(power) * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


def adapt(
    central: CentralDiffusion,
    store: PatchStore,
    *,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 1e-3,
    seed: int = 0,
    dp: DPConfig | None = None,
    cond_dropout: float = 0.1,
    hidden_dim: int = 64,
    embed_dim: int = 32,
    device: str | torch.device | None = None,
    augmentation: bool = True,
    progress: bool = True,
    initial_modulation: dict[str, torch.Tensor] | None = None,
    timestep_power: float = 0.3,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    attention_film: bool = False,
    privacy_ledger: PrivacyLedger | None = None,
    ledger_label: str = "adapt",
    on_advance: Callable[[int, int], None] | None = None,
) -> tuple[ConditionedDiffusion, dict[str, Any]]:
    """Adapt a copy of `central` to `store`'s (patch, expression) pairs; `central` itself is not touched.

    Only the GeneModulation is trained; the copied central stays frozen and in eval mode. With `dp`, DP-SGD
    (Opacus, Poisson sampling, per-example clipping) with noise calibrated for exactly `steps` steps; the
    epsilon spent is read back from the accountant. Returns (conditioned model on CPU, summary).
    `initial_modulation` starts from given modulation weights (federated adaptation: the round's average)
    instead of the zero-initialised ones. `timestep_power < 1` draws more high-noise timesteps
    (t = T * u ** power): the genes decide what the noisy image cannot show yet (overall colour, cell
    density), so that is where the modulation learns; 0.3 (the default) with a v-prediction central (every
    preset's) learns a clear gene signal in 200 steps where uniform timesteps with epsilon prediction learn
    almost none. `lora_rank > 0`
    also trains LoRA adapters on the attention projections (counted in the trainable fraction);
    `attention_film` also lets the genes modulate every attention block's normalised input (adaLN-style).
    With `privacy_ledger` (DP with a target epsilon), this call's steps are recorded in the site's ledger before
    the first step and refused when they would take the site past `dp.target_epsilon`; the summary's `epsilon` is
    then the cumulative spend, `epsilon_round` this call's alone. `on_advance(done, steps)` runs after each step,
    with the progress bar on or off (a federated site's progress record, shared.progress).
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise FedstError(f"adapt: steps ({steps}) and batch_size ({batch_size}) must be >= 1, lr ({lr}) > 0")
    if not 0 < timestep_power <= 1:
        raise FedstError(f"adapt: timestep_power must be in (0, 1], got {timestep_power}")
    if lora_rank < 0:
        raise FedstError(f"adapt: lora_rank must be >= 0, got {lora_rank}")
    if not 0 <= cond_dropout < 1:
        raise FedstError(f"adapt: cond_dropout must be in [0, 1), got {cond_dropout}")
    check_panel(central, store)
    data = PairedSpots(store, central.sample_size)
    dp_plan = plan(dp, n_examples=len(data), batch_size=batch_size, steps=steps) if dp is not None else None
    cumulative = None
    if dp_plan is not None and privacy_ledger is not None:
        if dp.target_epsilon is None:
            raise FedstError(
                "adapt: a privacy ledger needs a target epsilon (the budget), not a fixed noise multiplier"
            )
        cumulative = privacy_ledger.spend(dp_plan, steps, budget=float(dp.target_epsilon), label=ledger_label)
    dev = default_device(device)
    torch.manual_seed(int(seed))
    model = create_conditioned(
        copy.deepcopy(central).cpu(), store.panel, hidden_dim, embed_dim, lora_rank, lora_alpha, attention_film
    )
    if initial_modulation is not None:
        load_state_strict(model.modulation, initial_modulation, "adapt: initial modulation")
    model = model.to(dev)
    model.train()
    scheduler = train_scheduler(central.config)
    gen = torch.Generator().manual_seed(int(seed))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    engine = None
    trainer: torch.nn.Module = model
    batches = None
    if dp_plan is not None:
        from opacus import PrivacyEngine

        # The Poisson sampling and the noise must be secret from the server for the guarantee (it knows the seed):
        # from os.urandom unless the caller asked for deterministic DP (tests).
        sampling_seed, noise_seed = (
            (int(seed), int(seed) + 1) if dp.deterministic else (secrets.randbits(63), secrets.randbits(63))
        )
        loader = torch.utils.data.DataLoader(
            data, batch_size=batch_size, generator=torch.Generator().manual_seed(sampling_seed)
        )
        engine = PrivacyEngine(accountant="rdp")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer, optimizer, loader = engine.make_private(
                    module=model,
                    optimizer=optimizer,
                    data_loader=loader,
                    noise_multiplier=dp_plan.noise_multiplier,
                    max_grad_norm=dp.max_grad_norm,
                    poisson_sampling=True,
                    noise_generator=torch.Generator(device=dev).manual_seed(noise_seed),
                    grad_sample_mode=dp.grad_sample_mode,
                )
        except Exception as exc:  # Opacus rejects unsupported trainable layers here, before any step
            raise FedstError(f"Opacus cannot make this adapter private: {exc}") from None
        batches = _cycle(loader)

    losses: list[float] = []
    step_seconds: list[float] = []
    start = time.perf_counter()
    with StepBar(steps, "adapt" + (" (DP)" if dp_plan else ""), progress, on_advance) as bar:
        for step in range(steps):
            if batches is not None:
                x0, expression, mask = next(batches)
                if len(x0) == 0:  # Poisson sampling drew nobody: the step still counts for privacy
                    engine.accountant.step(noise_multiplier=dp_plan.noise_multiplier, sample_rate=dp_plan.sample_rate)
                    losses.append(float("nan"))
                    continue
            else:
                x0, expression, mask = data.batch(torch.randint(0, len(data), (batch_size,), generator=gen))
            t0 = time.perf_counter()
            if augmentation:
                x0 = augment(x0, gen)
            expression, mask = drop_conditions(expression, mask, cond_dropout, gen)
            noise = torch.randn(x0.shape, generator=gen)
            t = sample_timesteps(len(x0), scheduler.config.num_train_timesteps, timestep_power, gen)
            x0, noise, t, expression, mask = (v.to(dev) for v in (x0, noise, t, expression, mask))
            x_t = scheduler.add_noise(x0, noise, t)
            loss = diffusion_loss(trainer(x_t, t, expression, mask), training_target(scheduler, x0, noise, t)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if engine is None:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step_seconds.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            bar.advance(step + 1, loss=losses[-1])
    seconds = time.perf_counter() - start
    if engine is not None:
        trainer._close()  # drop Opacus hooks and per-sample gradients; `model` keeps the trained weights
    model.to("cpu").train(False)
    for p in model.parameters():
        p.grad = None
    summary: dict[str, Any] = {
        "losses": losses,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "n_spots": len(data),
        "cond_dropout": cond_dropout,
        "trainable_params": model.trainable_parameters(),
        "central_params": model.central.num_parameters(),
        "trainable_fraction": model.trainable_fraction(),
        "seconds": seconds,
        "steps_per_s": steps / seconds,
        "mean_step_seconds": float(sum(step_seconds) / max(len(step_seconds), 1)),
        "device": str(dev),
        "dp": None,
        "epsilon": None,
        "delta": None,
    }
    if dp_plan is not None:
        epsilon_round = float(engine.get_epsilon(dp_plan.delta))
        epsilon = epsilon_round if cumulative is None else cumulative
        summary.update(
            epsilon=epsilon,
            epsilon_round=epsilon_round,
            delta=dp_plan.delta,
            dp={
                **dp.to_dict(),
                "noise_multiplier": dp_plan.noise_multiplier,
                "sample_rate": dp_plan.sample_rate,
                "accountant": "rdp",
                "epsilon_spent": epsilon,
                "delta": dp_plan.delta,
            },
        )
    model.info = {
        "store": str(store.path),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "cond_dropout": cond_dropout,
        "timestep_power": timestep_power,
        "lora_rank": lora_rank,
        "attention_film": attention_film,
        "epsilon": summary["epsilon"],
        "delta": summary["delta"],
        "dp": summary["dp"],
        "trainable_params": summary["trainable_params"],
        "trainable_fraction": summary["trainable_fraction"],
    }
    return model, summary


def _cycle(loader):
    while True:
        yield from loader
