"""Baselines for H&E -> expression: HEST-protocol ridge (collapsed to one affine map) and a small torch MLP."""

from __future__ import annotations

import numpy as np
import pytest

from shared.downstream.baselines import MLPRegressor, RidgeBaseline
from shared.errors import FedstError


def _linear_problem(n: int = 240, d: int = 20, g: int = 5, noise: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.2, 5.0, d) + rng.normal(0, 3, d)  # unequal scales and offsets
    w = rng.normal(size=(d, g)) / np.sqrt(d)
    y = x @ w + noise * rng.normal(size=(n, g))
    return x, y


def test_ridge_collapsed_map_equals_the_sklearn_pipeline() -> None:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _linear_problem()
    model = RidgeBaseline(n_components=8).fit(x, y)
    pipe = Pipeline([("s", StandardScaler()), ("p", PCA(8, random_state=0)), ("r", RidgeCV(alphas=model.alphas))]).fit(
        x, y
    )
    np.testing.assert_allclose(model.predict(x), pipe.predict(x), rtol=1e-4, atol=1e-4)
    assert model.alpha_ == pipe.named_steps["r"].alpha_


def test_ridge_cv_picks_a_large_alpha_for_pure_noise_and_small_for_signal() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 10))
    noise_model = RidgeBaseline(n_components=10).fit(x, rng.normal(size=(200, 3)))
    signal_model = RidgeBaseline(n_components=10).fit(*_linear_problem(d=10, noise=0.05))
    assert noise_model.alpha_ > 100 * signal_model.alpha_


def test_ridge_generalises_and_round_trips(tmp_path) -> None:
    x, y = _linear_problem(n=300)
    model = RidgeBaseline(n_components=20).fit(x[:200], y[:200])
    pred = model.predict(x[200:])
    pcc = [np.corrcoef(pred[:, j], y[200:, j])[0, 1] for j in range(y.shape[1])]
    assert min(pcc) > 0.8, pcc
    model.save_pretrained(tmp_path / "ridge")
    back = RidgeBaseline.from_pretrained(tmp_path / "ridge")
    np.testing.assert_array_equal(back.predict(x), model.predict(x))


def test_ridge_rejects_bad_input() -> None:
    x, y = _linear_problem(n=20)
    with pytest.raises(FedstError, match="rows"):
        RidgeBaseline().fit(x, y[:10])
    y = y.copy()
    y[0, 0] = np.nan
    with pytest.raises(FedstError, match="NaN"):
        RidgeBaseline().fit(x, y)
    model = RidgeBaseline(n_components=4).fit(*_linear_problem(n=20))
    with pytest.raises(FedstError, match="expected"):
        model.predict(np.zeros((3, 7)))


def test_mlp_learns_a_nonlinear_map_ridge_cannot_and_round_trips(tmp_path) -> None:
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(2)
    x = rng.uniform(-2, 2, size=(600, 2))
    y = np.stack([x[:, 0] ** 2, np.abs(x[:, 1])], 1)  # even functions: no linear signal at all
    mlp = MLPRegressor(2, 2, hidden=64).fit(x[:500], y[:500], epochs=150, batch_size=64, seed=0)
    ridge = RidgeBaseline(n_components=2).fit(x[:500], y[:500])
    mse_mlp = ((mlp.predict(x[500:]) - y[500:]) ** 2).mean()
    mse_ridge = ((ridge.predict(x[500:]) - y[500:]) ** 2).mean()
    assert mse_mlp < 0.3 * mse_ridge, (mse_mlp, mse_ridge)
    assert mlp.history[-1]["train"] < mlp.history[0]["train"]
    mlp.save_pretrained(tmp_path / "mlp")
    back = MLPRegressor.from_pretrained(tmp_path / "mlp")
    np.testing.assert_array_equal(back.predict(x), mlp.predict(x))


def test_mlp_mask_ignores_unmeasured_entries() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 4))
    y = np.stack([x[:, 0], x[:, 1]], 1)
    corrupted = y.copy()
    corrupted[:100, 1] = 50.0  # garbage where the gene was "not measured"
    mask = np.ones_like(y)
    mask[:100, 1] = 0
    mlp = MLPRegressor(4, 2, hidden=32).fit(x, corrupted, mask, epochs=80, batch_size=50, seed=0)
    assert np.abs(mlp.predict(x)[:, 1]).max() < 10.0
