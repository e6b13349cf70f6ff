"""SpaDiT imputation: model invariants, the diffusion schedule, gene pairing, no truth at sampling time,
the kNN baseline, a small real run on the MERFISH hypothalamus pair and `fedst impute` end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from shared import keys
from shared.downstream.dit import DiTBlock
from shared.downstream.spadit.baseline import knn_impute
from shared.downstream.spadit.data import frame_genes, pair_genes, split_genes
from shared.downstream.spadit.model import SpaDiT, create_spadit
from shared.downstream.spadit.train import make_scheduler, sample_genes, train_spadit
from shared.errors import FedstError
from tests.helpers import shared_path

torch.set_num_threads(1)


def make_pair(n_spots: int = 60, n_cells: int = 90, n_genes: int = 24, n_types: int = 4, seed: int = 0):
    """Spots are smooth spatial mixtures of cell types; cells are single types (Poisson counts)."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    profiles = rng.gamma(0.6, 4.0, size=(n_types, n_genes)) + 0.05
    types = rng.integers(0, n_types, n_cells)
    cells = rng.poisson(profiles[types] * 3.0)
    xy = rng.uniform(0, 100, size=(n_spots, 2))
    centres = rng.uniform(0, 100, size=(n_types, 2))
    w = np.exp(-((xy[:, None, :] - centres[None]) ** 2).sum(-1) / 800.0) + 0.05
    w /= w.sum(1, keepdims=True)
    spots = rng.poisson(w @ profiles * 10.0)
    genes = [f"Gene{i}" for i in range(n_genes)]
    st = ad.AnnData(X=spots.astype(np.float32), obs=pd.DataFrame(index=[f"s{i}" for i in range(n_spots)]))
    st.var_names = genes
    st.obsm[keys.SPATIAL] = xy
    sc = ad.AnnData(
        X=cells.astype(np.float32),
        obs=pd.DataFrame({"cell_type": [f"T{t}" for t in types]}, index=[f"c{i}" for i in range(n_cells)]),
    )
    sc.var_names = genes
    return st, sc


def test_forward_shapes_and_zero_output_at_init():
    model = create_spadit("tiny", n_spots=37, n_cells=50, n_ref_genes=11)  # spots not a multiple of the patch
    cond = model.encode_reference(torch.randn(11, 50))
    assert cond.shape == (32,)
    eps = model(torch.randn(5, 37), torch.tensor([0, 10, 100, 500, 999]), torch.randn(5, 50), cond, torch.randn(5, 37))
    assert eps.shape == (5, 37)
    assert torch.count_nonzero(eps) == 0  # adaLN-Zero + zero head: the untrained model predicts 0
    with pytest.raises(FedstError, match="expects"):
        model.encode_reference(torch.randn(12, 50))
    with pytest.raises(FedstError, match="spot_prior"):
        model(torch.randn(2, 37), torch.tensor([1, 2]), torch.randn(2, 50), cond)


def test_zero_initialised_adaln_blocks_are_identity():
    torch.manual_seed(0)
    block = DiTBlock(width=16, heads=2, mlp_ratio=4.0, dropout=0.0)
    x, c = torch.randn(3, 7, 16), torch.randn(3, 16)
    assert torch.equal(block(x, c), x)
    with torch.no_grad():
        block.ada[1].bias.add_(0.1)  # once the gates open the block is no longer the identity
    assert not torch.allclose(block(x, c), x)


def test_save_load_restores_exact_model(tmp_path):
    torch.manual_seed(1)
    model = create_spadit("tiny", n_spots=20, n_cells=30, n_ref_genes=8, depth=1)
    for p in model.parameters():  # leave init so the comparison is non-trivial
        torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path / "m")
    again = SpaDiT.from_pretrained(tmp_path / "m")
    assert again.config == model.config
    args = (torch.randn(4, 20), torch.tensor([3, 30, 300, 900]), torch.randn(4, 30))
    ref = torch.randn(8, 30)
    with torch.no_grad():
        a = model(*args, model.encode_reference(ref), torch.randn(4, 20, generator=torch.Generator().manual_seed(0)))
        b = again(*args, again.encode_reference(ref), torch.randn(4, 20, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(a, b)
    with pytest.raises(FedstError, match="config.json"):
        SpaDiT.from_pretrained(tmp_path / "absent")


def test_cosine_schedule_matches_closed_form_and_diffusers():
    from diffusers import DDPMScheduler

    sched = make_scheduler(1000)
    T = 1000

    def alpha_bar(t: float) -> float:  # Nichol & Dhariwal 2021, eq. 17 (s = 0.008)
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)])
    np.testing.assert_allclose(sched.betas.numpy(), betas, rtol=1e-5, atol=1e-7)
    reference = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    assert torch.equal(sched.alphas_cumprod, reference.alphas_cumprod)
    assert sched.config.prediction_type == "epsilon" and not sched.config.clip_sample


