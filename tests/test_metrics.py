"""Known-answer tests for shared/downstream/metrics.py (values computed by hand in the comments)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import jensenshannon
from scipy.stats import pearsonr

from shared.downstream import metrics as M
from shared.errors import FedstError


def test_pcc_known_values_and_zero_variance_rule():
    truth = np.array([[1.0, 1.0, 5.0], [2.0, 2.0, 5.0], [3.0, 3.0, 5.0]])
    pred = np.array([[1.0, 3.0, 1.0], [2.0, 2.0, 2.0], [4.0, 3.0, 3.0]])
    r = M.pcc_per_gene(pred, truth)
    # gene 0: x=(1,2,4) vs y=(1,2,3): cov=3/... -> r = 3/sqrt(14/3*... ) = 0.98198...; matches pearsonr
    assert r[0] == pytest.approx(pearsonr([1, 2, 4], [1, 2, 3])[0], abs=1e-12)
    assert r[0] == pytest.approx(0.9819805060619657, abs=1e-12)
    # gene 1: (3,2,3) vs (1,2,3) -> centred (1/3,-2/3,1/3)·(-1,0,1) = 0 -> r = 0
    assert r[1] == pytest.approx(0.0, abs=1e-12)
    # gene 2: truth constant -> undefined, NaN in the per-gene array, excluded from every mean
    assert np.isnan(r[2])
    assert M.pcc_pooled(pred, truth) == pytest.approx((0.9819805060619657 + 0.0) / 2)
    # constant prediction, varying truth -> 0 by rule (not NaN)
    assert M.pcc_per_gene(np.ones((3, 1)), np.array([[1.0], [2.0], [4.0]]))[0] == 0.0


def test_pcc_per_slide_mean_pooled_and_top_k_differ_as_defined():
    # two slides of 3 spots; within each slide pred = truth (r = 1) but slide 2 is offset in pred only
    truth = np.array([[1.0, 3.0], [2.0, 1.0], [3.0, 2.0], [1.0, 3.0], [2.0, 1.0], [3.0, 2.0]])
    pred = truth.copy()
    pred[3:, 0] += 10.0
    pred[:3, 1] = [1.0, 2.0, 3.0]  # slide 1, gene 1: (1,2,3) vs (3,1,2) -> r = -0.5
    sections = np.array(["a"] * 3 + ["b"] * 3)
    # slide a: mean(1, -0.5) = 0.25; slide b: mean(1, 1) = 1 -> 0.625
    assert M.pcc_per_slide_mean(pred, truth, sections) == pytest.approx(0.625)
    # per gene averaged over slides: gene0 = 1, gene1 = (-0.5 + 1)/2 = 0.25 -> top-1 = 1, top-2 = 0.625
    assert M.pcc_top_k(pred, truth, k=1, sections=sections) == pytest.approx(1.0)
    assert M.pcc_top_k(pred, truth, k=2, sections=sections) == pytest.approx(0.625)
    pooled0 = pearsonr(pred[:, 0], truth[:, 0])[0]
    pooled1 = pearsonr(pred[:, 1], truth[:, 1])[0]
    assert M.pcc_pooled(pred, truth) == pytest.approx((pooled0 + pooled1) / 2)


def test_errors_on_raw_and_minmax_scale():
    truth = np.array([[0.0, 2.0], [2.0, 4.0]])
    pred = np.array([[1.0, 2.0], [2.0, 0.0]])
    # differences: (1, 0, 0, -4) -> MSE = 17/4, MAE = 5/4
    assert M.mse(pred, truth) == pytest.approx(17 / 4)
    assert M.rmse(pred, truth) == pytest.approx(np.sqrt(17 / 4))
    assert M.mae(pred, truth) == pytest.approx(5 / 4)
    # min-max: pred -> [[0,1],[1,0]], truth -> [[0,0],[1,1]]; diffs (0,1,0,-1) -> RMSE = sqrt(1/2)
    assert M.rmse_minmax(pred, truth) == pytest.approx(np.sqrt(0.5))
    # per-slide averaging: slide MSEs 1/2 (first row) and 8 (second) -> 4.25 (same here by symmetry)
    assert M.mse(pred, truth, sections=np.array([0, 1])) == pytest.approx((1 / 2 + 16 / 2) / 2)


def test_ssim_hand_computed():
    truth = np.array([[0.0], [1.0], [2.0]])  # min-max -> (0, .5, 1)
    pred = np.array([[0.0], [2.0], [1.0]])  # min-max -> (0, 1, .5)
    mx = my = 0.5
    vx = vy = (0.25 + 0.25 + 0) / 3  # 1/6
    cxy = ((-0.5) * (-0.5) + 0.5 * 0 + 0 * 0.5) / 3  # 1/12
    c1, c2 = 1e-4, 9e-4
    expected = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert M.ssim_per_gene(pred, truth)[0] == pytest.approx(expected)
    assert M.ssim(truth, truth) == pytest.approx(1.0)
    # constant gene in both: normalised to zeros -> (C1 * C2) / (C1 * C2) = 1, defined, never NaN
    assert M.ssim_per_gene(np.ones((3, 1)), np.full((3, 1), 7.0))[0] == pytest.approx(1.0)


def test_js_divergence_and_distance_are_distinct_and_match_scipy():
    truth = np.array([[1.0], [0.0]])  # p = (1, 0)
    pred = np.array([[0.0], [3.0]])  # q = (0, 1): disjoint -> divergence = 1 bit, distance = 1
    div, dist = M.js_per_gene(pred, truth)
    assert div[0] == pytest.approx(1.0) and dist[0] == pytest.approx(1.0)
    truth = np.array([[1.0], [1.0]])  # (1/2, 1/2)
    pred = np.array([[3.0], [1.0]])  # (3/4, 1/4); m = (5/8, 3/8)
    kl_p = 0.5 * np.log2(0.5 / 0.625) + 0.5 * np.log2(0.5 / 0.375)
    kl_q = 0.75 * np.log2(0.75 / 0.625) + 0.25 * np.log2(0.25 / 0.375)
    expected = 0.5 * (kl_p + kl_q)
    assert M.js_divergence(pred, truth) == pytest.approx(expected)
    assert M.js_distance(pred, truth) == pytest.approx(np.sqrt(expected))
    assert M.js_distance(pred, truth) == pytest.approx(jensenshannon([0.75, 0.25], [0.5, 0.5], base=2))
    # an all-zero gene has no distribution: excluded (NaN per gene) and the mean uses the others
    both = np.hstack([pred, np.zeros((2, 1))])
    assert np.isnan(M.js_per_gene(both, np.hstack([truth, np.ones((2, 1))]))[0][1])
    assert M.js_divergence(both, np.hstack([truth, np.ones((2, 1))])) == pytest.approx(expected)


def test_js_of_near_identical_distributions_is_zero_not_nan():
    """scipy's jensenshannon returns NaN (sqrt of a -1e-17 divergence) for about half of these columns; the
    metric reports 0 for them, the reason js_per_gene wraps it."""
    rng = np.random.default_rng(1)
    truth = rng.random((30, 200))
    pred = truth * (1 + 1e-12 * rng.standard_normal(truth.shape))
    with np.errstate(invalid="ignore"):
        assert np.isnan(jensenshannon(pred, truth, base=2, axis=0)).any()
    div, dist = M.js_per_gene(pred, truth)
    assert np.isfinite(div).all() and np.isfinite(dist).all()
    assert dist.max() < 1e-5 and M.js_divergence(pred, truth) < 1e-10


def test_masked_pcc_uses_only_measured_spots():
    truth = np.array([[1.0, 1.0, 1.0], [2.0, 2.0, 5.0], [3.0, 3.0, 5.0], [9.0, 4.0, 5.0]])
    pred = np.array([[1.0, 4.0, 2.0], [2.0, 3.0, 1.0], [4.0, 2.0, 3.0], [0.0, 1.0, 2.0]])
    measured = np.array([[1, 1, 0], [1, 1, 1], [1, 1, 1], [0, 1, 1]])
    r = M.pcc_per_gene_masked(pred, truth, measured)
    assert r[0] == pytest.approx(pearsonr([1, 2, 4], [1, 2, 3])[0], abs=1e-12)  # spot 3 unmeasured: ignored
    assert r[1] == pytest.approx(-1.0)
    assert np.isnan(r[2])  # measured truth (5, 5, 5) is constant: undefined
    # fewer than min_spots measured: undefined; a constant prediction on varying truth: 0 (zero-variance rule)
    assert np.isnan(M.pcc_per_gene_masked(pred, truth, measured, min_spots=4)[0])
    assert M.pcc_per_gene_masked(np.ones((4, 1)), truth[:, :1], np.ones((4, 1)))[0] == 0.0
    with pytest.raises(FedstError, match="measured has shape"):
        M.pcc_per_gene_masked(pred, truth, measured[:, :2])


def test_gsc_hand_computed():
    truth = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 0.0], [3.0, 6.0, 2.0], [4.0, 8.0, 1.0]])
    assert M.gsc(truth, truth) == pytest.approx(1.0)
    ct = np.corrcoef(truth.T)[np.triu_indices(3, 1)]
    pred = truth.copy()
    pred[:, 2] = pred[:, 2][::-1]
    cp = np.corrcoef(pred.T)[np.triu_indices(3, 1)]
    assert M.gsc(pred, truth) == pytest.approx(np.corrcoef(cp, ct)[0, 1])
    with pytest.raises(FedstError, match="gsc"):
        M.gsc(truth[:, :2], truth[:, :2])


def test_morans_i_and_ssc_hand_computed():
    # path 0-1-2-3 with binary weights (S0 = 6); x = (1,2,3,4): z = (-1.5,-.5,.5,1.5), z'z = 5
    w = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0]], dtype=float))
    x = np.array([[1.0, 1.0, 5.0], [2.0, 4.0, 5.0], [3.0, 1.0, 5.0], [4.0, 4.0, 5.0]])
    # gene 0: z'Wz = 2*(.75 - .25 + .75) = 2.5 -> I = (4/6) * 2.5 / 5 = 1/3
    # gene 1: z = (-1.5, 1.5, -1.5, 1.5): z'Wz = 2*(-2.25*3) = -13.5, z'z = 9 -> I = (4/6)*(-1.5) = -1
    i = M.morans_i(x, w)
    assert i[0] == pytest.approx(1 / 3) and i[1] == pytest.approx(-1.0) and np.isnan(i[2])
    pred = x[:, :2] * 2 + 1  # affine per gene: Moran's I unchanged -> SSC = 1
    truth = x[:, :2]
    with pytest.raises(FedstError, match="ssc"):  # only 2 defined genes is fine; 1 is not
        M.ssc(pred[:, :1], truth[:, :1], w)
    x3 = np.hstack([truth, np.array([[1.0], [1.0], [2.0], [2.0]])])  # gene 2: z=(-.5,-.5,.5,.5) I = (4/6)*.5/1 = 1/3
    assert M.morans_i(x3, w)[2] == pytest.approx(1 / 3)
    assert M.ssc(x3 * 3, x3, w) == pytest.approx(1.0)
    flipped = x3[:, [1, 0, 2]]  # Moran's I (-1, 1/3, 1/3) vs (1/3, -1, 1/3) -> r = -0.5
    assert M.ssc(flipped, x3, w) == pytest.approx(-0.5)


def test_ari_nmi():
    assert M.ari([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert M.nmi([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    # {0,0,1,1} vs {0,1,0,1}: contingency all ones -> ARI = (0 - 1/3*... ) = -0.5
    assert M.ari([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert M.nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(FedstError, match="labels"):
        M.ari([0, 1], [0, 1, 2])


def test_accuracy_score_ranks_methods_not_genes():
    results = {
        "d1": {
            "a": {"pcc_per_slide_mean": 0.5, "rmse_minmax": 0.1},
            "b": {"pcc_per_slide_mean": 0.3, "rmse_minmax": 0.2},
        },
        "d2": {
            "a": {"pcc_per_slide_mean": 0.2, "rmse_minmax": 0.3},
            "b": {"pcc_per_slide_mean": 0.4, "rmse_minmax": 0.3},
        },
    }
    # d1: a best on both (rank 2/2), b (1/2); d2: pcc b best; rmse tie -> 1.5/2 each
    s = M.accuracy_score(results, metrics=("pcc_per_slide_mean", "rmse_minmax"))
    assert s["a"] == pytest.approx((1 + 1 + 0.5 + 0.75) / 4)
    assert s["b"] == pytest.approx((0.5 + 0.5 + 1 + 0.75) / 4)
    with pytest.raises(FedstError, match="lacks metric"):
        M.accuracy_score(results, metrics=("ssim",))


def test_shape_mismatch_and_bad_values_raise():
    with pytest.raises(FedstError, match="same"):
        M.pcc_pooled(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(FedstError, match="NaN"):
        M.mse(np.array([[np.nan], [1.0]]), np.ones((2, 1)))
    with pytest.raises(FedstError, match="constant"):
        M.pcc_pooled(np.random.rand(4, 2), np.ones((4, 2)))
    with pytest.raises(FedstError, match="sections"):
        M.pcc_per_slide_mean(np.random.rand(4, 2), np.random.rand(4, 2), sections=[0, 1])


def test_evaluate_predictions_reports_everything_without_nan():
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2).astype(float)
    truth = rng.poisson(3.0, size=(30, 5)).astype(float)
    truth[:, 4] = 2.0  # constant truth gene
    pred = truth + rng.normal(0, 0.5, size=truth.shape)
    pred[:, 3] = 1.0  # constant prediction
    sections = np.array(["s1"] * 15 + ["s2"] * 15)
    out = M.evaluate_predictions(pred, truth, coords, sections, [f"g{i}" for i in range(5)])
    for key in (
        "pcc_per_slide_mean",
        "pcc_pooled",
        "pcc_top_k",
        "mse",
        "rmse",
        "mae",
        "rmse_minmax",
        "ssim",
        "js_divergence",
        "js_distance",
        "gsc",
        "ssc",
    ):
        assert isinstance(out[key], float) and np.isfinite(out[key]), key
    assert out["n_genes_constant_truth"] == 2  # gene 4 in both slides
    assert out["n_genes_constant_pred"] == 2  # gene 3 in both slides
    assert out["per_gene"]["g4"]["pcc"] is None and out["per_gene"]["g3"]["pcc"] == 0.0
    assert out["n_slides"] == 2
    # perfect prediction
    perfect = M.evaluate_predictions(truth[:, :4], truth[:, :4], coords, sections)
    assert perfect["pcc_per_slide_mean"] == pytest.approx(1.0) and perfect["rmse"] == 0.0
    assert perfect["ssc"] == pytest.approx(1.0) and perfect["gsc"] == pytest.approx(1.0)


def _prediction_adata(rng, with_truth: bool = True):
    """What `fedst predict` writes: X = layers['predicted'], the measured truth in layers['log1p_norm']."""
    import anndata as ad
    import pandas as pd

    from shared import keys

    truth = rng.poisson(3.0, size=(40, 4)).astype(np.float32)
    pred = (truth + rng.normal(0, 1.0, size=truth.shape)).astype(np.float32)
    obs = pd.DataFrame({keys.SECTION: ["s1"] * 20 + ["s2"] * 20}, index=[f"spot{i}" for i in range(40)])
    adata = ad.AnnData(pred.copy(), obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(4)]))
    adata.layers[keys.PREDICTED] = pred
    adata.obsm[keys.SPATIAL] = np.stack(np.meshgrid(np.arange(5), np.arange(8)), -1).reshape(-1, 2).astype(float)
    if with_truth:
        adata.layers[keys.NORMALISED] = truth
    return adata, pred, truth


def test_evaluate_anndata_without_a_truth_file_scores_the_own_measured_layer() -> None:
    from shared import keys

    rng = np.random.default_rng(5)
    adata, pred, truth = _prediction_adata(rng)
    own = M.evaluate_anndata(adata)
    assert own["pcc_per_slide_mean"] == pytest.approx(M.pcc_per_slide_mean(pred, truth, adata.obs[keys.SECTION]))
    assert own["truth"] == "the prediction's own layers['log1p_norm']" and own["n_spots"] == 40
    # layers['measured']: spots with nothing measured are dropped, then genes not measured at every kept spot
    measured = np.ones_like(truth)
    measured[:5] = 0  # 5 spots measured nothing
    measured[10:, 3] = 0  # gene G3 measured on only some spots
    adata.layers[keys.MEASURED] = measured
    masked = M.evaluate_anndata(adata)
    assert (masked["n_spots"], masked["n_genes"]) == (35, 3)
    assert (masked["n_spots_unmeasured"], masked["n_genes_unmeasured"]) == (5, 1)
    assert set(masked["per_gene"]) == {"G0", "G1", "G2"}
    sec = adata.obs[keys.SECTION].to_numpy()[5:]
    assert masked["pcc_pooled"] == pytest.approx(M.pcc_pooled(pred[5:, :3], truth[5:, :3]))
    assert masked["pcc_per_slide_mean"] == pytest.approx(M.pcc_per_slide_mean(pred[5:, :3], truth[5:, :3], sec))
    no_truth, _, _ = _prediction_adata(rng, with_truth=False)
    with pytest.raises(FedstError, match=r"no truth file given and no layers\['log1p_norm'\]"):
        M.evaluate_anndata(no_truth)
    adata.layers[keys.MEASURED] = np.zeros_like(truth)
    with pytest.raises(FedstError, match="nothing to score"):
        M.evaluate_anndata(adata)


def test_protocols_label_the_per_slide_and_the_hest_pcc_without_renaming_keys() -> None:
    rng = np.random.default_rng(6)
    adata, pred, truth = _prediction_adata(rng)
    # a slide offset the per-slide PCC cannot see but the pooled (HEST) PCC rewards: the numbers differ
    truth[20:] += 5.0
    pred[20:] += 5.0
    adata.layers["log1p_norm"] = truth
    adata.layers["predicted"] = pred
    out = M.evaluate_anndata(adata)
    per_slide, hest = out["protocols"]["per_slide"], out["protocols"]["hest"]
    assert per_slide["metric"] == "pcc_per_slide_mean" and per_slide["pcc"] == out["pcc_per_slide_mean"]
    assert hest["metric"] == "pcc_pooled" and hest["pcc"] == out["pcc_pooled"]
    assert hest["pcc"] == pytest.approx(M.pcc_pooled(pred, truth))
    assert hest["pcc"] > per_slide["pcc"] + 0.05  # measured: 0.957 vs 0.882
    assert "HEST-Benchmark" in hest["description"] and "concatenated" in hest["description"]
    assert "within each slide" in per_slide["description"]
