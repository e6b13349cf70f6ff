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


def test_preconditioning_known_answers() -> None:
    """ "eps": D = x - sigma F. "edm": with F = 0, D = x / (sigma^2 + 1), the exact Tweedie denoiser of N(0, 1)
    data (genes are z-scored); the loss weights make both losses unit-scale in F."""
    from shared.downstream.flag.model import FlagModel

    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)) * 4.0
    raw = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.01, 0.1, 1.0, 3.0, 10.0])
    eps_model = FlagModel.from_preset("tiny", n_genes=3, feat_dim=4)
    edm_model = FlagModel.from_preset("tiny", n_genes=3, feat_dim=4, precondition="edm")
    assert eps_model.config["precondition"] == "eps"  # the constructor default: configs saved before the switch
    torch.testing.assert_close(eps_model.precondition(x, sigma, raw), x - sigma[:, None] * raw)
    torch.testing.assert_close(edm_model.precondition(x, sigma, torch.zeros_like(x)), x / (sigma[:, None] ** 2 + 1))
    torch.testing.assert_close(eps_model.loss_weight(sigma), 1 / sigma**2)
    c_out = sigma / torch.sqrt(sigma**2 + 1)
    torch.testing.assert_close(edm_model.loss_weight(sigma), 1 / c_out**2)


def test_dsm_loss_with_eps_weight_is_the_noise_mse() -> None:
    """Oracle: weight 1/sigma^2 on || D - x0 ||^2 with D = x - sigma F equals || F - eps ||^2 (same draws)."""
    from shared.downstream.flag.sde import dsm_loss, sample_sigma

    x0 = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    w = torch.randn(5, 5, generator=torch.Generator().manual_seed(3)) * 0.1

    def raw(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ w) + sigma[:, None] * 0.01

    loss = dsm_loss(
        lambda x, s: x - s[:, None] * raw(x, s),
        x0,
        0.01,
        10.0,
        lambda s: 1 / s**2,
        None,
        torch.Generator().manual_seed(4),
    )
    gen = torch.Generator().manual_seed(4)
    sigma = sample_sigma(64, 0.01, 10.0, gen)
    eps = torch.randn(x0.shape, generator=gen)
    expected = ((raw(x0 + sigma[:, None] * eps, sigma) - eps) ** 2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_settings_are_validated() -> None:
    from shared.errors import FedstError

    with pytest.raises(FedstError, match="predict 'draw'"):
        FlagSettings(predict="draw")
    with pytest.raises(FedstError, match="precondition 've'"):
        FlagSettings(precondition="ve")
    assert (FlagSettings().predict, FlagSettings().precondition) == ("mean", "edm")


def test_fitted_model_records_its_preconditioning(fitted) -> None:
    reg, _ = fitted
    assert reg.model.config["precondition"] == "edm"


def test_mean_prediction_beats_averaged_samples_when_the_image_explains_little() -> None:
    """Weak signal (a quarter of each gene's variance): averaged samples carry the conditional noise, the
    conditional mean does not (regressor.py's docstring), so its PCC against fresh noise is clearly higher.
    The best possible PCC is sqrt(0.36 / 1.36) = 0.51; two averaged ideal samples reach 0.33."""
    feats, _, coords, sections, genes = _toy_problem(n_per_section=80, n_genes=4, seed=1)
    rng = np.random.default_rng(5)
    signal = feats[:, :4] * 0.6
    expr = (2.0 + signal + rng.normal(size=signal.shape)).astype(np.float32)
    settings = FlagSettings(preset="tiny", steps=300, batch_crops=2, n_samples=2, sample_steps=6, seed=0)
    reg = FlagRegressor(settings, device="cpu").fit(feats, expr, coords, sections, genes, mpp=1.0)

    fresh = 2.0 + signal + rng.normal(size=signal.shape)  # same spots, new noise: a held-out measurement

    def pcc(pred: np.ndarray) -> float:
        return float(np.mean([np.corrcoef(pred[:, g], fresh[:, g])[0, 1] for g in range(expr.shape[1])]))

    mean = pcc(reg.predict(feats, coords, sections, mpp=1.0))
    sample = pcc(reg.predict(feats, coords, sections, mpp=1.0, mode="sample"))
    assert mean > 0.3 and mean > sample + 0.06, (mean, sample)
