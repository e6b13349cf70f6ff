"""The synthetic consortium: real formats, deterministic by seed, and learnable from the image."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from shared import keys
from shared.errors import FedstError
from shared.genes import GenePanel
from shared.synthetic import CELL_TYPES, TYPE_LABEL, TYPE_MIXTURE, generate_consortium, marker_genes, model, panel_genes


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_is_the_real_formats(synthetic_consortium):
    from shared.ingest import load_site, open_slide

    root = synthetic_consortium
    panel = GenePanel.read(root / "panel.txt")
    assert list(panel) == panel_genes() and len(panel) == 48
    for i in range(3):
        toml = tomllib.loads((root / f"site-{i}" / "site.toml").read_text())
        assert toml["site"] == f"site-{i}" and toml["panel"] == "../panel.txt"
        assert [s["format"] for s in toml["sections"]] == ["hest", "hest"]
    site = load_site(root / "site-1" / "site.toml")  # the ingest engineer's real HEST reader
    assert [s.section_id for s in site.sections] == ["S1A", "S1B"]
    for section in site.sections:
        raw = ad.read_h5ad(root / "site-1" / f"{section.section_id}.h5ad")
        assert 150 <= raw.n_obs <= 300
        assert raw.n_vars == 64 and set(panel) < set(raw.var_names)  # 16 off-panel genes too
        counts = np.asarray(raw.X)
        assert counts.min() >= 0 and np.array_equal(counts, np.round(counts))
        assert raw.uns[keys.MPP] == 1.0
        with open_slide(section.slide_path) as slide:
            assert slide.mpp == pytest.approx(1.0)
            assert slide.level_count >= 3
            xy = raw.obsm[keys.SPATIAL]
            assert (xy[:, 0] > 0).all() and (xy[:, 0] < slide.width).all() and (xy[:, 1] < slide.height).all()
        # Visium geometry: nearest neighbours are 100 um apart
        d = np.linalg.norm(xy[:, None] - xy[None], axis=2) + np.eye(len(xy)) * 1e9
        assert np.median(d.min(axis=1)) == pytest.approx(100.0, abs=0.5)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    small = {"n_sites": 1, "sections_per_site": 1, "grid": (6, 6)}
    first = _digests(generate_consortium(tmp_path / "a", seed=5, **small))
    again = _digests(generate_consortium(tmp_path / "b", seed=5, **small))
    other = _digests(generate_consortium(tmp_path / "c", seed=6, **small))
    assert first == again
    assert set(first) == set(other)
    changed = {name for name in first if first[name] != other[name]}
    assert {"site-0/S0A.h5ad", "site-0/S0A.tif"} <= changed
    assert first["panel.txt"] == other["panel.txt"]  # the panel is part of the model, not of the seed


def test_expression_follows_the_type_mixtures(synthetic_consortium):
    raw = ad.read_h5ad(synthetic_consortium / "site-0" / "S0A.h5ad")
    mixture = raw.obsm[TYPE_MIXTURE]
    np.testing.assert_allclose(mixture.sum(axis=1), 1.0, atol=1e-5)
    library = np.asarray(raw.X).sum(axis=1)
    assert 0.8 * model.LIBRARY_MEAN < library.mean() < 1.2 * model.LIBRARY_MEAN
    normalised = np.log1p(np.asarray(raw.X) / library[:, None] * keys.TARGET_SUM)
    labels = raw.obs[TYPE_LABEL].astype(str).to_numpy()
    for k, cell_type in enumerate(CELL_TYPES):
        cols = [list(raw.var_names).index(g) for g in cell_type.markers]
        score = normalised[:, cols].mean(axis=1)
        # markers track their type's proportion, and are highest where that type dominates
        assert np.corrcoef(score, mixture[:, k])[0, 1] > 0.7, cell_type.name
        if (labels == cell_type.name).sum() >= 5:
            assert score[labels == cell_type.name].mean() > score[labels != cell_type.name].mean() + 1.0


def test_sites_differ_in_stain_and_batch(synthetic_consortium):
    effects = [
        ad.read_h5ad(synthetic_consortium / f"site-{i}" / f"S{i}A.h5ad").uns[model.GROUND_TRUTH]["site_effects"]
        for i in range(3)
    ]
    stains = [np.asarray(e["stain"]) for e in effects]
    assert not np.allclose(stains[0], stains[1]) and not np.allclose(stains[1], stains[2])
    for stain in stains:  # rotated at most STAIN_ROTATION_RAD away from the reference H&E vectors
        reference = model.HE_STAIN / np.linalg.norm(model.HE_STAIN, axis=1, keepdims=True)
        cosines = (stain * reference).sum(axis=1)
        assert (cosines > np.cos(model.STAIN_ROTATION_RAD) - 1e-6).all()


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(FedstError, match="n_sites must be >= 1"):
        generate_consortium(tmp_path, n_sites=0)


def _patch_features(patches: np.ndarray) -> np.ndarray:
    """The downstream's non-learned encoder ("stats": optical-density statistics, Gabor and gradient energy)."""
    from shared.downstream.encoders import create_encoder

    return create_encoder("stats", device="cpu").embed(patches)