def test_training_loss_decreases():
    rng = np.random.default_rng(0)
    n_genes, n_spots, n_cells = 48, 32, 40
    mix = rng.normal(size=(n_cells, n_spots)) / np.sqrt(n_cells)
    sc = rng.normal(size=(n_genes, n_cells))
    st = sc @ mix
    st = (st - st.mean(1, keepdims=True)) / st.std(1, keepdims=True)
    model = create_spadit("tiny", n_spots=n_spots, n_cells=n_cells, n_ref_genes=n_genes, spot_prior=False)
    history = train_spadit(model, st, sc, sc, epochs=60, batch_size=16, lr=3e-3, seed=0, progress=False)
    first, last = np.mean(history.train_loss[:5]), np.mean(history.train_loss[-5:])
    assert last < 0.8 * first, (first, last)


def test_sampling_is_seeded_and_starts_from_noise():
    model = create_spadit("tiny", n_spots=24, n_cells=30, n_ref_genes=6, spot_prior=False)
    sc, ref = np.random.default_rng(0).normal(size=(3, 30)), np.random.default_rng(1).normal(size=(6, 30))
    a = sample_genes(model, sc, ref, steps=10, seed=7)
    b = sample_genes(model, sc, ref, steps=10, seed=7)
    c = sample_genes(model, sc, ref, steps=10, seed=8)
    assert a.shape == (3, 24) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # the untrained model predicts eps = 0, so DDIM returns its starting noise scaled by 1/sqrt(alpha_bar_t0):
    # the output is exactly the seeded Gaussian draw (no data enters the chain).
    from shared.downstream.spadit.train import make_sampler

    s = make_sampler("ddim")
    s.set_timesteps(10)
    noise = torch.randn((3, 24), generator=torch.Generator().manual_seed(7)).numpy()
    np.testing.assert_allclose(a, noise / math.sqrt(float(s.alphas_cumprod[s.timesteps[0]])), rtol=1e-4)
    d = sample_genes(model, sc, ref, steps=10, seed=7, sampler="ddpm")
    assert np.isfinite(d).all() and not np.allclose(d, a)


def test_imputation_never_reads_held_out_truth():
    """Same split, same seeds: held-out genes' ST values are present, scrambled, or absent -> same prediction."""
    from shared.downstream.spadit.pipeline import run_imputation

    st, sc = make_pair()
    targets = ["Gene3", "Gene10"]
    kwargs = dict(genes=targets, epochs=3, steps=5, n_samples=1, seed=0, progress=False)
    scrambled = st.copy()
    cols = [list(st.var_names).index(g) for g in targets]
    scrambled.X[:, cols] = np.random.default_rng(5).poisson(50.0, size=(st.n_obs, 2))
    absent = st[:, [g for g in st.var_names if g not in targets]].copy()
    runs = [run_imputation(x, sc, **kwargs) for x in (st, scrambled, absent)]
    for method in ("spadit", "knn"):
        np.testing.assert_array_equal(runs[0].predictions[method], runs[1].predictions[method])
        np.testing.assert_array_equal(runs[0].predictions[method], runs[2].predictions[method])
    assert runs[0].has_truth.all() and not runs[2].has_truth.any()
    assert np.isnan(runs[2].truth).all() and runs[2].metrics == {}
    assert set(runs[0].metrics) == {"spadit", "knn", "knn_val_k"}


