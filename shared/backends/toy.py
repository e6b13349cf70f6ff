"""A deliberately small backend with the same shape as the C2L-ST workflow, for fast federation tests.

Central model: a two-layer convolutional denoiser trained on a site's tiles and spot patches. Adapter:
zero-initialised gene-conditioned FiLM on its hidden layer (central frozen). Synthesis: denoise noisy
site-mean patches under the site's gene conditions. Downstream: the ridge baseline on "stats" encoder features to
expression, real-only vs real+synthetic, on a held-out section. Every step is seeded, so two runs with the
same config (and the same torch thread count, which the caller sets) give bit-identical weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared.arrays import dense
from shared.backends.base import register_backend
from shared.contract import loss_curve
from shared.errors import FedstError
from shared.store.format import PatchStore

if TYPE_CHECKING:
    from shared.config import AdaptConfig, DPConfig, PretrainConfig, RunConfig, SynthesizeConfig
    from shared.progress import Advance

NOISE = 0.5


def _torch():
    import torch

    return torch


def build_central(width: int = 8):
    """The toy 'central model' (module). Parameter names are the contract for what a site may send."""
    torch = _torch()
    nn = torch.nn

    class ToyCentral(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.conv_in = nn.Conv2d(3, width, 3, padding=1)
            self.norm = nn.GroupNorm(2, width)
            self.conv_out = nn.Conv2d(width, 3, 3, padding=1)

        def hidden(self, x):
            return torch.nn.functional.silu(self.norm(self.conv_in(x)))

        def forward(self, x):
            return self.conv_out(self.hidden(x))

    return ToyCentral(width)


def build_adapter(n_genes: int, width: int = 8):
    torch = _torch()
    film = torch.nn.Linear(n_genes, 2 * width)
    torch.nn.init.zeros_(film.weight)
    torch.nn.init.zeros_(film.bias)
    return film


def initial_state(seed: int, width: int = 8) -> dict[str, np.ndarray]:
    torch = _torch()
    torch.manual_seed(seed)
    return {k: v.detach().numpy().copy() for k, v in build_central(width).state_dict().items()}


def _images(array: np.ndarray):
    torch = _torch()
    x = torch.from_numpy(np.array(array)).float().permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def _load(module, state: dict[str, np.ndarray]) -> None:
    torch = _torch()
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})


def _export(module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _conditioned(central, film, x, genes):
    scale, shift = film(genes).chunk(2, dim=1)
    h = central.hidden(x) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return central.conv_out(h)


def _expression(store: PatchStore) -> np.ndarray:
    x = store.spots.X
    return np.nan_to_num(dense(x, np.float32))


def features(store: PatchStore, rows: np.ndarray | None = None) -> np.ndarray:
    """The downstream's non-learned "stats" encoder on the store's patches (on the CPU, like the toy)."""
    from shared.downstream.encoders import create_encoder

    patches = np.asarray(store.patches if rows is None else store.patches[rows])
    return create_encoder("stats", device="cpu").embed(patches)


@register_backend("toy")
class ToyBackend:
    """The toy workflow; the model shape is fixed, so the run config only supplies the phase sections."""

    def __init__(self, run: RunConfig):
        # Settings this backend has no use for are refused, never silently dropped ("DP: not used" after asking
        # for DP would be a privacy surprise).
        if run.dp.epsilon > 0:
            raise FedstError("run config key 'dp.epsilon': the toy backend has no DP-SGD; use backend 'c2l' or 0")
        if run.predictor != "ridge":
            raise FedstError(f"run config key 'predictor' is {run.predictor!r}; the toy backend has only 'ridge'")
        self.run = run

    def initial_state(self, seed: int) -> dict[str, np.ndarray]:
        return initial_state(seed)

    def training_state(self, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(weights)

    def sampling_state(self, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(state)

    def initial_adapter(self, central: dict[str, np.ndarray], panel: list[str]) -> dict[str, np.ndarray]:
        return _export(build_adapter(len(panel)))

    def pretrain(
        self,
        state: dict[str, np.ndarray],
        store: PatchStore,
        settings: PretrainConfig,
        *,
        seed: int,
        prox_mu: float = 0.0,
        server_round: int = 1,
        on_advance: Advance | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Local denoising steps from ``state``; with ``prox_mu`` > 0 a FedProx term pulls toward ``state``."""
        torch = _torch()
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        pool = [a for a in (store.tiles, store.patches) if len(a)]
        images = np.concatenate([np.asarray(a) for a in pool]) if pool else np.zeros((0, 8, 8, 3), np.uint8)
        model = build_central()
        _load(model, state)
        reference = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.Adam(model.parameters(), lr=settings.lr)
        losses = []
        for step in range(settings.steps):
            idx = rng.integers(0, len(images), size=min(settings.batch_size, len(images)))
            x = _images(images[idx])
            noise = torch.randn_like(x)
            loss = torch.nn.functional.mse_loss(model(x + NOISE * noise), noise)
            objective = loss
            if prox_mu > 0:
                objective = loss + prox_mu / 2 * sum(
                    ((p - r) ** 2).sum() for p, r in zip(model.parameters(), reference)
                )
            opt.zero_grad()
            objective.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if on_advance is not None:
                on_advance(step + 1, settings.steps)
        return _export(model), {
            "loss": float(np.mean(losses)),
            "num-examples": float(len(images)),
            **loss_curve(losses),
        }

    def adapt(
        self,
        central_state: dict[str, np.ndarray],
        store: PatchStore,
        settings: AdaptConfig,
        dp: DPConfig,
        *,
        seed: int,
        adapter_state: dict[str, np.ndarray] | None = None,
        work_dir: Path | None = None,
        server_round: int = 1,
        on_advance: Advance | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Train only the FiLM adapter on the site's paired spots; the central weights stay frozen (no DP here:
        ``dp``, ``work_dir`` and ``server_round`` are part of the interface, unused by this backend)."""
        torch = _torch()
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        central = build_central()
        _load(central, central_state)
        central.eval().requires_grad_(False)
        genes_all = _expression(store)
        film = build_adapter(genes_all.shape[1])
        if adapter_state is not None:
            _load(film, adapter_state)
        opt = torch.optim.Adam(film.parameters(), lr=settings.lr)
        losses = []
        for step in range(settings.steps):
            idx = rng.integers(0, store.n_spots, size=min(settings.batch_size, store.n_spots))
            x = _images(np.asarray(store.patches)[idx])
            genes = torch.from_numpy(genes_all[idx])
            noise = torch.randn_like(x)
            loss = torch.nn.functional.mse_loss(_conditioned(central, film, x + NOISE * noise, genes), noise)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if on_advance is not None:
                on_advance(step + 1, settings.steps)
        return _export(film), {
            "loss": float(np.mean(losses)),
            "num-examples": float(store.n_spots),
            **loss_curve(losses),
        }

    def synthesize(
        self,
        central_state: dict[str, np.ndarray],
        adapter_state: dict[str, np.ndarray],
        store: PatchStore,
        out: Path,
        settings: SynthesizeConfig,
        *,
        seed: int,
        on_advance: Advance | None = None,
    ) -> PatchStore:
        """Write ``settings.count`` synthetic pairs (conditions drawn from real spots) as a store flagged synthetic."""
        torch = _torch()
        from shared import keys
        from shared.store.format import StoreWriter

        n = settings.count
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        central = build_central()
        _load(central, central_state)
        genes_all = _expression(store)
        film = build_adapter(genes_all.shape[1])
        _load(film, adapter_state)
        idx = np.sort(rng.integers(0, store.n_spots, size=n))
        import warnings

        mean = _images(np.asarray(store.patches)).mean(0, keepdim=True)
        with torch.no_grad():
            x = mean.repeat(n, 1, 1, 1) + NOISE * torch.randn(n, *mean.shape[1:])
            eps = _conditioned(central, film, x, torch.from_numpy(genes_all[idx]))
            img = ((x - NOISE * eps).clamp(-1, 1) + 1) * 127.5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate obs names are renamed just below
            spots = store.spots[idx].copy()
        spots.obs_names = [f"syn-{i}" for i in range(n)]
        spots.obs[keys.PATCH_INDEX] = np.arange(n)
        spots.obs[keys.SYNTHETIC] = True
        with StoreWriter(out, patch_px=store.patch_px) as writer:
            writer.allocate_patches(n)[:] = img.permute(0, 2, 3, 1).round().byte().numpy()
            writer.set_spots(spots)
            writer.manifest.update(synthetic=True, provenance={"generator": "toy", "seed": seed})
        if on_advance is not None:  # one batch: every pair at once
            on_advance(n, n)
        return PatchStore(out)

    def downstream(
        self,
        store: PatchStore,
        synthetic: PatchStore | None,
        *,
        seed: int,
        predictor: str,
        train_rows: np.ndarray | None = None,
    ) -> dict[str, float]:
        """Ridge predictor on real-only vs real+synthetic training spots (``train_rows``, default all outside the
        test spots), scored on a held-out section (this backend has only ridge: ``predictor`` is unused)."""
        from shared import keys
        from shared.splits import downstream_held_out

        sections = store.spots.obs[keys.SECTION].astype(str).to_numpy()
        held_out = downstream_held_out(sections)
        if held_out is not None:
            test = sections == held_out
        else:
            test = np.random.default_rng(seed).random(len(sections)) < 0.25
        y = _expression(store)
        x = features(store)
        train = ~test if train_rows is None else np.isin(np.arange(len(test)), train_rows) & ~test
        out: dict[str, float] = {"num-examples": float(test.sum())}
        arms = {"real": (x[train], y[train])}
        if synthetic is not None:
            arms["augmented"] = (
                np.concatenate([x[train], features(synthetic)]),
                np.concatenate([y[train], _expression(synthetic)]),
            )
        for arm, (xt, yt) in arms.items():
            pred = _ridge(xt, yt, x[test])
            out[f"{arm}-pcc"] = _mean_pcc(pred, y[test])
            out[f"{arm}-mse"] = float(np.mean((pred - y[test]) ** 2))
        return out


def _ridge(x: np.ndarray, y: np.ndarray, x_new: np.ndarray) -> np.ndarray:
    """The downstream's ridge (shared.downstream.baselines.RidgeBaseline), fitted on (x, y), applied to x_new."""
    from shared.downstream.baselines import RidgeBaseline

    return RidgeBaseline().fit(x, y).predict(x_new)


def _mean_pcc(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-gene PCC (shared.downstream.metrics' zero-variance rule); 0.0 when no gene is defined."""
    from shared.downstream.metrics import pcc_per_gene

    r = pcc_per_gene(pred, truth)
    return float(np.nanmean(r)) if np.isfinite(r).any() else 0.0
