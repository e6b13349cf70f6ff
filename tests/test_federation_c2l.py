"""The real backend (C2L-ST + the downstream predictor) behind the same site task the ClientApp calls."""

from __future__ import annotations

import numpy as np
import pytest

from shared.c2l.toy import write_toy_store
from shared.config import NodeConfig, RunConfig

pytest.importorskip("diffusers")
PANEL = [f"G{i}" for i in range(6)]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_c2l_site_task_all_phases(tmp_path):
    from client.site import SiteTask
    from shared.backends.c2l import C2LBackend

    store = write_toy_store(
        tmp_path / "store", n_spots=40, n_tiles=16, panel=PANEL, patch_px=32, seed=0, missing_gene_in_section_b=False
    )
    run = RunConfig.from_mapping(
        {
            "preset": "tiny",
            "patch-px": 32,
            "local-steps": 1,
            "adapt-steps": 1,
            "batch-size": 2,
            "synthetic-count": 4,
            "sample-steps": 2,
        }
    )
    node = NodeConfig.from_mapping({"data-path": str(store.path), "work-dir": str(tmp_path / "work")}, run)
    task = SiteTask(run, node, PANEL)
    backend = C2LBackend(run)
    central = backend.initial_state(0)
    new, metrics = task.pretrain(central, 1, prox_mu=0.01)
    assert set(new) == set(central) and all(new[k].shape == central[k].shape for k in central)
    assert any(not np.array_equal(new[k], central[k]) for k in central)  # it trained
    assert metrics["num-examples"] == 56 and np.isfinite(metrics["loss"])
    adapter, metrics = task.adapt(new, 1)
    assert set(adapter) == set(backend.initial_adapter(new, PANEL))  # only modulation weights
    assert 0 < metrics["trainable-fraction"] < 0.2
    assert task.synthesize()["synthetic-pairs"] == 4
    # the downstream phase's held-out section conditions neither the adaptation nor the synthetic pairs
    from shared import keys
    from shared.store.format import PatchStore

    sections = store.spots.obs[keys.SECTION].astype(str)
    held_out = sorted(set(sections))[-1]
    assert task.paired_store.n_spots == int((sections != held_out).sum()) < store.n_spots
    synthetic = PatchStore(tmp_path / "work" / "synthetic-store")
    sources = sections.loc[synthetic.spots.obs["source_spot"].astype(str)]
    assert len(sources) == 4 and held_out not in set(sources)
    scores = task.downstream()
    assert (
        {"num-examples"} < set(scores)
        and any(k.startswith("real-") for k in scores)
        and any(k.startswith("augmented-") for k in scores)
    )
    assert all(isinstance(v, float) for v in scores.values())
    assert (tmp_path / "work" / "report" / "samples_real_vs_synthetic.png").is_file()


def test_federated_pretraining_carries_an_ema_that_adaptation_and_sampling_use(tmp_path):
    """The pretraining state is the weights plus ``ema.<name>`` (same keys out as in, so the privacy contract and
    FedAvg hold); the shadow moves more slowly than the weights; sampling_state is the shadow, as a model."""
    from shared.backends.c2l import C2LBackend
    from shared.c2l.ema import EMA_PREFIX

    store = write_toy_store(
        tmp_path / "store", n_spots=12, n_tiles=4, panel=PANEL, patch_px=32, seed=0, missing_gene_in_section_b=False
    )
    run = RunConfig.from_mapping({"patch-px": 32, "pretrain.steps": 3, "pretrain.batch-size": 2})
    backend = C2LBackend(run)
    start = backend.initial_state(0)
    weights = {k for k in start if not k.startswith(EMA_PREFIX)}
    assert set(start) == weights | {EMA_PREFIX + k for k in weights}
    assert all(np.array_equal(start[k], start[EMA_PREFIX + k]) for k in weights)
    new, _ = backend.pretrain(start, store, run.pretrain, seed=1, server_round=50)
    assert set(new) == set(start)
    moved = sum(float(np.abs(new[k] - start[k]).sum()) for k in weights)
    shadow_moved = sum(float(np.abs(new[EMA_PREFIX + k] - start[EMA_PREFIX + k]).sum()) for k in weights)
    # round 50 of 3 steps: the warm-up is at n = 148..150, 1 - d_n = 9 / (10 + n) ~ 0.057 per step
    assert 0 < shadow_moved < 0.3 * moved
    sampling = backend.sampling_state(new)
    assert set(sampling) == weights and all(np.array_equal(sampling[k], new[EMA_PREFIX + k]) for k in weights)
    backend.central(sampling)  # loads as the central model
    plain = C2LBackend(RunConfig.from_mapping({"patch-px": 32, "pretrain.ema-decay": 0.0}))
    assert set(plain.initial_state(0)) == weights and plain.sampling_state(plain.initial_state(0)).keys() == weights


