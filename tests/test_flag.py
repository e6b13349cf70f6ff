"""FLAG: VE-SDE score model over gene tokens conditioned on a spatial graph of spot image features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.downstream.flag.regressor import FlagRegressor, FlagSettings
from shared.downstream.flag.sde import heun_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_heun_sampler_recovers_a_known_gaussian() -> None:
    """With the exact Tweedie denoiser of N(mu, s^2), the PF-ODE is linear: x0 - mu = s/sqrt(s^2 + smax^2)
    (x_T - mu). The VE prior N(0, smax^2) ignores mu, so the sample mean is mu - mu s / sqrt(s^2 + smax^2)."""
    mu, s = 2.0, 0.5

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sig2 = sigma[:, None] ** 2
        return mu + s**2 / (s**2 + sig2) * (x - mu)

    gen = torch.Generator().manual_seed(0)
    x = heun_sample(denoise, (4000, 2), steps=20, sigma_min=0.01, sigma_max=10.0, generator=gen)
    shrink = s / np.sqrt(s**2 + 10.0**2)
    assert abs(float(x.mean()) - (mu - mu * shrink)) < 0.02
    assert abs(float(x.std()) - 10.0 * shrink) < 0.02
    again = heun_sample(denoise, (4000, 2), 20, 0.01, 10.0, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def _toy_problem(n_per_section: int = 60, n_genes: int = 6, seed: int = 0):
    """Two sections on a grid; expression is a fixed linear map of the features plus noise."""
    rng = np.random.default_rng(seed)
    n = 2 * n_per_section
    feats = rng.normal(size=(n, 8)).astype(np.float32)
    weights = rng.normal(size=(8, n_genes)).astype(np.float32)
    expr = np.log1p(np.exp(feats @ weights * 0.5)).astype(np.float32)
    side = int(np.ceil(np.sqrt(n_per_section)))
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n_per_section] * 150.0
    coords = np.concatenate([grid, grid]).astype(np.float64)
    sections = np.array(["a"] * n_per_section + ["b"] * n_per_section)
    genes = [f"G{i}" for i in range(n_genes)]
    return feats, expr, coords, sections, genes


@pytest.fixture(scope="module")
def fitted() -> tuple[FlagRegressor, tuple]:
    data = _toy_problem()
    settings = FlagSettings(preset="tiny", steps=250, batch_crops=2, sample_steps=8, n_samples=2, seed=0)
    return FlagRegressor(settings, device="cpu").fit(*data, mpp=1.0), data


def test_training_loss_decreases_and_predictions_follow_truth(fitted) -> None:
    reg, (feats, expr, coords, sections, genes) = fitted
    history = np.asarray(reg.history)
    assert history[-25:].mean() < 0.7 * history[:25].mean()
    pred = reg.predict(feats, coords, sections, mpp=1.0)
    assert pred.shape == expr.shape and (pred >= 0).all()
    pcc = [np.corrcoef(pred[:, g], expr[:, g])[0, 1] for g in range(expr.shape[1])]
    assert np.mean(pcc) > 0.5, pcc


def test_sampling_is_deterministic_by_seed(fitted) -> None:
    reg, (feats, _, coords, sections, _) = fitted
    a = reg.predict(feats, coords, sections, mpp=1.0, seed=3)
    np.testing.assert_array_equal(a, reg.predict(feats, coords, sections, mpp=1.0, seed=3))
    assert not np.array_equal(a, reg.predict(feats, coords, sections, mpp=1.0, seed=4))


def test_save_load_restores_the_exact_model(fitted, tmp_path) -> None:
    reg, (feats, _, coords, sections, _) = fitted
    reg.save_pretrained(tmp_path / "flag")
    back = FlagRegressor.from_pretrained(tmp_path / "flag", device="cpu")
    np.testing.assert_array_equal(
        back.predict(feats, coords, sections, mpp=1.0), reg.predict(feats, coords, sections, mpp=1.0)
    )


def test_edge_condition_switch_changes_the_condition(fitted) -> None:
    reg, (feats, _, coords, sections, _) = fitted
    from shared.downstream.flag.regressor import _pad_batch

    crop = reg._crops(feats, coords, sections, 1.0)[0]
    f, edges, pad = _pad_batch([crop], "cpu")
    model = reg.model
    with torch.no_grad():
        with_edges = model.condition(f, edges, pad)
        model.use_edge_conditions = False
        try:
            without = model.condition(f, edges, pad)
        finally:
            model.use_edge_conditions = True
    assert not torch.allclose(with_edges, without)
