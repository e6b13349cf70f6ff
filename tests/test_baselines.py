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


# ---- honest model selection: sections (or spatial blocks), never single spots ----
def _smooth_fields(rng, side: int, dims: int, length: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    fields = np.stack([gaussian_filter(f, length, mode="wrap") for f in rng.normal(size=(dims, side, side))])
    fields /= fields.std(axis=(1, 2), keepdims=True)
    return fields.reshape(dims, -1).T


def _autocorrelated_sections(n_sections: int = 5, side: int = 14, seed: int = 0):
    """Sections where expression = a linear read-out of 20 spot-wise image features (shared by all sections,
    the signal) + a smooth random field (a section's own tissue layout: the nuisance), and 200 further
    features are smooth fields too, so neighbouring spots have near-identical features. A flexible (small
    alpha) ridge can fit each training section's nuisance through those 200 features, which spot-LOO
    rewards (a held-out spot's neighbours carry its nuisance) and a new section punishes."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(20, 6)) / np.sqrt(20)
    yy, xx = np.mgrid[:side, :side]
    xs, ys, sections, coords = [], [], [], []
    for s in range(n_sections):
        z = rng.normal(size=(side * side, 20))
        nuisance = _smooth_fields(rng, side, 6, 2.0)
        xs.append(np.hstack([z, _smooth_fields(rng, side, 200, 2.0)]))
        ys.append(z @ w + nuisance + 0.1 * rng.normal(size=(side * side, 6)))
        sections += [f"s{s}"] * side * side
        coords.append(np.stack([xx.ravel(), yy.ravel()], 1) * 100.0)
    return np.concatenate(xs), np.concatenate(ys), np.array(sections), np.concatenate(coords)


def _mean_pcc(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([np.corrcoef(pred[:, j], truth[:, j])[0, 1] for j in range(truth.shape[1])]))


def test_section_out_picks_a_larger_alpha_than_spot_loo_and_predicts_new_sections_at_least_as_well() -> None:
    from shared.downstream.baselines import SECTION_OUT, SPOT_LOO

    x, y, sections, coords = _autocorrelated_sections()
    loo_pcc, sec_pcc = [], []
    for held in np.unique(sections):  # outer leave-one-section-out; alpha chosen on the 4 training sections
        tr, te = sections != held, sections == held
        loo = RidgeBaseline().fit(x[tr], y[tr])
        sec = RidgeBaseline().fit(x[tr], y[tr], groups=sections[tr], coords=coords[tr])
        assert loo.selection_ == SPOT_LOO and sec.selection_ == SECTION_OUT
        assert sec.alpha_ >= 30 * loo.alpha_, (held, loo.alpha_, sec.alpha_)  # measured: 0.1-0.3 vs 31.6-100
        assert sec.cv_scores_.shape == (len(sec.alphas),) and sec.alpha_ == sec.alphas[int(np.argmax(sec.cv_scores_))]
        loo_pcc.append(_mean_pcc(loo.predict(x[te]), y[te]))
        sec_pcc.append(_mean_pcc(sec.predict(x[te]), y[te]))
    assert np.mean(sec_pcc) >= np.mean(loo_pcc) + 0.05, (loo_pcc, sec_pcc)


def test_fold_scores_equal_the_sklearn_pipeline_refitted_inside_each_fold() -> None:
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from shared.downstream.baselines import ridge_fold_scores

    x, y = _linear_problem(n=90, d=12, g=4, noise=1.0)
    x[:, 3] = 7.0  # a constant feature: StandardScaler's sd-1 rule
    folds = [np.arange(0, 30), np.arange(30, 60), np.arange(60, 90)]
    alphas = (0.1, 10.0, 1000.0)
    got = ridge_fold_scores(x, y, folds, alphas, n_components=6)
    for f, test in enumerate(folds):
        train = np.setdiff1d(np.arange(90), test)
        for a, alpha in enumerate(alphas):
            steps = [("s", StandardScaler()), ("p", PCA(6, svd_solver="full")), ("r", Ridge(alpha=alpha))]
            pred = Pipeline(steps).fit(x[train], y[train]).predict(x[test])
            assert got[f, a] == pytest.approx(_mean_pcc(pred, y[test]), abs=1e-10)


def test_selection_folds_precedence_holdout_mask_and_contiguous_blocks() -> None:
    from scipy.sparse.csgraph import connected_components

    from shared.downstream.baselines import SECTION_OUT, SPATIAL_BLOCKS, SPOT_LOO, selection_folds, spatial_blocks

    groups = np.array(["a"] * 4 + ["b"] * 3 + ["syn"] * 3)
    scheme, folds = selection_folds(10, groups, holdout=np.arange(10) < 7)
    # the synthetic spots (holdout False) are never held out, only trained on
    assert scheme == SECTION_OUT and [f.tolist() for f in folds] == [[0, 1, 2, 3], [4, 5, 6]]
    side = 10
    grid = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2).astype(float)
    scheme, folds = selection_folds(side * side, np.full(side * side, "one"), grid)
    assert scheme == SPATIAL_BLOCKS and len(folds) == 5
    assert sorted(np.concatenate(folds).tolist()) == list(range(side * side))  # a partition
    for block in folds:  # each block is one connected piece of the grid (4-neighbours)
        pts = grid[block]
        adj = (np.abs(pts[:, None] - pts[None]).sum(-1) == 1).astype(int)
        assert connected_components(adj, directed=False)[0] == 1
    assert selection_folds(10)[0] == SPOT_LOO and selection_folds(10, np.full(10, "x"))[1] == []
    assert (spatial_blocks(np.zeros((6, 2))) == 0).all()  # one position: no blocks to hold out
    with pytest.raises(FedstError, match="groups: expected 10"):
        selection_folds(10, groups[:5])
    with pytest.raises(FedstError, match="coords"):
        selection_folds(10, coords=np.zeros((10, 3)))


def test_one_section_selects_by_spatial_blocks_and_the_scheme_round_trips(tmp_path) -> None:
    import json

    from shared.downstream.baselines import SPATIAL_BLOCKS, SPOT_LOO

    x, y, sections, coords = _autocorrelated_sections(n_sections=1, side=10)
    model = RidgeBaseline(n_components=32).fit(x, y, groups=sections, coords=coords)
    assert model.selection_ == SPATIAL_BLOCKS and model.alpha_ in model.alphas
    model.save_pretrained(tmp_path / "r")
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["selection_"] == SPATIAL_BLOCKS
    assert RidgeBaseline.from_pretrained(tmp_path / "r").selection_ == SPATIAL_BLOCKS
    del config["selection_"]  # a ridge saved before the scheme was recorded: RidgeCV's spot LOO chose it
    (tmp_path / "r" / "config.json").write_text(json.dumps(config))
    old = RidgeBaseline.from_pretrained(tmp_path / "r")
    assert old.selection_ == SPOT_LOO and old.alpha_ == model.alpha_
    np.testing.assert_array_equal(old.predict(x), model.predict(x))


def test_mlp_validation_holds_out_whole_sections() -> None:
    import torch

    from shared.downstream.baselines import RANDOM_SPOTS, SECTION_OUT, SPATIAL_BLOCKS, validation_rows

    torch.set_num_threads(1)
    groups = np.repeat(["a", "b", "c", "d"], 25)
    scheme, rows = validation_rows(100, 0.1, groups, seed=0)
    held = set(groups[rows])
    assert scheme == SECTION_OUT and len(held) == 1 and len(rows) == 25  # one whole section, nothing else
    assert sorted(rows.tolist()) == np.flatnonzero(groups == held.pop()).tolist()
    scheme, rows = validation_rows(100, 0.6, groups, seed=0)
    assert scheme == SECTION_OUT and len(set(groups[rows])) == 3  # >= 60 % of the spots, never every section
    grid = np.stack(np.meshgrid(np.arange(10), np.arange(10)), -1).reshape(-1, 2).astype(float)
    scheme, rows = validation_rows(100, 0.2, np.full(100, "one"), grid)
    assert scheme == SPATIAL_BLOCKS and 5 <= len(rows) <= 40
    assert validation_rows(100, 0.1) == (RANDOM_SPOTS, None)
    x, y = _linear_problem(n=100, d=4, g=2)
    mlp = MLPRegressor(4, 2, hidden=8).fit(x, y, epochs=2, groups=groups, seed=0)
    assert mlp.validation_ == SECTION_OUT
    assert MLPRegressor(4, 2, hidden=8).fit(x, y, epochs=2, seed=0).validation_ == RANDOM_SPOTS