def test_a_site_spends_its_dp_budget_over_the_planned_rounds_and_refuses_one_more(tmp_path):
    """Federated adaptation with DP at a real site task: the two planned rounds together spend dp.epsilon (the
    reported epsilon is cumulative, from the site's ledger); a third round, as a server asking for more than it
    planned would send, is refused before training, with no path in the message (it travels to the server)."""
    import json

    from client.site import SiteTask
    from shared.backends.c2l import PRIVACY_LEDGER, C2LBackend
    from shared.errors import FedstError

    store = write_toy_store(
        tmp_path / "store", n_spots=24, n_tiles=4, panel=PANEL, patch_px=32, seed=0, missing_gene_in_section_b=False
    )
    run = RunConfig.from_mapping(
        {
            "patch-px": 32,
            "adapt": {"federated": True, "rounds": 2, "steps": 2, "batch-size": 4},
            "dp": {"epsilon": 8.0, "delta": 1e-3},
        }
    )
    node = NodeConfig.from_mapping({"data-path": str(store.path), "work-dir": str(tmp_path / "work")}, run)
    task = SiteTask(run, node, PANEL)
    backend = C2LBackend(run)
    central = backend.sampling_state(backend.initial_state(0))
    adapter = backend.initial_adapter(central, PANEL)
    spent = []
    for server_round in (1, 2):
        adapter, metrics = task.adapt(central, server_round, adapter=adapter)
        spent.append(metrics["epsilon"])
    assert 0 < spent[0] < spent[1] <= 8.0 * (1 + 1e-6) and spent[1] > 7.5
    ledger = tmp_path / "work" / PRIVACY_LEDGER
    assert [e["label"] for e in json.loads(ledger.read_text())["entries"]] == ["adapt round 1", "adapt round 2"]
    with pytest.raises(FedstError, match=r"DP budget: .* adapt round 3 would bring it to") as refused:
        task.adapt(central, 3, adapter=adapter)
    assert str(tmp_path) not in str(refused.value)


def test_federated_adaptation_starts_from_the_averaged_modulation(tmp_path):
    """With federated-adapt, a site's round starts from the server's modulation weights, not from zero."""
    import torch

    from shared.backends.c2l import C2LBackend
    from shared.c2l.adapt import adapt
    from shared.errors import FedstError

    store = write_toy_store(
        tmp_path / "store", n_spots=24, n_tiles=4, panel=PANEL, patch_px=32, seed=0, missing_gene_in_section_b=False
    )
    backend = C2LBackend(RunConfig(patch_px=32))
    central_state = backend.initial_state(0)
    start = {k: torch.from_numpy(np.array(v)) + 0.01 for k, v in backend.initial_adapter(central_state, PANEL).items()}
    model, _ = adapt(
        backend.central(central_state),
        store,
        steps=1,
        batch_size=4,
        lr=1e-12,
        seed=0,
        initial_modulation=start,
        augmentation=False,
        progress=False,
    )
    for name, value in model.modulation.state_dict().items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=1e-6)  # lr ~ 0: it stayed where it started
    with pytest.raises(FedstError, match="initial modulation"):
        adapt(
            backend.central(central_state), store, steps=1, initial_modulation={"nope": torch.zeros(1)}, progress=False
        )


def test_default_sections_pass_exactly_what_the_federation_computed_before(monkeypatch, tmp_path):
    """The c2l backend passes every knob from the config sections; with the defaults these are the values the
    federation used before the sections existed: the library defaults of shared.c2l, plus 250 adaptation and 20
    sampler steps."""
    import inspect

    import shared.c2l.adapt as adapt_module
    import shared.c2l.synthesize as synthesize_module
    from shared.backends.c2l import adapt_model, synthesize_pairs

    library = {
        "adapt": inspect.signature(adapt_module.adapt),
        "synthesize": inspect.signature(synthesize_module.synthesize),
    }
    seen: dict[str, dict] = {}
    monkeypatch.setattr(adapt_module, "adapt", lambda *a, **kw: seen.setdefault("adapt", kw))
    monkeypatch.setattr(synthesize_module, "synthesize", lambda *a, **kw: seen.setdefault("synthesize", kw))
    run = RunConfig()
    adapt_model(None, None, run.adapt, run.dp, seed=3)
    synthesize_pairs(None, None, None, run.synthesize.count, tmp_path, run.synthesize, seed=3)
    for name, own in (("adapt", {"steps": 250, "dp": None}), ("synthesize", {"steps": 20})):
        defaults = {k: p.default for k, p in library[name].parameters.items()}
        passed = {k: v for k, v in seen[name].items() if k not in ("seed", "progress", *own)}
        assert passed == {k: defaults[k] for k in passed}, name
        assert {k: seen[name][k] for k in own} == own
    assert seen["adapt"]["lr"] == 1e-3 and seen["synthesize"]["guidance"] == 1.5
    assert set(seen["synthesize"]) >= {"sampler", "steps", "guidance", "perturb", "batch_size"}


def test_downstream_phase_trains_on_the_run_configs_encoder(tmp_path, monkeypatch):
    """`predictor-encoder` (default stats_colour) reaches train_predictor for both arms; a bad name is a clear error."""
    import shared.downstream.predictor as predictor_module
    from shared.backends.c2l import C2LBackend
    from shared.errors import FedstError

    store = write_toy_store(
        tmp_path / "store", n_spots=40, n_tiles=4, panel=PANEL, patch_px=32, seed=0, missing_gene_in_section_b=False
    )
    seen: list[str] = []
    train = predictor_module.train_predictor

    def spy(*args, **kwargs):
        seen.append(kwargs["encoder"])
        return train(*args, **kwargs)

    monkeypatch.setattr(predictor_module, "train_predictor", spy)
    scores = {}
    for encoder in ("stats_colour", "stats"):
        run = RunConfig.from_mapping({} if encoder == "stats_colour" else {"predictor-encoder": encoder})
        scores[encoder] = C2LBackend(run).downstream(store, store, seed=0, predictor="ridge")
    assert seen == ["stats_colour", "stats_colour", "stats", "stats"]  # real and augmented arm of each run
    assert scores["stats"]["real-pcc_per_slide_mean"] != scores["stats_colour"]["real-pcc_per_slide_mean"]
    run = RunConfig.from_mapping({"predictor-encoder": "no_such_encoder"})
    with pytest.raises(FedstError, match="encoder 'no_such_encoder': unknown"):
        C2LBackend(run).downstream(store, None, seed=0, predictor="ridge")
