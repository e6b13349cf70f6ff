"""C2L-ST end to end: the generator really uses the genes; synthetic stores open with the real loader; CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

# Verified on the consortium's site-0 (seed 0 generation) with these settings, model seeds 0-3
# (marker-gene PCC conditioned / unconditioned): 0.316/-0.028, 0.274/-0.016, 0.267/0.033, 0.314/0.049.
CONSORTIUM_MODEL = dict(sample_size=16, block_out_channels=(16, 32), norm_num_groups=4, prediction_type="v_prediction")


@pytest.mark.slow
def test_conditioned_generator_uses_the_genes_on_the_consortium(synthetic_stores, tmp_path, one_torch_thread):
    """Conditional consistency on a generated site is clearly above the unconditioned (zero-modulation) model's.

    v-prediction and high-noise timestep sampling in adaptation: the genes decide a patch's overall colour and
    texture, which only the high-noise steps cannot read off the noisy image itself; with epsilon prediction
    and uniform timesteps that part of the loss is ~1e-3 of the total and 200 steps learn nothing from it.
    """
    from shared import keys
    from shared.c2l.adapt import adapt
    from shared.c2l.audit import audit
    from shared.c2l.central import create_central
    from shared.c2l.modulation import create_conditioned
    from shared.c2l.synthesize import synthesize
    from shared.c2l.train import train_central
    from shared.store.format import PatchStore
    from shared.synthetic import marker_genes

    store = synthetic_stores[0]
    torch.manual_seed(0)
    central = create_central("tiny", **CONSORTIUM_MODEL)
    train_central(central, [store], steps=150, batch_size=16, lr=3e-3, seed=0, progress=False)
    model, summary = adapt(
        central, store, steps=200, batch_size=16, lr=1e-2, seed=0, timestep_power=0.3, progress=False
    )
    assert summary["losses"][-1] < summary["losses"][0]
    syn = synthesize(
        central, model, store, 128, tmp_path / "syn", sampler="ddim", steps=10, guidance=2.0, seed=0, progress=False
    )
    uncond = synthesize(
        central,
        create_conditioned(central, store.panel),
        store,
        128,
        tmp_path / "uncond",
        sampler="ddim",
        steps=10,
        guidance=1.0,
        seed=0,
        progress=False,
    )

    reopened = PatchStore(tmp_path / "syn")
    reopened.verify()
    assert reopened.synthetic and reopened.panel == store.panel and reopened.patch_px == 16
    assert reopened.patches.shape == (128, 16, 16, 3) and bool(reopened.spots.obs[keys.SYNTHETIC].all())
    prov = reopened.manifest["provenance"]
    assert prov["central_hash"] == central.weights_hash() and prov["sampler"] == "ddim" and prov["steps"] == 10
    rows = store.spots.obs_names.get_indexer(reopened.spots.obs["source_spot"])
    assert (rows >= 0).all() and np.allclose(reopened.spots.X, store.spots.X[rows])

    markers = [g for genes in marker_genes().values() for g in genes]  # the genes tied to nuclei/stroma looks
    cond, base = audit(store, syn), audit(store, uncond)

    def consistency(report):
        per_gene = report["conditional_consistency"]["pcc_per_gene"]
        return report["conditional_consistency"]["pcc_mean"], float(np.nanmean([per_gene[g] for g in markers]))

    (pcc, pcc_markers), (pcc0, pcc0_markers) = consistency(cond), consistency(base)
    print(
        f"conditional consistency PCC (all genes / markers): conditioned {pcc:.3f} / {pcc_markers:.3f}, "
        f"unconditioned {pcc0:.3f} / {pcc0_markers:.3f}, "
        f"real hold-out {cond['conditional_consistency']['real_holdout_pcc_mean']:.3f}"
    )
    assert cond["conditional_consistency"]["real_holdout_pcc_mean"] > 0.4  # the probe can read the genes
    assert pcc_markers > 0.2 and pcc_markers > pcc0_markers + 0.15
    assert pcc > pcc0 + 0.08
    assert cond["memorisation"]["near_copies"] == 0
    assert np.isfinite(cond["kid"]["value"])


@pytest.mark.slow
def test_cli_pretrain_adapt_synthesize_audit(tmp_path):
    from typer.testing import CliRunner

    from shared.c2l.toy import write_toy_store
    from shared.cli.main import app
    from shared.errors import FedstError
    from shared.store.format import PatchStore

    write_toy_store(tmp_path / "site", n_spots=32, n_tiles=32, patch_px=32, seed=1)
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, ["c2l", *map(str, args)])
        assert result.exit_code == 0, (result.output, result.exception)
        return result

    run(
        "pretrain",
        tmp_path / "site",
        "--out",
        tmp_path / "central",
        "--steps",
        3,
        "--batch-size",
        4,
        "--sample-size",
        16,
        "--channels",
        "16,32",
    )
    assert json.loads((tmp_path / "central" / "summary.json").read_text())["steps"] == 3
    assert (tmp_path / "central" / "loss.png").stat().st_size > 0
    run(
        "adapt",
        "--central",
        tmp_path / "central",
        "--store",
        tmp_path / "site",
        "--out",
        tmp_path / "ad",
        "--steps",
        3,
        "--batch-size",
        4,
        "--dp-epsilon",
        8,
    )
    summary = json.loads((tmp_path / "ad" / "summary.json").read_text())
    assert 0 < summary["epsilon"] <= 8 and summary["trainable_fraction"] <= 0.10
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["epsilon"] == summary["epsilon"]
    result = run(
        "synthesize",
        "--central",
        tmp_path / "central",
        "--adapter",
        tmp_path / "ad",
        "--n",
        6,
        "--out",
        tmp_path / "syn",
        "--steps",
        3,
        "--perturb",
        "mixup",
    )
    store = PatchStore(tmp_path / "syn")
    assert store.synthetic and store.n_spots == 6 and store.manifest["provenance"]["dp_epsilon"] == summary["epsilon"]
    assert (tmp_path / "syn_samples.png").stat().st_size > 0  # beside the store: docs/c2l.md, "outputs"
    syn_summary = json.loads((tmp_path / "syn_summary.json").read_text())
    assert syn_summary["n"] == 6 and syn_summary["provenance"]["perturb"] == "mixup"
    assert "syn_samples.png" in result.output and not (tmp_path / "syn" / "syn_summary.json").exists()
    audit_args = ["audit", "--central", tmp_path / "central", "--adapter", tmp_path / "ad"]
    audit_args += ["--real", tmp_path / "site", "--synthetic", tmp_path / "syn"]
    result = run(*audit_args, "--out", tmp_path / "audit")
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert {"conditional_consistency", "kid", "memorisation", "unconditioned_baseline"} <= set(report)
    assert (tmp_path / "audit" / "samples.png").stat().st_size > 0
    kid = report["kid"]  # printed with its scale and the real-vs-real floor it is read against
    assert f"KID {kid['value']:.3f} +- {kid['std']:.3f} (x1," in result.output
    assert f"real-vs-real floor {kid['real_half_vs_half']:.3f})" in result.output
    run(*audit_args, "--out", tmp_path / "audit2", "--no-baseline")
    assert (tmp_path / "audit2" / "samples.png").stat().st_size > 0  # the sample grid without the baseline too

    (tmp_path / "central" / "model.safetensors").unlink()
    bad = runner.invoke(
        app,
        [
            "c2l",
            "synthesize",
            "--central",
            str(tmp_path / "central"),
            "--adapter",
            str(tmp_path / "ad"),
            "--n",
            "2",
            "--out",
            str(tmp_path / "syn2"),
        ],
    )
    assert isinstance(bad.exception, FedstError) and "missing weights file" in str(bad.exception)
