"""Baseline regressors from image features to expression: what FLAG and synthetic augmentation must beat.

- ``RidgeBaseline``: the HEST-Benchmark protocol (StandardScaler -> PCA -> ridge) with alpha chosen by
  efficient leave-one-out cross-validation (``RidgeCV``). After fitting, the pipeline is collapsed into one
  affine map ``Y = X @ W + b`` (exactly equal, because every step is affine), which is what is saved
  (``config.json`` + ``weights.safetensors``, shared/persistence.py), so loading needs no pickle.
- ``MLPRegressor``: a small torch MLP (standardised inputs, masked MSE, AdamW, early stopping on a
  validation split). Constructor args are its config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from shared.errors import require
from shared.persistence import Pretrained
from shared.weights import check_state

RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 17))


def _check_xy(features: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    require(features.ndim == 2 and targets.ndim == 2, "features and targets must be 2-D (spots x dims)")
    require(len(features) == len(targets), f"{len(features)} feature rows but {len(targets)} target rows")
    require(len(features) >= 3, f"need at least 3 training spots, got {len(features)}")
    require(np.isfinite(features).all(), "features contain NaN or Inf")
    require(np.isfinite(targets).all(), "targets contain NaN or Inf")
    return features, targets


class RidgeBaseline(Pretrained):
    """StandardScaler -> PCA(n_components) -> RidgeCV(alphas), collapsed to ``X @ W + b``."""

    kind = "ridge"
    weights_name = "weights.safetensors"
    state_config_keys = ("alpha_",)  # the alpha RidgeCV picked: fitted, not a constructor argument
    tensor_framework = "np"

    def __init__(self, n_components: int = 256, alphas: tuple[float, ...] = RIDGE_ALPHAS):
        self.n_components = int(n_components)
        self.alphas = tuple(float(a) for a in alphas)
        self.W: np.ndarray | None = None
        self.b: np.ndarray | None = None
        self.alpha_: float | None = None

    def fit(self, features: np.ndarray, targets: np.ndarray) -> RidgeBaseline:
        from sklearn.decomposition import PCA
        from sklearn.linear_model import RidgeCV
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        X, Y = _check_xy(features, targets)
        n_comp = max(1, min(self.n_components, X.shape[1], X.shape[0] - 1))
        pipe = Pipeline(
            [
                ("scale", StandardScaler()),
                ("pca", PCA(n_components=n_comp, random_state=0)),
                ("ridge", RidgeCV(alphas=self.alphas)),
            ]
        ).fit(X, Y)
        scale, pca, ridge = pipe.named_steps["scale"], pipe.named_steps["pca"], pipe.named_steps["ridge"]
        sd = np.where(scale.scale_ == 0, 1.0, scale.scale_)
        coef = np.atleast_2d(ridge.coef_)  # (G, k)
        proj = pca.components_.T @ coef.T  # (D, G)
        self.W = proj / sd[:, None]
        # z = (x - mean) / sd; y = (z - pca_mean) @ proj + intercept  =>  y = x @ W + b
        self.b = np.atleast_1d(ridge.intercept_) - (scale.mean_ / sd + pca.mean_) @ proj
        self.alpha_ = float(ridge.alpha_)
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        require(self.W is not None, "ridge baseline: not fitted")
        X = np.asarray(features, dtype=np.float64)
        require(
            X.ndim == 2 and X.shape[1] == self.W.shape[0], f"features: expected (N, {self.W.shape[0]}), got {X.shape}"
        )
        return (X @ self.W + self.b).astype(np.float32)

    def pretrained_config(self) -> dict[str, Any]:
        require(self.W is not None, "ridge baseline: not fitted")
        return {"n_components": self.n_components, "alphas": list(self.alphas)}

    def pretrained_tensors(self) -> dict[str, np.ndarray]:
        return {"W": self.W, "b": self.b}

    def load_pretrained_tensors(self, tensors: Mapping[str, Any], source: Path) -> None:
        check_state({"W": (None, None), "b": (None,)}, tensors, source, type(self).__name__)
        W, b = tensors["W"], tensors["b"]
        check_state({"b": (W.shape[1],)}, {"b": b}, source, f"{type(self).__name__} with W of shape {W.shape}")
        self.W, self.b = W, b


def _mlp_module(in_dim: int, out_dim: int, hidden: int, layers: int, dropout: float):
    import torch.nn as nn

    blocks: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout)]
        width = hidden
    blocks.append(nn.Linear(width, out_dim))
    return nn.Sequential(*blocks)


class MLPRegressor(Pretrained):
    """Small MLP on standardised features. ``fit`` keeps the epoch with the best validation loss."""

    kind = "mlp"
    weights_name = "weights.safetensors"

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 256, layers: int = 2, dropout: float = 0.1):
        import torch

        self.config = {
            "in_dim": int(in_dim),
            "out_dim": int(out_dim),
            "hidden": int(hidden),
            "layers": int(layers),
            "dropout": float(dropout),
        }
        self.net = _mlp_module(in_dim, out_dim, hidden, layers, dropout)
        self.x_mean = torch.zeros(in_dim)
        self.x_std = torch.ones(in_dim)
        self.y_mean = torch.zeros(out_dim)
        self.history: list[dict[str, float]] = []

    def fit(
        self,
        features: np.ndarray,
        targets: np.ndarray,
        mask: np.ndarray | None = None,
        *,
        epochs: int = 200,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 256,
        val_fraction: float = 0.1,
        patience: int = 20,
        seed: int = 0,
        device: str = "cpu",
        on_epoch: Callable[[int, float, float], None] | None = None,
    ) -> MLPRegressor:
        import torch

        X, Y = _check_xy(features, targets)
        M = np.ones_like(Y) if mask is None else np.asarray(mask, dtype=np.float64)
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        Xt, Yt, Mt = (torch.tensor(a, dtype=torch.float32) for a in (X, Y, M))
        self.x_mean, self.x_std = Xt.mean(0), Xt.std(0).clamp_min(1e-6)
        self.y_mean = (Yt * Mt).sum(0) / Mt.sum(0).clamp_min(1)
        perm = torch.randperm(len(Xt), generator=gen)
        n_val = int(round(val_fraction * len(Xt))) if len(Xt) >= 20 else 0
        val, tr = perm[:n_val], perm[n_val:]
        net = self.net.to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)

        def loss_of(idx: torch.Tensor) -> torch.Tensor:
            pred = self._forward(Xt[idx].to(device))
            err = (pred - Yt[idx].to(device)) ** 2 * Mt[idx].to(device)
            return err.sum() / Mt[idx].sum().clamp_min(1)

        best, best_state, stale = float("inf"), None, 0
        for epoch in range(epochs):
            net.train()
            order = tr[torch.randperm(len(tr), generator=gen)]
            total = 0.0
            for start in range(0, len(order), batch_size):
                loss = loss_of(order[start : start + batch_size])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * min(batch_size, len(order) - start)
            net.eval()
            with torch.no_grad():
                val_loss = float(loss_of(val)) if n_val else total / len(tr)
            self.history.append({"epoch": epoch, "train": total / len(tr), "val": val_loss})
            if on_epoch is not None:
                on_epoch(epoch, total / len(tr), val_loss)
            if val_loss < best - 1e-6:
                best, stale = val_loss, 0
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                stale += 1
                if stale >= patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        self.net = net.cpu().eval()
        return self

    def _forward(self, x):
        dev = x.device
        return self.net((x - self.x_mean.to(dev)) / self.x_std.to(dev)) + self.y_mean.to(dev)

    def predict(self, features: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        import torch

        X = np.asarray(features, dtype=np.float32)
        require(
            X.ndim == 2 and X.shape[1] == self.config["in_dim"],
            f"features: expected (N, {self.config['in_dim']}), got {X.shape}",
        )
        self.net.eval()
        out = []
        with torch.no_grad():
            for start in range(0, len(X), batch_size):
                out.append(self._forward(torch.from_numpy(X[start : start + batch_size])).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config["out_dim"]), np.float32)

    def state_dict(self) -> dict[str, Any]:
        state = {f"net.{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        state.update(x_mean=self.x_mean.contiguous(), x_std=self.x_std.contiguous(), y_mean=self.y_mean.contiguous())
        return state

    def load_pretrained_tensors(self, tensors: Mapping[str, Any], source: Path) -> None:
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        check_state(expected, tensors, source, type(self).__name__)
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.x_mean, self.x_std, self.y_mean = tensors["x_mean"], tensors["x_std"], tensors["y_mean"]
        self.net.eval()
