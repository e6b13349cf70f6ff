"""Central training recipes beside the default DDPM one: min-SNR-gamma weighting and the EDM parametrisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.errors import FedstError

SMALL = dict(sample_size=16, block_out_channels=(16, 32), norm_num_groups=4)


def test_min_snr_weight_is_min_snr_gamma_on_the_implied_x0_error():
    from shared.c2l.schedule import min_snr_weight
    from shared.diffusion import train_scheduler

    sched = train_scheduler({"prediction_type": "v_prediction"})
    t = torch.tensor([5, 100, 400, 700, 990])
    x0, noise, v_hat = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    x_t = sched.add_noise(x0, noise, t)
    abar = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_hat = abar.sqrt() * x_t - (1 - abar).sqrt() * v_hat  # the x0 a v-prediction implies
    snr = (abar / (1 - abar)).flatten()
    v_loss = (v_hat - sched.get_velocity(x0, noise, t)).pow(2).flatten(1).mean(1)
    x0_loss = (x0_hat - x0).pow(2).flatten(1).mean(1)
    weighted = v_loss * min_snr_weight(sched, t, 5.0)
    assert torch.allclose(weighted, snr.clamp(max=5.0) * x0_loss, rtol=1e-4)
    assert snr[0] > 5 > snr[-1]  # both branches of the min are exercised


def test_edm_training_pair_matches_the_diffusers_sampler_preconditioning():
    from shared.c2l.schedule import edm_training_pair
    from shared.diffusion import edm_scheduler

    sched = edm_scheduler("edm_dpm")
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    sigma = torch.tensor([0.01, 0.3, 2.0, 60.0])
    model_in, c_noise, target = edm_training_pair(x0, noise, sigma)
    s4 = sigma.view(-1, 1, 1, 1)
    x = x0 + s4 * noise
    assert torch.allclose(sched.precondition_inputs(x, s4), model_in, atol=1e-6)
    assert torch.allclose(sched.precondition_noise(sigma), c_noise)
    # the exact F target, run through the sampler's output preconditioning, gives back the clean image
    assert torch.allclose(sched.precondition_outputs(x, target, s4), x0, atol=1e-4)


@pytest.mark.parametrize("sampler", ["edm_dpm", "edm_euler"])
def test_edm_samplers_reach_the_data_of_an_oracle_denoiser(sampler):
    from shared.c2l.schedule import sample
    from shared.diffusion import EDM

    centre = torch.full((2, 3, 4, 4), 0.4)  # a point mass: the ideal denoiser returns it at every sigma

    def oracle(x_in, c_noise):
        sigma = (4 * c_noise).exp().view(-1, 1, 1, 1)
        sd = EDM["sigma_data"]
        x = x_in * (sigma**2 + sd**2).sqrt()
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        return (centre - c_skip * x) / c_out

    out = sample(oracle, (2, 3, 4, 4), {}, sampler=sampler, steps=10, seed=0)
    assert torch.allclose(out, centre, atol=1e-3)


def test_recipes_train_deterministically_stop_on_request_and_reject_bad_names(tmp_path):
    from shared.c2l.central import create_central
    from shared.c2l.toy import write_toy_store
    from shared.c2l.train import train_central

    store = write_toy_store(tmp_path / "s", n_spots=32, n_tiles=32, patch_px=16, seed=0)
    results = {}
    for name, kwargs in {
        "none": {},
        "min_snr": {"loss_weighting": "min_snr"},
        "edm": {"parametrization": "edm"},
    }.items():
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            model = create_central("tiny", **SMALL)
            summary = train_central(model, [store], steps=3, batch_size=4, lr=1e-3, progress=False, **kwargs)
            runs.append((summary["losses"], model.weights_hash()))
        assert runs[0] == runs[1]
        results[name] = runs[0][0]
    assert results["none"] != results["min_snr"] != results["edm"]
    torch.manual_seed(0)
    model = create_central("tiny", **SMALL)
    stopped = train_central(model, [store], steps=100, batch_size=4, progress=False, on_step=lambda s, _: s >= 2)
    assert stopped["steps"] == 2 and len(stopped["losses"]) == 2
    assert np.isfinite(stopped["steps_per_s"])
    with pytest.raises(FedstError, match="loss_weighting"):
        train_central(model, [store], steps=1, progress=False, loss_weighting="snr")
    with pytest.raises(FedstError, match="EDM"):
        train_central(model, [store], steps=1, progress=False, parametrization="edm", loss_weighting="min_snr")
