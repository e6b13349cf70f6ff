"""C2L-ST core: central model, zero-init modulation, frozen adaptation, DP accounting, samplers, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.errors import FedstError

SMALL = dict(sample_size=16, block_out_channels=(16, 32), norm_num_groups=4)


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory):
    from shared.c2l.toy import write_toy_store

    return write_toy_store(tmp_path_factory.mktemp("toy") / "store", n_spots=64, n_tiles=64, patch_px=32, seed=0)


@pytest.fixture(scope="module")
def central():
    from shared.c2l.central import create_central

    torch.manual_seed(0)
    return create_central("tiny", **SMALL)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_save_load_restores_exact_model(tmp_path, central):
    from shared.c2l.central import CentralDiffusion

    central.save_pretrained(tmp_path / "m")
    loaded = CentralDiffusion.from_pretrained(tmp_path / "m")
    assert loaded.config == central.config
    assert loaded.weights_hash() == central.weights_hash()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    assert torch.equal(loaded.eval()(x, t), central.eval()(x, t))


def test_missing_weights_and_unknown_preset_are_clear_errors(tmp_path, central):
    from shared.c2l.central import CentralDiffusion, create_central

    central.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(FedstError, match="missing weights file"):
        CentralDiffusion.from_pretrained(tmp_path / "m")
    with pytest.raises(FedstError, match="no such model directory"):
        CentralDiffusion.from_pretrained(tmp_path / "absent")
    with pytest.raises(FedstError, match="unknown c2l preset"):
        create_central("huge")


def test_zero_init_conditioned_equals_central_exactly(central):
    from shared.c2l.modulation import create_conditioned

    model = create_conditioned(central, [f"G{i}" for i in range(5)])
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    expr, mask = torch.rand(3, 5) * 4, torch.ones(3, 5)
    with torch.no_grad():
        assert torch.equal(model(x, t, expr, mask), central(x, t))
    model.remove_hooks()


def test_loss_decreases_when_pretraining_on_a_store(toy_store):
    from shared.c2l.central import create_central
    from shared.c2l.train import train_central

    model = create_central("tiny", **SMALL)
    summary = train_central(model, [toy_store], steps=20, batch_size=8, lr=3e-3, seed=0, progress=False)
    losses = np.array(summary["losses"])
    assert summary["n_examples"] == 128  # 64 tiles + 64 spot patches
    assert losses[-5:].mean() < 0.7 * losses[:3].mean()


def test_train_central_is_deterministic_and_prox_pulls_to_reference(toy_store):
    from shared.c2l.central import create_central
    from shared.c2l.train import train_central

    torch.manual_seed(1)
    start = create_central("tiny", **SMALL)
    ref = _state(start)
    runs = []
    for mu in (0.0, 0.0, 100.0):
        model = create_central("tiny", **SMALL)
        model.load_state_dict(ref)
        train_central(
            model, [toy_store], steps=4, batch_size=4, lr=5e-3, seed=3, prox_mu=mu, prox_reference=ref, progress=False
        )
        runs.append(_state(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in ref)
    dist = [sum(float((r[k] - ref[k]).pow(2).sum()) for k in ref if r[k].is_floating_point()) for r in runs]
    assert dist[2] < dist[0]


def test_adaptation_freezes_central_bit_identical_and_reports_fraction(central, toy_store):
    from shared.c2l.adapt import adapt

    before = _state(central)
    model, summary = adapt(central, toy_store, steps=3, batch_size=8, seed=0, progress=False)
    for name, value in before.items():
        assert torch.equal(model.central.state_dict()[name], value), name
        assert torch.equal(central.state_dict()[name], value), name
    assert not model.central.training and all(not m.training for m in model.central.modules())
    model.train()
    assert not model.central.training and model.modulation.training
    assert all(not p.requires_grad for p in model.central.parameters())
    assert any(float(p.abs().sum()) > 0 for p in model.modulation.film.parameters())  # FiLM moved off zero
    assert summary["trainable_params"] == sum(p.numel() for p in model.modulation.parameters())
    assert 0 < summary["trainable_fraction"] <= 0.10
    assert summary["epsilon"] is None


def test_dp_adaptation_keeps_central_and_matches_opacus_accountant(central, toy_store):
    from shared.c2l.adapt import adapt
    from shared.c2l.dp import DPConfig, rdp_epsilon

    before = _state(central)
    eps = []
    for steps in (2, 4):
        model, summary = adapt(
            central,
            toy_store,
            steps=steps,
            batch_size=8,
            seed=0,
            progress=False,
            dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0),
        )
        assert all(torch.equal(model.central.state_dict()[k], v) for k, v in before.items())
        assert summary["delta"] == pytest.approx(min(1e-5, 0.1 / 64))
        expected = rdp_epsilon(1.0, 8 / 64, steps, summary["delta"])
        assert summary["epsilon"] == pytest.approx(expected, rel=1e-12)
        eps.append(summary["epsilon"])
    assert eps[1] > eps[0] > 0


def test_dp_target_epsilon_is_met_and_infeasible_target_fails_before_training(central, toy_store, monkeypatch):
    import shared.c2l.adapt as adapt_module
    from shared.c2l.dp import DPConfig

    _, summary = adapt_module.adapt(
        central, toy_store, steps=4, batch_size=8, seed=0, progress=False, dp=DPConfig(target_epsilon=4.0)
    )
    assert 3.9 <= summary["epsilon"] <= 4.0
    monkeypatch.setattr(adapt_module, "create_conditioned", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(FedstError, match="infeasible"):
        adapt_module.adapt(central, toy_store, steps=50, dp=DPConfig(target_epsilon=1e-4), progress=False)
    with pytest.raises(FedstError, match="delta"):
        adapt_module.adapt(central, toy_store, steps=5, dp=DPConfig(target_epsilon=8, target_delta=0.5), progress=False)


def test_privacy_ledger_composes_rounds_calibrated_together_and_refuses_past_the_budget(tmp_path, central, toy_store):
    """Noise calibrated for 3 planned rounds of 2 steps: the ledger's cumulative epsilon after each round is the RDP
    composition of the rounds so far (an independent accountant agrees), the 3rd lands at the budget, and a 4th
    round (more rounds than planned, or a replay) is refused before any step, leaving the ledger as it was."""
    import json

    from shared.c2l.adapt import adapt
    from shared.c2l.dp import DPConfig, PrivacyLedger, rdp_epsilon

    ledger = PrivacyLedger(tmp_path / "privacy-ledger.json")
    dp = DPConfig(target_epsilon=4.0, calibration_steps=6)
    spent = []
    for round_ in (1, 2, 3):
        _, summary = adapt(
            central, toy_store, steps=2, batch_size=8, seed=round_, progress=False, dp=dp, privacy_ledger=ledger
        )
        sigma, rate = summary["dp"]["noise_multiplier"], summary["dp"]["sample_rate"]
        assert summary["epsilon"] == pytest.approx(rdp_epsilon(sigma, rate, 2 * round_, summary["delta"]), rel=1e-9)
        assert summary["epsilon_round"] == pytest.approx(rdp_epsilon(sigma, rate, 2, summary["delta"]), rel=1e-9)
        spent.append(summary["epsilon"])
    assert spent[0] < spent[1] < spent[2] and 3.9 <= spent[2] <= 4.0
    before = ledger.path.read_text()
    with pytest.raises(FedstError, match=r"DP budget: this site has spent epsilon 3\.9\d* of its budget 4 .* Refused"):
        adapt(central, toy_store, steps=2, batch_size=8, seed=4, progress=False, dp=dp, privacy_ledger=ledger)
    assert ledger.path.read_text() == before and len(json.loads(before)["entries"]) == 3
    ledger.path.write_text("{not json")
    with pytest.raises(FedstError, match=r"privacy-ledger.json \(privacy ledger\) is unreadable"):
        adapt(central, toy_store, steps=2, batch_size=8, seed=5, progress=False, dp=dp, privacy_ledger=ledger)


def test_dp_noise_is_secret_unless_deterministic_is_asked_for(central, toy_store):
    """The server knows the run seed: with it, the DP noise (and the Poisson sampling) would be known, so by default
    they come from os.urandom (two runs differ); `deterministic=True` (tests) makes them bit-identical."""
    from shared.c2l.adapt import adapt
    from shared.c2l.dp import DPConfig

    def run(deterministic: bool):
        model, _ = adapt(
            central,
            toy_store,
            steps=2,
            batch_size=8,
            seed=0,
            progress=False,
            dp=DPConfig(noise_multiplier=1.0, deterministic=deterministic),
        )
        return torch.cat([p.detach().flatten() for p in model.modulation.parameters()])

    assert torch.equal(run(True), run(True))
    assert not torch.equal(run(False), run(False))


def test_bad_stores_give_clear_errors(tmp_path, central, toy_store):
    import anndata
    import pandas as pd

    from shared import keys
    from shared.c2l.adapt import adapt
    from shared.c2l.central import create_central
    from shared.c2l.modulation import create_conditioned
    from shared.c2l.synthesize import synthesize
    from shared.store.format import PatchStore, StoreWriter

    empty = anndata.AnnData(
        np.zeros((0, 8), np.float32),
        obs=pd.DataFrame({keys.SECTION: pd.Series(dtype=str)}),
        var=pd.DataFrame(index=toy_store.panel),
    )
    with StoreWriter(tmp_path / "tiles_only", patch_px=32) as writer:
        writer.allocate_tiles(2)[:] = 128
        writer.set_tile_table(pd.DataFrame({keys.SECTION: ["A", "A"], "x": [0, 1], "y": [0, 1]}))
        writer.set_spots(empty)
    with pytest.raises(FedstError, match="no paired spots"):
        adapt(central, PatchStore(tmp_path / "tiles_only"), steps=1, progress=False)
    other_panel = create_central("tiny", **SMALL, panel=["X1", "X2"])
    with pytest.raises(FedstError, match="gene panel"):
        adapt(other_panel, toy_store, steps=1, progress=False)
    adapter = create_conditioned(central, ["X1", "X2"])
    with pytest.raises(FedstError, match="gene panel"):
        synthesize(central, adapter, toy_store, 2, tmp_path / "syn", progress=False)


def test_adapter_save_load_round_trip_and_central_hash_check(tmp_path, central, toy_store):
    from shared.c2l.adapt import adapt
    from shared.c2l.central import create_central
    from shared.c2l.modulation import load_adapter, save_adapter

    model, _ = adapt(central, toy_store, steps=2, batch_size=4, seed=0, progress=False)
    save_adapter(model, tmp_path / "ad")
    loaded = load_adapter(central, tmp_path / "ad")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 700])
    e, m = torch.rand(2, 8), torch.ones(2, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, e, m), model.eval()(x, t, e, m))
    assert loaded.info["store"] == str(toy_store.path)
    with pytest.raises(FedstError, match="belongs to central weights"):
        load_adapter(create_central("tiny", **SMALL), tmp_path / "ad")
    (tmp_path / "ad" / "adapter.safetensors").unlink()
    with pytest.raises(FedstError, match="missing weights file"):
        load_adapter(central, tmp_path / "ad")


def test_samplers_are_deterministic_by_seed(central):
    from shared.c2l.sampling import sample_central

    for sampler in ("ddim", "dpm", "ddpm"):
        a = sample_central(central, 2, sampler=sampler, steps=3, seed=7)
        b = sample_central(central, 2, sampler=sampler, steps=3, seed=7)
        c = sample_central(central, 2, sampler=sampler, steps=3, seed=8)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_with_all_steps_matches_ddpm_on_toy_distribution():
    from scipy.stats import wasserstein_distance

    from shared.c2l.schedule import sample
    from shared.c2l.toy import mixture_denoiser, mixture_samples

    config = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "epsilon"}
    fn = mixture_denoiser(config)
    reference = mixture_samples(100_000, np.random.default_rng(1))
    w = {}
    for sampler, steps in (("ddpm", 1000), ("ddim", 1000), ("ddim", 50)):
        x = sample(fn, (16, 1, 8, 8), config, sampler=sampler, steps=steps, seed=0).flatten().numpy()
        w[(sampler, steps)] = wasserstein_distance(x, reference)
    noise_floor = 0.05  # W1 of 1024 exact draws is ~0.01-0.02
    assert w[("ddpm", 1000)] < noise_floor and w[("ddim", 1000)] < noise_floor and w[("ddim", 50)] < noise_floor
    assert abs(w[("ddim", 1000)] - w[("ddpm", 1000)]) < 0.03
    collapsed = wasserstein_distance(np.zeros(1024), reference)  # what a broken sampler would give
    assert collapsed > 0.4


def test_ema_follows_a_known_weight_sequence_with_the_warmed_up_decay():
    """Weights w_n = w_0 + n after the n-th update; the shadow follows s_n = d_n s_(n-1) + (1 - d_n) w_n with
    d_n = min(decay, (1 + n) / (10 + n)), so after the warm-up it lags the live weights by d / (1 - d)."""
    from shared.c2l.ema import create_ema

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    start = {n: p.detach().double().clone() for n, p in layer.named_parameters()}
    decay = 0.5  # reached once (1 + n) / (10 + n) >= 0.5, i.e. from n = 8 on
    ema = create_ema(layer, decay)
    shadow = {n: v.clone() for n, v in start.items()}
    decays = []
    for n in range(1, 16):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(1.0)
        ema.step(layer.parameters())
        d = min(decay, (1 + n) / (10 + n))
        decays.append(ema.cur_decay_value)
        shadow = {k: d * v + (1 - d) * (start[k] + n) for k, v in shadow.items()}
    assert decays[0] == pytest.approx(2 / 11) and decays[-1] == decay and decays[6] == pytest.approx(8 / 17)
    for (name, live), averaged in zip(layer.named_parameters(), ema.shadow_params):
        np.testing.assert_allclose(averaged.double().numpy(), shadow[name].numpy(), atol=1e-5)
        lag = (live.detach() - averaged).double().numpy()
        assert lag.min() > 0.99 and lag.max() < 1.01  # d / (1 - d) = 1 behind the weights, not equal to them
    ema.copy_to(layer.parameters())
    assert torch.equal(layer.weight, ema.shadow_params[0])


def test_a_resumed_ema_continues_the_same_average_across_rounds():
    """Federated pretraining restarts the EMA each round from the averaged shadow: resumed after S steps it must
    give exactly the shadow one uninterrupted run of 2S steps gives (same warm-up position, same decays)."""
    from shared.c2l.ema import create_ema, resume_ema, shadow_state

    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    weights = [{n: torch.randn_like(p) for n, p in layer.named_parameters()} for _ in range(12)]

    def feed(ema, sequence):
        for w in sequence:
            with torch.no_grad():
                for n, p in layer.named_parameters():
                    p.copy_(w[n])
            ema.step(layer.parameters())

    whole, first = create_ema(layer, 0.9), create_ema(layer, 0.9)  # both from the initial weights
    feed(whole, weights)
    feed(first, weights[:6])
    resumed = resume_ema(layer, shadow_state(first, layer), 0.9, steps_done=6)
    feed(resumed, weights[6:])
    for a, b in zip(whole.shadow_params, resumed.shadow_params):
        torch.testing.assert_close(a, b)
    restarted = create_ema(layer, 0.9)  # forgetting the position would weight the second half far more
    restarted.shadow_params = [s.clone() for s in first.shadow_params]
    feed(restarted, weights[6:])
    assert max((a - b).abs().max() for a, b in zip(whole.shadow_params, restarted.shadow_params)) > 1e-2


def test_lora_keeps_zero_init_contract_and_counts_in_trainable_fraction(central):
    from shared.c2l.central import create_central
    from shared.c2l.modulation import create_conditioned, lora_layers

    model = create_conditioned(central, [f"G{i}" for i in range(5)], lora_rank=4)
    assert len(model.modulation.lora) == len(lora_layers(central)) == 16  # q, k, v, out of 4 attention blocks
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    expr, mask = torch.rand(3, 5) * 4, torch.ones(3, 5)
    with torch.no_grad():
        assert torch.equal(model(x, t, expr, mask), central(x, t))
    model.remove_hooks()
    lora_params = sum(p.numel() for p in model.modulation.lora.parameters())
    assert lora_params == 16 * 4 * (32 + 32)
    assert model.trainable_parameters() == sum(p.numel() for p in model.modulation.parameters())
    tiny = create_central("tiny")  # the real preset with the consortium's 48-gene panel
    panel = [f"G{i}" for i in range(48)]
    plain, with_lora = create_conditioned(tiny, panel), create_conditioned(tiny, panel, lora_rank=4)
    assert plain.trainable_fraction() < with_lora.trainable_fraction() <= 0.10
    with pytest.raises(FedstError, match="lora_rank"):
        create_conditioned(tiny, panel, lora_rank=-1)


@pytest.mark.slow
def test_lora_adaptation_keeps_central_bit_identical_and_round_trips(tmp_path, central, toy_store):
    from shared.c2l.adapt import adapt
    from shared.c2l.dp import DPConfig
    from shared.c2l.modulation import load_adapter, load_adapter_config, save_adapter

    before = _state(central)
    model, summary = adapt(central, toy_store, steps=3, batch_size=8, seed=0, lora_rank=4, progress=False)
    for name, value in before.items():
        assert torch.equal(model.central.state_dict()[name], value), name
    assert any(float(layer.up.weight.detach().abs().sum()) > 0 for layer in model.modulation.lora)  # B moved
    assert summary["trainable_params"] == sum(p.numel() for p in model.modulation.parameters())
    save_adapter(model, tmp_path / "ad")
    assert load_adapter_config(tmp_path / "ad")["lora_rank"] == 4
    loaded = load_adapter(central, tmp_path / "ad")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 700])
    e, m = torch.rand(2, 8), torch.ones(2, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, e, m), model.eval()(x, t, e, m))
    dp_model, dp_summary = adapt(
        central,
        toy_store,
        steps=2,
        batch_size=8,
        seed=0,
        lora_rank=4,
        progress=False,
        dp=DPConfig(noise_multiplier=1.0),
    )
    assert dp_summary["epsilon"] > 0 and all(
        torch.equal(dp_model.central.state_dict()[k], v) for k, v in before.items()
    )
    assert any(float(layer.up.weight.detach().abs().sum()) > 0 for layer in dp_model.modulation.lora)


def test_high_noise_timestep_sampling_and_its_bad_values(central, toy_store):
    from shared.c2l.adapt import adapt, sample_timesteps

    gen = torch.Generator().manual_seed(0)
    uniform, biased = sample_timesteps(20000, 1000, 1.0, gen), sample_timesteps(20000, 1000, 0.3, gen)
    assert int(biased.min()) >= 0 and int(biased.max()) <= 999
    assert float((uniform >= 900).float().mean()) == pytest.approx(0.1, abs=0.01)
    assert float((biased >= 900).float().mean()) == pytest.approx(1 - 0.9 ** (1 / 0.3), abs=0.015)  # ~0.30
    with pytest.raises(FedstError, match="timestep_power"):
        adapt(central, toy_store, steps=1, timestep_power=0.0, progress=False)


def test_probe_inputs_are_clipped_to_the_real_feature_range():
    from shared.c2l.audit import clip_to_support

    real = np.array([[0.0, 1.0], [0.0, 3.0], [1e-6, 2.0]])  # first feature: an (almost) always empty bin
    syn = np.array([[0.5, 2.5], [-1.0, 9.0]])
    assert np.array_equal(clip_to_support(syn, real), np.array([[1e-6, 2.5], [0.0, 3.0]]))


def test_audit_features_are_rotation_and_flip_invariant_unlike_the_stats_encoder():
    """Why the audit keeps its own hand-crafted features (shared.c2l.audit.image_features)."""
    from shared.c2l.audit import image_features
    from shared.downstream.encoders import create_encoder

    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    patches[:, :, :16] //= 3  # a vertical edge: orientation matters to an oriented filter
    turned, flipped = np.rot90(patches, 1, axes=(1, 2)).copy(), patches[:, :, ::-1].copy()
    base = image_features(patches, 32)
    np.testing.assert_allclose(image_features(turned, 32), base, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(image_features(flipped, 32), base, rtol=1e-5, atol=1e-6)
    encoder = create_encoder("stats", device="cpu")
    assert not np.allclose(encoder.embed(turned), encoder.embed(patches), rtol=1e-3, atol=1e-4)


def test_attention_film_keeps_zero_init_contract_and_reaches_every_attention_block(central):
    from shared.c2l.modulation import attention_norm_channels, create_conditioned, film_channels

    panel = [f"G{i}" for i in range(5)]
    model = create_conditioned(central, panel, attention_film=True)
    assert len(attention_norm_channels(central)) == 4  # the fixture's 4 attention blocks
    assert len(model.modulation.film) == len(film_channels(central)) + 4
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    expr, mask = torch.rand(3, 5) * 4, torch.ones(3, 5)
    with torch.no_grad():
        assert torch.equal(model(x, t, expr, mask), central(x, t))  # zero-initialised: the central model exactly
        for layer in model.modulation.film[-4:]:  # only the attention sites move
            torch.nn.init.normal_(layer.weight, std=0.5)
        moved = model(x, t, expr, mask)
        assert not torch.allclose(moved, central(x, t), atol=1e-4)
        assert not torch.allclose(moved, model(x, t, expr * 0.1, mask), atol=1e-4)  # and it follows the genes
    plain = create_conditioned(central, panel)
    assert model.trainable_parameters() - plain.trainable_parameters() == sum(
        32 * 2 * c + 2 * c for c in attention_norm_channels(central)
    )


@pytest.mark.slow
def test_attention_film_adapts_under_dp_and_round_trips(tmp_path, central, toy_store):
    from shared.c2l.adapt import adapt
    from shared.c2l.dp import DPConfig
    from shared.c2l.modulation import create_conditioned, load_adapter, load_adapter_config, save_adapter

    before = _state(central)
    model, summary = adapt(
        central,
        toy_store,
        steps=2,
        batch_size=8,
        seed=0,
        attention_film=True,
        progress=False,
        dp=DPConfig(noise_multiplier=1.0),
    )
    assert summary["epsilon"] > 0 and all(torch.equal(model.central.state_dict()[k], v) for k, v in before.items())
    assert all(float(layer.weight.detach().abs().sum()) > 0 for layer in model.modulation.film[-4:])
    save_adapter(model, tmp_path / "ad")
    assert load_adapter_config(tmp_path / "ad")["attention_channels"] == [32, 32, 32, 32]
    loaded = load_adapter(central, tmp_path / "ad")
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 700])
    e, m = torch.rand(2, 8), torch.ones(2, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, e, m), model.eval()(x, t, e, m))
    plain = create_conditioned(central, model.panel)  # an adapter without the attention sites does not take them
    with pytest.raises(RuntimeError):
        plain.modulation.load_state_dict(model.modulation.state_dict())