def test_genes_pair_by_name_not_row_order():
    st, sc = make_pair(n_genes=10)
    shuffled = sc[:, np.random.default_rng(0).permutation(sc.n_vars)].copy()
    shuffled.var_names = [g.upper() for g in shuffled.var_names]  # case differs too
    a, b = pair_genes(st, sc), pair_genes(st, shuffled)
    order = [b.genes.index(g.upper()) for g in a.genes]
    np.testing.assert_array_equal(a.sc_counts, b.sc_counts[order])
    np.testing.assert_array_equal(a.st_counts, b.st_counts[order])
    split = split_genes(a, holdout_fraction=0.3, seed=3)
    assert len(np.intersect1d(split.test, split.measured)) == 0 and len(split.test) == 3
    np.testing.assert_array_equal(split.test, split_genes(a, holdout_fraction=0.3, seed=3).test)
    frame = frame_genes(a, split)  # ST library over measured genes only: truth leaks nothing
    lib = a.st_counts[split.measured].sum(0)
    np.testing.assert_allclose(frame.st_log[0], np.log1p(a.st_counts[0] / lib * keys.TARGET_SUM))


def test_bad_inputs_raise_clear_errors():
    import anndata as ad

    st, sc = make_pair(n_genes=6)
    other = sc.copy()
    other.var_names = [f"X{i}" for i in range(6)]
    with pytest.raises(FedstError, match="share no gene"):
        pair_genes(st, other)
    with pytest.raises(FedstError, match="'Nope' is absent from the reference"):
        pair_genes(st, sc, targets=["Nope"])
    with pytest.raises(FedstError, match="empty input"):
        pair_genes(ad.AnnData(X=np.zeros((0, 6), dtype=np.float32), var=st.var), sc)
    dup = sc.copy()
    dup.var_names = ["Gene0", "gene0", "Gene2", "Gene3", "Gene4", "Gene5"]
    with pytest.raises(FedstError, match="occurs twice"):
        pair_genes(st, dup)


def test_knn_baseline_known_answer():
    rng = np.random.default_rng(0)
    cells = rng.normal(size=(8, 30))  # measured genes x cells
    target = rng.normal(size=(2, 30))
    spots_idx = np.array([4, 17, 29, 0])
    pred = knn_impute(cells[:, spots_idx] * 3.0 + 1.0, cells, target, k=1)
    # per-gene standardisation makes an affine copy of a cell its own nearest neighbour
    np.testing.assert_allclose(pred, target[:, spots_idx])
    avg = knn_impute(cells[:, spots_idx], cells, target, k=30)
    np.testing.assert_allclose(avg, np.repeat(target.mean(1, keepdims=True), 4, axis=1))


@pytest.mark.needs_shared_data
def test_small_merfish_run_is_finite_and_beats_the_mean(tmp_path):
    from shared.downstream.spadit.loaders import load_sc_spatial
    from shared.downstream.spadit.output import write_result
    from shared.downstream.spadit.pipeline import run_imputation

    st, sc = load_sc_spatial(shared_path("sc-spatial", "merfish_hypothalamus"))
    assert st.shape == (750, 134) and sc.shape == (1308, 134) and st.obsm[keys.SPATIAL].shape == (750, 2)
    st, sc = st[:240].copy(), sc[::3].copy()
    result = run_imputation(st, sc, holdout_fraction=0.2, epochs=60, steps=20, n_samples=2, seed=0, progress=False)
    assert len(result.genes) == 27 and result.has_truth.all()
    for pred in result.predictions.values():
        assert pred.shape == (240, 27) and np.isfinite(pred).all() and (pred >= 0).all()
    # a constant (mean) predictor has PCC 0 on every gene; both methods must carry real signal
    assert result.metrics["knn"]["pcc"] > 0.15
    assert result.metrics["spadit"]["pcc"] > 0.1  # measured: 0.17 (kNN 0.26)
    written = write_result(result, st, tmp_path / "out.h5ad")
    assert all(p.stat().st_size > 0 for p in written.values())
    import anndata as ad

    back = ad.read_h5ad(written["h5ad"])
    np.testing.assert_array_equal(back.obsm[keys.SPATIAL], st.obsm[keys.SPATIAL])
    np.testing.assert_allclose(back.layers[keys.PREDICTED], result.predictions["spadit"], rtol=1e-6)
    assert keys.PREDICTED_BASELINE in back.layers


