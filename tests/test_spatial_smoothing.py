"""DRIFT in the prediction path (shared.downstream.spatial_smoothing): the operator's known answers, the choice
of t by inner leave-one-section-out, persistence of the chosen t, and the CLI flags."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from shared.downstream.predictor import SpotBatch, load_predictor, train_predictor_on_batch
from shared.downstream.spatial_smoothing import choose_times, parse_setting, smooth, spot_laplacian
from shared.errors import FedstError

PITCH_PX = 200.0  # 200 um ST pitch at 1 um/px


def _grid(n_sections: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    xx, yy = np.meshgrid(np.arange(side), np.arange(side))
    one = np.stack([xx.ravel(), yy.ravel()], 1) * PITCH_PX
    coords = np.concatenate([one] * n_sections)
    sections = np.repeat([f"s{i}" for i in range(n_sections)], side * side).astype(object)
    return coords, sections


def _data(spatial: bool, seed: int = 0, n_sections: int = 4, side: int = 10):
    """Features = latent signal mixed + heavy noise; targets = the latent signal mixed + light noise. With
    ``spatial`` the latent signal is a smooth field over the section, else independent per spot."""
    rng = np.random.default_rng(seed)
    coords, sections = _grid(n_sections, side)
    if spatial:
        phase = rng.uniform(0, 2 * np.pi, size=(n_sections, 3))
        sec = np.repeat(np.arange(n_sections), side * side)
        z = np.stack([np.sin(coords[:, 0] / 500 + phase[sec, i]) + np.cos(coords[:, 1] / 400 + i) for i in range(3)], 1)
    else:
        z = rng.normal(size=(len(coords), 3))
    feats = (z @ rng.normal(size=(3, 12)) + 2.0 * rng.normal(size=(len(z), 12))).astype(np.float32)
    y = (z @ rng.normal(size=(3, 8)) + 0.1 * rng.normal(size=(len(z), 8))).astype(np.float32)
    mpp = {s: 1.0 for s in np.unique(sections)}
    return SpotBatch(None, coords, sections, mpp, feats), y


def _pcc(pred: np.ndarray, truth: np.ndarray) -> float:
    pc, tc = pred - pred.mean(0), truth - truth.mean(0)
    return float(((pc * tc).sum(0) / np.sqrt((pc**2).sum(0) * (tc**2).sum(0))).mean())


def _subset(batch: SpotBatch, rows: np.ndarray) -> SpotBatch:
    return SpotBatch(None, batch.coords[rows], batch.sections[rows], batch.mpp, batch.features[rows])


GENES = [f"g{i}" for i in range(8)]


# ---- the operator ----
def test_t0_is_the_identity_and_a_constant_stays_constant() -> None:
    coords, sections = _grid(2, 6)
    lap = spot_laplacian(coords, sections)
    x = np.random.default_rng(0).normal(size=(len(coords), 3))
    assert smooth(x, lap, 0.0) is x and smooth(x, lap, None) is x
    const = np.full((len(coords), 2), 3.5)
    np.testing.assert_allclose(smooth(const, lap, 2.0), const, atol=1e-10)


def test_heat_kernel_preserves_each_sections_mean_and_never_mixes_sections() -> None:
    coords, sections = _grid(2, 6)
    lap = spot_laplacian(coords, sections)
    x = np.zeros((len(coords), 1))
    x[0] = 36.0  # a spike in section s0
    out = smooth(x, lap, 1.0)
    s0 = sections == "s0"
    assert out[s0].sum() == pytest.approx(36.0) and np.abs(out[~s0]).max() < 1e-12
    assert out[s0].max() < 36.0 and (out[s0] > 1e-6).sum() > 4, "the spike spreads to its neighbours"


def test_long_edges_are_dropped_by_tissue_distance() -> None:
    coords, sections = _grid(1, 5)
    x = np.random.default_rng(1).normal(size=(len(coords), 2))
    near = spot_laplacian(coords, sections, {"s0": 1.0})  # 200 um pitch: linked
    far = spot_laplacian(coords, sections, {"s0": 10.0})  # 2000 um pitch: nothing within 500 um
    assert near.nnz > 0 and far.nnz == 0
    np.testing.assert_array_equal(smooth(x, far, 2.0), x)


@pytest.mark.parametrize("value,expected", [(None, None), ("off", None), ("auto", "auto"), ("0.5", 0.5), (2, 2.0)])
def test_parse_setting(value, expected) -> None:
    assert parse_setting(value, "--smooth-features") == expected


@pytest.mark.parametrize("value", ["-1", "often", float("nan"), True])
def test_parse_setting_refuses_bad_values_naming_the_flag(value) -> None:
    with pytest.raises(FedstError, match=r"--smooth-features: expected off, auto or a diffusion time"):
        parse_setting(value, "--smooth-features")


# ---- the choice of t ----
def test_auto_picks_t_above_0_on_spatially_smooth_signal_and_improves_held_out_pcc() -> None:
    batch, y = _data(spatial=True)
    train = np.flatnonzero(batch.sections != "s3")
    test = np.flatnonzero(batch.sections == "s3")
    plain = train_predictor_on_batch(_subset(batch, train), y[train], GENES, feature_key="X", progress=False)
    smoothed = train_predictor_on_batch(
        _subset(batch, train),
        y[train],
        GENES,
        feature_key="X",
        progress=False,
        smooth_features="auto",
        smooth_predictions="auto",
    )
    assert smoothed.smoothing["features"] > 0
    scores = smoothed.info["smoothing_selection"]["scores"]["features"]
    assert scores[f"{smoothed.smoothing['features']:g}"] > scores["0"]
    held_out = _subset(batch, test)
    assert _pcc(smoothed.predict(held_out), y[test]) > _pcc(plain.predict(held_out), y[test]) + 0.05


def test_auto_picks_0_without_spatial_structure() -> None:
    batch, y = _data(spatial=False, seed=3)

    def fit_predict(train, test, x_train, x_test):
        x1 = np.c_[x_train, np.ones(len(x_train))]
        w = np.linalg.lstsq(x1, y[train], rcond=None)[0]
        return np.c_[x_test, np.ones(len(x_test))] @ w

    chosen = choose_times(
        batch.features,
        y,
        batch.coords,
        batch.sections,
        batch.mpp,
        fit_predict,
        smooth_features="auto",
        smooth_predictions="auto",
    )
    assert chosen.features == 0.0 and chosen.predictions == 0.0
    assert chosen.scheme == "leave-one-section-out"


def test_a_fixed_t_is_used_as_given_without_search() -> None:
    batch, y = _data(spatial=True, n_sections=2, side=6)
    p = train_predictor_on_batch(batch, y, GENES, feature_key="X", progress=False, smooth_predictions=0.5)
    assert p.smoothing["features"] is None and p.smoothing["predictions"] == 0.5
    assert "smoothing_selection" not in p.info


# ---- persistence and CLI ----
def test_save_load_round_trip_keeps_t_and_predictions(tmp_path) -> None:
    batch, y = _data(spatial=True, n_sections=3, side=6)
    p = train_predictor_on_batch(
        batch, y, GENES, feature_key="X", progress=False, smooth_features=0.25, smooth_predictions="auto"
    )
    p.save_pretrained(tmp_path / "m")
    loaded = load_predictor(tmp_path / "m")
    assert loaded.smoothing == p.smoothing and loaded.smoothing["features"] == 0.25
    np.testing.assert_allclose(loaded.predict(batch), p.predict(batch), rtol=1e-5, atol=1e-6)
    meta_path = tmp_path / "m" / "predictor.json"
    meta = json.loads(meta_path.read_text())
    meta["smoothing"]["features"] = "auto"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FedstError, match="smoothing"):
        load_predictor(tmp_path / "m")


def test_a_predictor_saved_without_smoothing_loads_unsmoothed(tmp_path) -> None:
    batch, y = _data(spatial=True, n_sections=2, side=5)
    train_predictor_on_batch(batch, y, GENES, feature_key="X", progress=False).save_pretrained(tmp_path / "m")
    meta_path = tmp_path / "m" / "predictor.json"
    meta = json.loads(meta_path.read_text())
    assert meta.pop("smoothing") is None
    meta_path.write_text(json.dumps(meta))  # as written before the field existed
    assert load_predictor(tmp_path / "m").smoothing is None


def test_cli_bad_smoothing_value_is_one_clean_error_line(tmp_path) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "shared.cli.main",
            "train-predictor",
            str(tmp_path / "store"),
            "--out",
            str(tmp_path / "m"),
            "--smooth-predictions",
            "lots",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert (
        run.stderr.strip() == "error: --smooth-predictions: expected off, auto or a diffusion time t >= 0, got 'lots'"
    )
