"""The real workflow backend: C2L-ST (shared/c2l) for pretrain/adapt/synthesize, shared/downstream for the
predictor. Same function shapes as shared/backends/toy.py; state crosses as plain numpy state dicts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.config import RunConfig
from shared.errors import FedstError


def _to_numpy(state) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def _to_torch(state: dict[str, np.ndarray]):
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


@dataclass
class C2LBackend:
    preset: str
    patch_px: int
    sample_steps: int = 10
    hidden_dim: int = 64  # the c2l defaults: ~5% of the tiny central model's parameters
    embed_dim: int = 32

    def central(self, state: dict[str, np.ndarray] | None = None):
        from shared.c2l.central import create_central

        model = create_central(self.preset, sample_size=self.patch_px)
        if state is not None:
            missing = set(model.state_dict()) ^ set(state)
            if missing:
                raise FedstError(
                    f"central weights do not match the {self.preset} preset (e.g. tensor {sorted(missing)[0]!r})"
                )
            model.load_state_dict(_to_torch(state))
        return model

    def initial_state(self, seed: int) -> dict[str, np.ndarray]:
        import torch

        torch.manual_seed(seed)
        return _to_numpy(self.central().state_dict())

    def initial_adapter(self, central: dict[str, np.ndarray], panel: list[str]) -> dict[str, np.ndarray]:
        import torch

        from shared.c2l.modulation import create_conditioned

        torch.manual_seed(0)
        return _to_numpy(
            create_conditioned(self.central(central), panel, self.hidden_dim, self.embed_dim).modulation.state_dict()
        )

    def pretrain(self, state, store, *, steps: int, batch_size: int, lr: float, seed: int, prox_mu: float = 0.0):
        import torch

        from shared.c2l.train import train_central

        torch.set_num_threads(max(1, torch.get_num_threads()))
        model = self.central(state)
        reference = {k: v.detach().clone() for k, v in model.state_dict().items()}
        summary = train_central(
            model,
            [store],
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            prox_mu=prox_mu,
            prox_reference=reference,
            progress=False,
        )
        return _to_numpy(model.state_dict()), {
            "loss": float(summary["mean_loss"]),
            "num-examples": float(summary["n_examples"]),
        }

    def adapt(
        self,
        central,
        store,
        *,
        adapter_state=None,
        steps: int,
        batch_size: int,
        lr: float,
        seed: int,
        dp_epsilon: float = 0.0,
        dp_delta: float = 1e-5,
        max_grad_norm: float = 1.0,
        work_dir: Path | None = None,
    ):
        from shared.c2l.adapt import adapt
        from shared.c2l.dp import DPConfig
        from shared.c2l.modulation import save_adapter

        kwargs: dict[str, Any] = {}
        if adapter_state is not None:  # federated adaptation: start from the round's averaged modulation
            kwargs["initial_modulation"] = _to_torch(adapter_state)
        dp = (
            DPConfig(target_epsilon=dp_epsilon, target_delta=dp_delta, max_grad_norm=max_grad_norm)
            if dp_epsilon > 0
            else None
        )
        model, summary = adapt(
            self.central(central),
            store,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            dp=dp,
            hidden_dim=self.hidden_dim,
            embed_dim=self.embed_dim,
            progress=False,
            **kwargs,
        )
        if work_dir is not None:
            save_adapter(model, Path(work_dir) / "adapter")  # the c2l-format adapter, for `fedst c2l synthesize`
        metrics = {
            "loss": float(np.mean(summary.get("losses") or [summary.get("mean_loss", 0.0)])),
            "num-examples": float(summary["n_spots"]),
            "trainable-fraction": float(summary["trainable_fraction"]),
        }
        if summary.get("epsilon") is not None:
            metrics.update(epsilon=float(summary["epsilon"]), delta=float(summary["delta"]))
        return _to_numpy(model.modulation.state_dict()), metrics

    def conditioned(self, central, adapter_state, panel):
        from shared.c2l.modulation import create_conditioned

        model = create_conditioned(self.central(central), panel, self.hidden_dim, self.embed_dim)
        model.modulation.load_state_dict(_to_torch(adapter_state))
        return model

    def synthesize(self, central, adapter_state, store, out: Path, *, n: int, seed: int, steps: int | None = None):
        from shared.c2l.synthesize import synthesize

        model = self.conditioned(central, adapter_state, store.panel)
        return synthesize(
            model.central, model, store, n, out, steps=steps or self.sample_steps, seed=seed, progress=False
        )

    def downstream(self, store, synthetic, *, seed: int, predictor: str = "ridge") -> dict[str, float]:
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
        train_rows = np.flatnonzero(sections != held_out)
        out: dict[str, float] = {"num-examples": float((sections == held_out).sum())}
        arms = {"real": []} if synthetic is None else {"real": [], "augmented": [synthetic]}
        for arm, extra in arms.items():
            model = train_predictor(
                [store], kind=predictor, extra_stores=extra, seed=seed, progress=False, spot_indices={store: train_rows}
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


def for_run(run: RunConfig) -> C2LBackend:
    return C2LBackend(preset=run.preset, patch_px=run.patch_px, sample_steps=run.sample_steps)