@pytest.fixture(scope="module")
def synthetic_stores(synthetic_consortium, tmp_path_factory):
    from shared.store.prepare import prepare_store

    out = tmp_path_factory.mktemp("synthetic-stores")
    return [
        prepare_store(
            synthetic_consortium / f"site-{i}" / "site.toml",
            out / f"site-{i}",
            patch_px=32,
            max_tiles_per_section=0,
            progress=False,
        )
        for i in range(2)
    ]


def test_a_ridge_on_site_0_patches_predicts_markers_on_site_1(synthetic_stores):
    """The documented learnability guarantee (README, Synthetic consortium): mean marker PCC > 0.35."""
    from sklearn.linear_model import Ridge

    train, test = synthetic_stores
    markers = [g for genes in marker_genes().values() for g in genes]
    model_ = Ridge(alpha=10.0).fit(_patch_features(np.asarray(train.patches)), train.spots[:, markers].X)
    predicted = model_.predict(_patch_features(np.asarray(test.patches)))
    truth = test.spots[:, markers].X
    pcc = np.array([np.corrcoef(predicted[:, j], truth[:, j])[0, 1] for j in range(len(markers))])
    assert pcc.mean() > 0.35, pcc.round(2)
    assert (pcc > 0.1).all(), pcc.round(2)
    # and the image, not chance: shuffled training pairs learn nothing
    shuffled = np.random.default_rng(0).permutation(train.spots.n_obs)
    null = Ridge(alpha=10.0).fit(_patch_features(np.asarray(train.patches)), train.spots[:, markers].X[shuffled])
    null_pcc = np.nanmean(
        [
            np.corrcoef(null.predict(_patch_features(np.asarray(test.patches)))[:, j], truth[:, j])[0, 1]
            for j in range(len(markers))
        ]
    )
    assert null_pcc < pcc.mean() - 0.25


def test_macenko_recovers_site_stains_and_keeps_the_transfer(synthetic_stores, synthetic_consortium):
    """Macenko normalisation (fit per site on its patches) finds the site's true stain vectors; the ridge
    transfer still holds on normalised patches (README: mean marker PCC > 0.4)."""
    from sklearn.linear_model import Ridge

    from shared.store.stain import StainNormaliser

    normalisers = [StainNormaliser.fit(np.asarray(store.patches)) for store in synthetic_stores]
    for i, normaliser in enumerate(normalisers):
        truth = np.asarray(
            ad.read_h5ad(synthetic_consortium / f"site-{i}" / f"S{i}A.h5ad").uns[model.GROUND_TRUTH]["site_effects"][
                "stain"
            ]
        )
        cosines = (normaliser.stains * truth).sum(axis=1)
        assert (cosines > 0.98).all(), cosines
    train, test = synthetic_stores
    features = [_patch_features(n.transform(np.asarray(s.patches))) for n, s in zip(normalisers, synthetic_stores)]
    markers = [g for genes in marker_genes().values() for g in genes]
    predicted = Ridge(alpha=10.0).fit(features[0], train.spots[:, markers].X).predict(features[1])
    truth = test.spots[:, markers].X
    pcc = np.array([np.corrcoef(predicted[:, j], truth[:, j])[0, 1] for j in range(len(markers))])
    assert pcc.mean() > 0.4, pcc.round(2)