@pytest.mark.needs_shared_data
def test_loaders_read_visium_and_bdtnp():
    from shared.downstream.spadit.loaders import CELL_TYPE, load_bdtnp, load_sc_spatial

    st, sc = load_sc_spatial(shared_path("sc-spatial", "visium_hippocampus"))
    assert st.shape == (313, 276) and sc.shape == (510, 307)
    assert sc.obs[CELL_TYPE].nunique() == 17
    assert len(pair_genes(st, sc).genes) == 124  # shared by (case-insensitive) name
    atlas = load_bdtnp(shared_path("sc-spatial", "bdtnp"))
    assert atlas.shape == (3039, 84) and atlas.obsm["spatial_3d"].shape == (3039, 3)
    np.testing.assert_allclose(atlas.obsm[keys.SPATIAL][0], [-194.04, 0.22])


def test_loader_errors_name_the_file(tmp_path):
    from shared.downstream.spadit.loaders import load_sc_spatial, read_h5ad_checked

    with pytest.raises(FedstError, match="counts.csv: not found"):
        load_sc_spatial(tmp_path)
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(FedstError, match="bad.h5ad: not a readable .h5ad"):
        read_h5ad_checked(tmp_path / "bad.h5ad", "spatial input", need_spatial=True)
    st, _ = make_pair()
    del st.obsm[keys.SPATIAL]
    st.write_h5ad(tmp_path / "nospatial.h5ad")
    with pytest.raises(FedstError, match="lacks obsm\\['spatial'\\]"):
        read_h5ad_checked(tmp_path / "nospatial.h5ad", "spatial input", need_spatial=True)


