"""`prepare_store`: patches, tissue tiles, expression on the panel; no-op on unchanged inputs; atomic writes."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from conftest import shared_path

from shared import keys
from shared.errors import FedstError
from shared.store import PatchStore, is_store
from shared.store.prepare import prepare_store
from shared.store.tissue import otsu_threshold, saturation, tile_grid, tissue_mask


def _manifest_mtime(store: Path) -> int:
    return (store / "manifest.json").stat().st_mtime_ns


@pytest.fixture(scope="module")
def site0(synthetic_consortium, tmp_path_factory) -> tuple[Path, PatchStore]:
    """Site 0 of the session consortium, copied so tests may touch its files."""
    root = tmp_path_factory.mktemp("site0")
    shutil.copytree(synthetic_consortium / "site-0", root / "site-0")
    shutil.copy(synthetic_consortium / "panel.txt", root / "panel.txt")
    toml = root / "site-0" / "site.toml"
    return toml, prepare_store(toml, root / "store", patch_px=32, max_tiles_per_section=40, progress=False)


def test_store_holds_patches_tiles_and_expression(site0):
    toml, store = site0
    raws = [ad.read_h5ad(toml.parent / f"{sid}.h5ad") for sid in ("S0A", "S0B")]
    n = sum(r.n_obs for r in raws)
    assert store.n_spots == n and store.patches.shape == (n, 32, 32, 3) and store.patches.dtype == np.uint8
    assert isinstance(store.patches, np.memmap)
    assert store.sections == ["S0A", "S0B"] and store.panel == (toml.parent.parent / "panel.txt").read_text().split()
    spots = store.spots
    np.testing.assert_array_equal(spots.obs[keys.PATCH_INDEX].to_numpy(), np.arange(n))
    assert not spots.obs[keys.SYNTHETIC].any()
    assert spots.uns[keys.MPP] == {"S0A": 1.0, "S0B": 1.0}
    assert store.manifest["params"]["field_um"] == 112.0 and store.manifest["params"]["mpp"]["S0A"] == 1.0
    # expression: counts are the raw panel counts, X = log1p(counts / library(all 64 genes) * 1e4)
    first = raws[0][:, store.panel]
    np.testing.assert_array_equal(spots.layers[keys.COUNTS][: raws[0].n_obs], np.asarray(first.X))
    library = np.asarray(raws[0].X).sum(axis=1)
    expected = np.log1p(np.asarray(first.X) / library[:, None] * keys.TARGET_SUM)
    np.testing.assert_allclose(spots.X[: raws[0].n_obs], expected, rtol=1e-5, atol=1e-6)
    # the 16 off-panel genes take their share: the panel sums to less than the 10k target
    panel_total = np.expm1(spots.X).sum(axis=1)
    assert (panel_total < keys.TARGET_SUM).all() and (panel_total > 0.5 * keys.TARGET_SUM).all()
    assert spots.X.dtype == np.float32 and (spots.layers[keys.MEASURED] == 1).all()
    np.testing.assert_allclose(spots.obsm[keys.SPATIAL][: raws[0].n_obs], raws[0].obsm[keys.SPATIAL])


def test_patch_is_the_spot_centred_field(site0):
    """Patch i equals the slide read at spot i (the 112 um field, resized), so rows and spots line up."""
    from shared.ingest import open_slide

    toml, store = site0
    xy = store.spots.obsm[keys.SPATIAL]
    with open_slide(toml.parent / "S0A.tif") as slide:
        for i in (0, 17, 101):
            np.testing.assert_array_equal(store.patches[i], slide.read_patch(xy[i, 0], xy[i, 1], 112.0, 32))


def test_tiles_cover_tissue_not_glass(site0):
    _, store = site0
    table = store.tile_table
    assert 0 < store.n_tiles <= 80 and list(table.columns) == [keys.SECTION, "x", "y"]
    assert set(table[keys.SECTION]) == {"S0A", "S0B"}
    assert (table.groupby(keys.SECTION).size() <= 40).all()
    tile_saturation = saturation(np.asarray(store.tiles)).mean(axis=(1, 2))
    assert (tile_saturation > 0.15).all()  # glass is < 0.05


def test_rerun_is_a_no_op_until_inputs_or_params_change(site0):
    toml, store = site0
    before = _manifest_mtime(store.path)
    again = prepare_store(toml, store.path, patch_px=32, max_tiles_per_section=40, progress=False)
    assert _manifest_mtime(again.path) == before
    # a touched input (new mtime) makes the work happen again
    h5ad = toml.parent / "S0B.h5ad"
    stat = h5ad.stat()
    os.utime(h5ad, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    rebuilt = prepare_store(toml, store.path, patch_px=32, max_tiles_per_section=40, progress=False)
    assert _manifest_mtime(rebuilt.path) != before
    fingerprint = rebuilt.manifest["input_fingerprint"]
    other = prepare_store(toml, store.path, patch_px=32, max_tiles_per_section=10, progress=False)
    assert other.manifest["input_fingerprint"] != fingerprint and other.n_tiles <= 20


def test_interrupted_prepare_leaves_no_store_and_no_temp_dir(site0, tmp_path, monkeypatch):
    from shared.ingest.slide import Slide

    toml, good = site0
    original, calls = Slide.read_patch, {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 25:
            raise RuntimeError("disk unplugged")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Slide, "read_patch", failing)
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="disk unplugged"):
        prepare_store(toml, out, patch_px=32, max_tiles_per_section=5, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # over an existing store, a failed rebuild keeps the old one intact
    calls["n"] = 0
    before = _manifest_mtime(good.path)
    with pytest.raises(RuntimeError):
        prepare_store(toml, good.path, patch_px=48, max_tiles_per_section=5, progress=False)
    PatchStore(good.path).verify()
    assert _manifest_mtime(good.path) == before
    assert not [p for p in good.path.parent.iterdir() if p.name.startswith(".store")]


def test_panel_genes_the_source_lacks_are_masked(site0, tmp_path):
    toml, _ = site0
    store = prepare_store(
        toml,
        tmp_path / "store",
        panel=["epcam", "NOT_A_GENE", "ptprc"],
        patch_px=16,
        max_tiles_per_section=0,
        progress=False,
    )
    assert store.panel == ["epcam", "NOT_A_GENE", "ptprc"]
    measured = store.spots.layers[keys.MEASURED]
    assert (measured[:, [0, 2]] == 1).all() and (measured[:, 1] == 0).all()
    assert (store.spots.layers[keys.COUNTS][:, 1] == 0).all() and store.n_tiles == 0


def test_no_panel_falls_back_to_site_hvgs_with_a_warning(site0, tmp_path, caplog):
    toml, _ = site0
    text = toml.read_text().replace('panel = "../panel.txt"\n', "")
    bare = toml.parent / "bare.toml"
    bare.write_text(text)
    with caplog.at_level(logging.WARNING):
        store = prepare_store(bare, tmp_path / "store", patch_px=16, max_tiles_per_section=0, progress=False)
    assert "names no panel" in caplog.text and "share a panel" in caplog.text
    assert store.manifest["params"]["panel_source"].startswith("hvg:")
    assert 0 < len(store.panel) <= 64 and not any(g.startswith(("MT-", "RPL", "RPS")) for g in store.panel)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"patch_px": 8}, "patch_px must be an integer in 16..512"),
        ({"field_um": -1.0}, "field_um must be"),
        ({"tile_px": 48}, "keeps tiles at the patch size"),
        ({"panel": ["NOPE1", "NOPE2"]}, "section S0A: no gene overlap with the panel"),
    ],
)
def test_bad_requests_write_nothing(site0, tmp_path, kwargs, message):
    toml, _ = site0
    with pytest.raises(FedstError, match=message):
        prepare_store(toml, tmp_path / "store", progress=False, **{"patch_px": 32, **kwargs})
    assert not (tmp_path / "store").exists() and list(tmp_path.iterdir()) == []


def test_tissue_mask_and_grid_on_a_drawn_slide():
    image = np.full((200, 300, 3), 242, dtype=np.uint8)
    image[50:150, 100:250] = (200, 120, 190)  # a pink block on glass
    mask = tissue_mask(image)
    assert mask[60:140, 110:240].all() and not mask[:40].any() and not mask[:, :90].any()
    assert 0.1 <= otsu_threshold(np.r_[np.full(50, 0.1), np.full(80, 0.6)]) < 0.6
    # level-0 slide 4x the thumbnail; 40 px tiles on it -> 10 px on the mask
    centres = tile_grid(mask, scale=0.25, tile_px=40, width=1200, height=800)
    assert len(centres) == 10 * 15
    assert centres[:, 0].min() >= 400 and centres[:, 0].max() <= 1000
    capped = tile_grid(mask, scale=0.25, tile_px=40, width=1200, height=800, max_tiles=7)
    assert len(capped) == 7 and set(map(tuple, capped)) <= set(map(tuple, centres))


def _her2st_toml(tmp_path: Path) -> Path:
    data = shared_path("her2st")
    toml = tmp_path / "her2st.toml"
    toml.write_text(
        'site = "her2st-C"\n[[sections]]\nid = "C2"\nformat = "legacy-st"\n'
        f'counts = "{data / "counts" / "C2.tsv.gz"}"\nspots = "{data / "spots" / "C2_selection.tsv"}"\n'
        f'image = "{data / "images" / "C2.jpg"}"\n'
    )
    return toml


def test_her2st_c2_store_with_the_histogene_panel(tmp_path):
    import pandas as pd

    data = shared_path("her2st")
    toml = _her2st_toml(tmp_path)
    panel_file = data / "histogene_genes.npy"
    store = prepare_store(
        toml,
        tmp_path / "store",
        panel=panel_file,
        max_tiles_per_section=30,
        progress=False,
        cache_dir=tmp_path / "cache",
    )
    assert store.n_spots == 187 and store.patches.shape == (187, 64, 64, 3)
    assert len(store.panel) == 785 and store.panel == [str(g) for g in np.load(panel_file)]
    assert store.n_tiles == 30
    assert (saturation(np.asarray(store.tiles)).mean(axis=(1, 2)) > 0.1).all()
    assert 0.6 < store.manifest["params"]["mpp"]["C2"] < 0.8
    # expression against the raw table: counts on the panel, library size from all ~15k genes
    raw = pd.read_csv(data / "counts" / "C2.tsv.gz", sep="\t", index_col=0)
    spots = store.spots
    ids = [name.split(":", 1)[1] for name in spots.obs_names]
    library = raw.loc[ids].sum(axis=1).to_numpy()
    np.testing.assert_allclose(spots.obs["library_size"], library)
    present = [g for g in store.panel if g in raw.columns]
    measured = spots.layers[keys.MEASURED][0].astype(bool)
    assert measured.sum() == len(present) > 700
    columns = [store.panel.index(g) for g in present]
    np.testing.assert_array_equal(spots.layers[keys.COUNTS][:, columns], raw.loc[ids, present].to_numpy())
    np.testing.assert_allclose(
        np.expm1(spots.X).sum(axis=1),
        raw.loc[ids, present].sum(axis=1).to_numpy() / library * keys.TARGET_SUM,
        rtol=1e-4,
    )
    assert is_store(store.path)
