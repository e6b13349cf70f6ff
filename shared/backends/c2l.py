"""The real workflow backend: C2L-ST (shared/c2l) for pretrain/adapt/synthesize, shared/downstream for the
predictor. Every c2l keyword comes from a run-config section (`adapt_model`, `synthesize_pairs` are also what the
experiment harness calls), so no default of shared/c2l decides what a federation computes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared.backends.base import register_backend
from shared.config import AdaptConfig, DPConfig, PretrainConfig, RunConfig, SynthesizeConfig
from shared.contract import loss_curve
from shared.errors import FedstError

if TYPE_CHECKING:
    from shared.progress import Advance
    from shared.store.format import PatchStore

PRESETS = ("tiny", "base", "large")  # shared.c2l.presets.PRESETS, named here without importing torch
PRIVACY_LEDGER = "privacy-ledger.json"  # in the site's work dir (shared.c2l.dp.PrivacyLedger)


def _to_numpy(state) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def _to_torch(state: dict[str, np.ndarray]):
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def central_overrides(run: RunConfig) -> dict[str, Any]:
    """``create_central`` keywords of this run beyond the preset (patch size, the pretrain section's target)."""
    extra: dict[str, Any] = {"sample_size": run.patch_px}
    if run.pretrain.prediction_type:
        extra["prediction_type"] = run.pretrain.prediction_type
    return extra


def adapt_model(central, store: PatchStore, settings: AdaptConfig, dp: DPConfig | None, *, seed: int, **extra: Any):
    """`shared.c2l.adapt.adapt` with every knob of the adapt section (``dp`` None or epsilon 0: no DP);
    ``extra``: per-call keywords (batch size capped by the harness, the round's initial modulation)."""
    from shared.c2l.adapt import adapt
    from shared.c2l.dp import DPConfig as DPTarget

    target = None
    if dp is not None and dp.epsilon > 0:
        target = DPTarget(
            target_epsilon=dp.epsilon,
            target_delta=dp.delta or None,
            max_grad_norm=dp.max_grad_norm,
            calibration_steps=settings.steps * (settings.rounds if settings.federated else 1),
            deterministic=dp.deterministic_noise,
        )
    kwargs: dict[str, Any] = dict(
        steps=settings.steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        cond_dropout=settings.cond_dropout,
        hidden_dim=settings.hidden_dim,
        embed_dim=settings.embed_dim,
        augmentation=settings.augmentation,
        timestep_power=settings.timestep_power,
        lora_rank=settings.lora_rank,
        lora_alpha=settings.lora_alpha or None,
        attention_film=settings.attention_film,
    )
    kwargs.update(extra)
    return adapt(central, store, seed=seed, dp=target, progress=False, **kwargs)


def synthesize_pairs(
    central,
    adapted,
    store: PatchStore,
    n: int,
    out: Path,
    settings: SynthesizeConfig,
    *,
    seed: int,
    on_advance: Advance | None = None,
):
    """`shared.c2l.synthesize.synthesize` with every knob of the synthesize section (``n`` pairs)."""
    from shared.c2l.synthesize import synthesize

    return synthesize(
        central,
        adapted,
        store,
        n,
        out,
        sampler=settings.sampler,
        steps=settings.steps,
        guidance=settings.guidance,
        perturb=settings.perturb,
        batch_size=settings.batch_size,
        seed=seed,
        progress=False,
        on_advance=on_advance,
    )


@register_backend("c2l")
class C2LBackend:
    """C2L-ST: a diffusers UNet pretrained federatedly, a gene-conditioned modulation adapted on each site."""

    def __init__(self, run: RunConfig):
        if run.preset not in PRESETS:
            raise FedstError(f"run config key 'preset' is {run.preset!r}; expected one of {', '.join(PRESETS)}")
        self.run = run

    def central(self, state: dict[str, np.ndarray] | None = None):
        from shared.c2l.central import create_central

        model = create_central(self.run.preset, **central_overrides(self.run))
        if state is not None:
            from shared.c2l.ema import sampling_weights

            state = sampling_weights(state)  # a pretraining state (weights + EMA) loads as its EMA weights
            missing = set(model.state_dict()) ^ set(state)
            if missing:
                raise FedstError(
                    f"central weights do not match the {self.run.preset} preset (e.g. tensor {sorted(missing)[0]!r})"
                )
            model.load_state_dict(_to_torch(state))
        return model

    def initial_state(self, seed: int) -> dict[str, np.ndarray]:
        import torch

        torch.manual_seed(seed)
        return self.training_state(_to_numpy(self.central().state_dict()))

    def training_state(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The weights plus the EMA shadow federated pretraining carries across rounds (pretrain.ema-decay > 0)."""
        from shared.c2l.ema import with_ema

        return with_ema(weights, self.run.pretrain.ema_decay)

    def sampling_state(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What adaptation and sampling use: the EMA weights when pretraining kept them (much better samples at
        CPU budgets: docs/benchmarks.md), else the weights."""
        from shared.c2l.ema import sampling_weights

        return sampling_weights(state)

    def initial_adapter(self, central: dict[str, np.ndarray], panel: list[str]) -> dict[str, np.ndarray]:
        import torch

        torch.manual_seed(0)
        return _to_numpy(self._fresh_conditioned(central, panel).modulation.state_dict())

    def _fresh_conditioned(self, central: dict[str, np.ndarray], panel: list[str]):
        """A conditioned model of the run's adapt settings, its modulation fresh (FiLM at zero)."""
        from shared.c2l.modulation import create_conditioned

        a = self.run.adapt
        return create_conditioned(
            self.central(central), panel, a.hidden_dim, a.embed_dim, a.lora_rank, a.lora_alpha or None, a.attention_film
        )

    def pretrain(
        self,
        state,
        store,
        settings: PretrainConfig,
        *,
        seed: int,
        prox_mu: float = 0.0,
        server_round: int = 1,
        on_advance: Advance | None = None,
    ):
        from shared.c2l.ema import EMA_PREFIX, resume_ema, shadow_state, split_ema
        from shared.c2l.train import train_central

        weights, shadow = split_ema(state)
        model = self.central(weights)
        ema = None
        if shadow is not None:
            ema = resume_ema(model, shadow, settings.ema_decay, (server_round - 1) * settings.steps)
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
        summary = train_central(
            model,
            [store],
            steps=settings.steps,
            batch_size=settings.batch_size,
            lr=settings.lr,
            seed=seed,
            prox_mu=prox_mu,
            prox_reference=reference,
            augmentation=settings.augmentation,
            ema=ema,
            progress=False,
            on_advance=on_advance,
        )
        new_state = _to_numpy(model.state_dict())
        if ema is not None:
            new_state.update({EMA_PREFIX + k: v for k, v in _to_numpy(shadow_state(ema, model)).items()})
        return new_state, {
            "loss": float(summary["mean_loss"]),
            "num-examples": float(summary["n_examples"]),
            **loss_curve(summary["losses"]),
        }

    def adapt(
        self,
        central,
        store,
        settings: AdaptConfig,
        dp: DPConfig,
        *,
        seed: int,
        adapter_state=None,
        work_dir: Path | None = None,
        server_round: int = 1,
        on_advance: Advance | None = None,
    ):
        from shared.c2l.dp import PrivacyLedger
        from shared.c2l.modulation import save_adapter

        extra: dict[str, Any] = {"on_advance": on_advance}
        if adapter_state is not None:  # federated adaptation: start from the round's averaged modulation
            extra["initial_modulation"] = _to_torch(adapter_state)
        if dp.epsilon > 0 and work_dir is not None:  # every DP round this site runs on its data, composed
            extra["privacy_ledger"] = PrivacyLedger(Path(work_dir) / PRIVACY_LEDGER)
            extra["ledger_label"] = f"adapt round {server_round}"
        model, summary = adapt_model(self.central(central), store, settings, dp, seed=seed, **extra)
        if work_dir is not None:
            save_adapter(model, Path(work_dir) / "adapter")  # the c2l-format adapter, for `fedst c2l synthesize`
        metrics = {
            "loss": float(np.mean(summary.get("losses") or [summary.get("mean_loss", 0.0)])),
            "num-examples": float(summary["n_spots"]),
            "trainable-fraction": float(summary["trainable_fraction"]),
        }
        if dp.epsilon <= 0:  # under DP-SGD only the accounted model update should leave: no per-step losses
            metrics.update(loss_curve(summary.get("losses") or []))
        if summary.get("epsilon") is not None:  # cumulative over the site's ledger when it keeps one
            metrics.update(epsilon=float(summary["epsilon"]), delta=float(summary["delta"]))
        return _to_numpy(model.modulation.state_dict()), metrics

    def conditioned(self, central, adapter_state, panel):
        model = self._fresh_conditioned(central, panel)
        model.modulation.load_state_dict(_to_torch(adapter_state))
        return model

    def synthesize(
        self,
        central,
        adapter_state,
        store,
        out: Path,
        settings: SynthesizeConfig,
        *,
        seed: int,
        on_advance: Advance | None = None,
    ):
        model = self.conditioned(central, adapter_state, store.panel)
        return synthesize_pairs(
            model.central, model, store, settings.count, out, settings, seed=seed, on_advance=on_advance
        )

    def downstream(self, store, synthetic, *, seed: int, predictor: str, train_rows=None) -> dict[str, float]:
        from shared import keys
        from shared.downstream.predictor import evaluate_predictor, train_predictor
        from shared.splits import downstream_held_out

        sections = store.spots.obs[keys.SECTION].astype(str).to_numpy()
        held_out = downstream_held_out(sections)
        if held_out is None:
            raise FedstError(
                f"{store.path}: the downstream phase needs >= 2 sections (one is held out), "
                f"found {sorted(set(sections))}"
            )
        if train_rows is None:
            train_rows = np.flatnonzero(sections != held_out)
        if np.any(sections[train_rows] == held_out):
            raise FedstError(f"{store.path}: the predictor's training rows include the held-out section {held_out}")
        out: dict[str, float] = {"num-examples": float((sections == held_out).sum())}
        arms = {"real": []} if synthetic is None else {"real": [], "augmented": [synthetic]}
        for arm, extra in arms.items():
            model = train_predictor(
                [store],
                kind=predictor,
                encoder=self.run.predictor_encoder,
                extra_stores=extra,
                seed=seed,
                progress=False,
                spot_indices={store: train_rows},
            )
            metrics = evaluate_predictor(model, store, sections=[held_out])
            for key, value in _scalars(metrics).items():
                if not key.startswith("per_gene"):  # per-gene scores stay on the site
                    out[f"{arm}-{key}"] = value
        return out


def _scalars(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten the metrics dict to the scalar numbers a site may send (per-gene arrays stay on site)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_scalars(value, f"{name}-"))
        elif (
            isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, bool)
            and np.isfinite(value)
        ):
            flat[name] = float(value)
    return flat