@pytest.mark.slow
def test_cli_impute_end_to_end(tmp_path):
    st, sc = make_pair(n_spots=50, n_cells=70, n_genes=20)
    st.write_h5ad(tmp_path / "st.h5ad")
    sc.write_h5ad(tmp_path / "sc.h5ad")
    cli = [
        sys.executable,
        "-m",
        "shared.cli.main",
        "impute",
        "--spatial",
        str(tmp_path / "st.h5ad"),
        "--reference",
        str(tmp_path / "sc.h5ad"),
    ]
    ok = subprocess.run(
        cli
        + [
            "--holdout-fraction",
            "0.25",
            "--epochs",
            "5",
            "--steps",
            "5",
            "--samples",
            "1",
            "--out",
            str(tmp_path / "imp.h5ad"),
            "--save-model",
            str(tmp_path / "model"),
        ],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a speed target: CI machines can be loaded
    )
    assert ok.returncode == 0, ok.stderr
    import anndata as ad

    out = ad.read_h5ad(tmp_path / "imp.h5ad")
    assert out.shape == (50, 5) and keys.PREDICTED in out.layers and keys.SPATIAL in out.obsm
    report = json.loads((tmp_path / "imp.metrics.json").read_text())
    assert set(report["metrics"]) == {"spadit", "knn", "knn_val_k"} and len(report["genes"]) == 5
    assert (tmp_path / "imp.maps.png").stat().st_size > 0
    assert SpaDiT.from_pretrained(tmp_path / "model").config.n_spots == 50
    bad = subprocess.run(
        cli + ["--genes", "Gene1,NotAGene", "--out", str(tmp_path / "bad.h5ad")],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a speed target: CI machines can be loaded
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: requested gene 'NotAGene' is absent")
    assert not (tmp_path / "bad.h5ad").exists()


def write_csv_pair(folder, st, sc):
    """A pair in the sc-spatial CSV layout: {spatial,reference}/counts.csv genes x obs, coords, cell types."""
    import pandas as pd

    for side, adata in (("spatial", st), ("reference", sc)):
        (folder / side).mkdir(parents=True)
        pd.DataFrame(adata.X.T, index=adata.var_names, columns=adata.obs_names).to_csv(folder / side / "counts.csv")
    pd.DataFrame(st.obsm[keys.SPATIAL], index=st.obs_names, columns=["x", "y"]).to_csv(
        folder / "spatial" / "coords.csv"
    )
    sc.obs[["cell_type"]].rename(columns={"cell_type": "x"}).to_csv(folder / "reference" / "cell_types.csv")


def test_honest_priors_never_read_a_genes_own_st_values():
    """A measured gene's prior is computed without its own ST values (as a test gene's is); k from val genes."""
    from shared.downstream.spadit.prior import K_GRID, choose_k, honest_priors

    st, sc = make_pair(n_genes=30)
    paired = pair_genes(st, sc)
    split = split_genes(paired, holdout_fraction=0.2, seed=0)
    frame = frame_genes(paired, split)
    prior = honest_priors(frame, split, k=10, seed=0)
    assert prior.shape == (30, st.n_obs) and np.isfinite(prior).all()
    np.testing.assert_allclose(  # test genes: exactly the kNN baseline on the measured genes
        prior[split.test],
        knn_impute(frame.st_log[split.measured], frame.sc_log[split.measured], frame.sc_log[split.test]),
    )
    g = split.train[0]
    frame.st_log[g] = np.random.default_rng(1).permutation(frame.st_log[g])  # scramble one gene's ST values
    again = honest_priors(frame, split, k=10, seed=0)
    np.testing.assert_array_equal(again[g], prior[g])  # its own prior is unchanged
    assert not np.array_equal(again, prior)  # ... while other folds' priors did read it
    assert choose_k(frame, split, default=10) in {min(k, sc.n_obs) for k in K_GRID}


def test_csv_folders_load_and_errors_name_the_file(tmp_path):
    from shared.downstream.spadit.loaders import CELL_TYPE, read_input

    st, sc = make_pair()
    write_csv_pair(tmp_path / "pair", st, sc)
    st2 = read_input(tmp_path / "pair" / "spatial", "spatial input", need_spatial=True)
    sc2 = read_input(tmp_path / "pair" / "reference", "reference input", need_spatial=False)
    np.testing.assert_allclose(st2.X, st.X)
    np.testing.assert_allclose(st2.obsm[keys.SPATIAL], st.obsm[keys.SPATIAL])
    assert list(sc2.var_names) == list(sc.var_names) and list(sc2.obs[CELL_TYPE]) == list(sc.obs["cell_type"])
    coords = tmp_path / "pair" / "spatial" / "coords.csv"
    coords.write_text(coords.read_text().replace('"x","y"', "a,b", 1).replace(",x,y", ",a,b", 1))
    with pytest.raises(FedstError, match="coords.csv: expected columns x, y"):
        read_input(tmp_path / "pair" / "spatial", "spatial input", need_spatial=True)
    coords.unlink()
    with pytest.raises(FedstError, match="coords.csv: not found"):
        read_input(tmp_path / "pair" / "spatial", "spatial input", need_spatial=True)
    counts = tmp_path / "pair" / "reference" / "counts.csv"
    lines = counts.read_text().splitlines()
    lines[2] = "Gene1,oops," + lines[2].split(",", 2)[2]  # one non-numeric value, same field count
    counts.write_text("\n".join(lines) + "\n")
    with pytest.raises(FedstError, match="counts.csv: non-numeric"):
        read_input(tmp_path / "pair" / "reference", "reference input", need_spatial=False)


def test_cli_impute_reads_a_real_csv_pair_as_shipped(tmp_path):
    """README's command on ../shared/data/sc-spatial/visium_hippocampus as is (few epochs: a wiring check)."""
    pair = shared_path("sc-spatial", "visium_hippocampus")
    out = subprocess.run(
        [sys.executable, "-m", "shared.cli.main", "impute", "--spatial", str(pair / "spatial")]
        + ["--reference", str(pair / "reference"), "--holdout-fraction", "0.2", "--epochs", "3"]
        + ["--steps", "5", "--samples", "1", "--out", str(tmp_path / "imp.h5ad")],
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a speed target
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "imp.metrics.json").read_text())
    assert len(report["genes"]) == 25  # 20% of the 124 shared genes
    # at 3 epochs the blend chosen on validation genes keeps SpaDiT near its kNN prior, well above chance
    assert report["metrics"]["spadit"]["pcc"] > 0.2 and report["metrics"]["knn"]["pcc"] > 0.2
