"""Readers on the real files in ../shared/data: Visium (both position formats, hires and full-res image),
legacy ST (her2st C2), HEST-style h5ad + pyramidal TIFF, generic h5ad + JPEG, and SITE.toml."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shared import keys
from shared.ingest import (
    load_h5ad_section,
    load_hest_section,
    load_legacy_st_section,
    load_site,
    load_visium_section,
)
from tests.helpers import shared_path

SPOT_UM = 55.0


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "slides"  # shared with test_ingest_slide: C2 converted once


@pytest.fixture(scope="module")
def c2(cache: Path):
    her2st = shared_path("her2st")
    return load_legacy_st_section(
        her2st / "counts" / "C2.tsv.gz",
        her2st / "spots" / "C2_selection.tsv",
        her2st / "images" / "C2.jpg",
        mpp=0.7,
        cache_dir=cache,
    )


def _positions(folder: Path) -> dict[str, list[str]]:
    with open(folder / "spatial" / "tissue_positions_list.csv") as handle:
        return {row[0]: row for row in csv.reader(handle)}


def test_visium_hires_fallback(cache: Path):
    folder = shared_path("visium", "squidpy_tests_data")
    section = load_visium_section(folder, cache_dir=cache)
    adata = section.adata
    factors = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    positions = _positions(folder)
    in_tissue = [b for b, row in positions.items() if row[1] == "1"]
    assert adata.shape == (100, 100) and len(in_tissue) == 100
    assert list(adata.var[keys.GENE_IDS][:2]) == ["ENSG00000243485", "ENSG00000237613"]
    # coordinates: full-res (pxl_col = x, pxl_row = y) times the hires scale factor
    barcode = adata.obs_names[0]
    row = positions[barcode]
    expected = np.array([float(row[5]), float(row[4])]) * factors["tissue_hires_scalef"]
    np.testing.assert_allclose(adata.obsm[keys.SPATIAL][0], expected)
    # mpp from the 55 um spot diameter, then per hires pixel
    assert section.mpp == pytest.approx(SPOT_UM / factors["spot_diameter_fullres"] / factors["tissue_hires_scalef"])
    assert adata.uns[keys.MPP] == section.mpp and adata.uns[keys.PROVENANCE]["format"] == "visium"
    with section.open_slide() as slide:
        assert (slide.width, slide.height) == (2000, 2000)
        xy = adata.obsm[keys.SPATIAL]
        assert ((xy >= 0) & (xy < 2000)).all()
    # raw integer counts, exactly those stored in the h5 (all 100 barcodes are in tissue)
    import h5py

    with h5py.File(folder / "filtered_feature_bc_matrix.h5") as handle:
        total = float(handle["matrix/data"][:].sum())
    assert np.array_equal(adata.X.data, np.round(adata.X.data)) and float(adata.X.sum()) == pytest.approx(total)


def test_visium_keeps_only_in_tissue_spots_with_counts(cache: Path):
    folder = shared_path("visium", "scanpy_visium_1.0.0")
    positions = _positions(folder)
    assert len(positions) == 4992 and sum(row[1] == "1" for row in positions.values()) == 4235
    section = load_visium_section(folder, cache_dir=cache)
    assert section.adata.n_obs == 100  # the h5 holds 100 barcodes, all in tissue
    assert section.adata.uns[keys.PROVENANCE]["in_tissue_without_counts"] == 4135
    assert set(section.adata.obs_names) <= {b for b, row in positions.items() if row[1] == "1"}


def test_visium_spaceranger2_positions_with_header(tmp_path: Path, cache: Path):
    source = shared_path("visium", "squidpy_tests_data")
    folder = tmp_path / "outs"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("tissue_positions_list.csv", "test_*"))
    rows = list(_positions(source).values())
    with open(folder / "spatial" / "tissue_positions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"])
        writer.writerows(rows[::-1])  # order must not matter: joined on barcode
    new = load_visium_section(folder, cache_dir=cache)
    old = load_visium_section(source, cache_dir=cache)
    assert new.section_id == folder.parent.name  # "outs" is named after its parent
    assert list(new.adata.obs_names) == list(old.adata.obs_names)
    np.testing.assert_allclose(new.adata.obsm[keys.SPATIAL], old.adata.obsm[keys.SPATIAL])


def test_visium_full_resolution_image(tmp_path: Path, cache: Path):
    """Give the hires PNG as the 'full-res' image of a layout rescaled to it: same spots, same mpp."""
    source = shared_path("visium", "squidpy_tests_data")
    folder = tmp_path / "sample"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("test_*"))
    factors = json.loads((source / "spatial" / "scalefactors_json.json").read_text())
    scale = factors["tissue_hires_scalef"]
    rows = list(_positions(source).values())
    with open(folder / "spatial" / "tissue_positions_list.csv", "w", newline="") as handle:
        csv.writer(handle).writerows(r[:4] + [float(r[4]) * scale, float(r[5]) * scale] for r in rows)
    factors.update(spot_diameter_fullres=factors["spot_diameter_fullres"] * scale, tissue_hires_scalef=1.0)
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(factors))
    full = load_visium_section(folder, image=source / "spatial" / "tissue_hires_image.png", cache_dir=cache)
    hires = load_visium_section(source, cache_dir=cache)
    np.testing.assert_allclose(full.adata.obsm[keys.SPATIAL], hires.adata.obsm[keys.SPATIAL])
    assert full.mpp == pytest.approx(hires.mpp)
    assert full.adata.uns[keys.PROVENANCE]["image_scale"] == 1.0
    assert full.adata.uns[keys.PROVENANCE]["mpp_source"].startswith("Visium spot 55 um")


def test_her2st_c2(c2):
    adata = c2.adata
    assert c2.section_id == "C2"
    assert adata.n_obs == 187  # spots in both the counts and the selection table
    assert adata.n_vars == 15706
    assert "25x13" in adata.obs_names
    np.testing.assert_allclose(adata[["25x13"]].obsm[keys.SPATIAL][0], [6930.58, 3510.24])
    assert adata.uns[keys.PROVENANCE]["spots_without_counts"] == 0
    assert adata.uns[keys.PROVENANCE]["mpp_source"] == "given"
    assert c2.mpp == 0.7 and adata.uns[keys.MPP] == 0.7
    assert float(adata.X.sum()) > 1e5 and np.array_equal(adata.X.data, np.round(adata.X.data))
    with c2.open_slide() as slide:
        assert slide.vendor == "generic-tiff" and (slide.width, slide.height) == (9274, 9911)
        patch = slide.read_patch(6930.58, 3510.24, field_um=112.0, out_px=64)
    assert patch.shape == (64, 64, 3) and patch.std() > 10  # tissue under a real spot


def test_her2st_mpp_derived_from_array_pitch():
    """Without a given mpp the 200 um ST pitch sets it: her2st C2 is documented at ~0.69-0.74 um/px."""
    import pandas as pd

    from shared.ingest.legacy_st import derive_mpp
    from shared.ingest.slide import resolve_mpp

    spots = pd.read_csv(shared_path("her2st", "spots", "C2_selection.tsv"), sep="\t")
    derived = derive_mpp(spots)
    assert derived is not None and 0.66 < derived < 0.74
    image, mpp, origin = resolve_mpp(shared_path("her2st", "images", "C2.jpg"), None, derived, "ST pitch")
    assert (mpp, origin) == (derived, "ST pitch")  # the JPEG's 72 dpi is not taken for a scan resolution
    assert resolve_mpp(image, 0.7, derived, "ST pitch")[1:] == (0.7, "given")


def test_her2st_demo_sites_use_the_fitted_mpp(tmp_path: Path):
    """One mpp per her2st image (issue 14): the demo's sites, like `fedst experiment her2st`, the benchmarks and a
    SITE.toml without `mpp`, use each section's ST-pitch fit, so inspect reports what prepare converts with and
    the slide cache holds one TIFF per image (a forced 0.72 converted each JPEG a second time)."""
    import pandas as pd

    from server.demo import her2st_consortium
    from shared.ingest.legacy_st import derive_mpp

    data = shared_path("her2st")
    site = load_site(her2st_consortium(data, tmp_path / "c", 2) / "site-0" / "site.toml", convert=False)
    for section in site.sections:
        spots = pd.read_csv(data / "spots" / f"{section.section_id}_selection.tsv", sep="\t")
        assert section.mpp == derive_mpp(spots) and 0.687 < section.mpp < 0.689
        assert section.adata.uns[keys.PROVENANCE]["mpp_source"] == "ST array pitch 200 um"


def _write_hest(c2, folder: Path, mpp_in_tiff: bool = True) -> tuple[Path, Path]:
    """A HEST-1k style pair from real C2 data: h5ad (raw counts, obsm spatial) + pyramidal TIFF."""
    folder.mkdir(parents=True, exist_ok=True)
    h5ad = folder / "C2.h5ad"
    adata = c2.adata.copy()
    del adata.uns[keys.PROVENANCE]
    adata.write_h5ad(h5ad)
    return h5ad, c2.slide_path


def test_hest_section_reads_mpp_from_pyramidal_tiff(c2, tmp_path: Path, cache: Path):
    h5ad, tiff = _write_hest(c2, tmp_path)
    section = load_hest_section(h5ad, tiff, cache_dir=cache)
    assert section.mpp == pytest.approx(0.7)
    assert section.adata.uns[keys.PROVENANCE]["mpp_source"] == "image metadata"
    assert section.slide_path == tiff  # already pyramidal: used in place
    assert section.adata.shape == (187, 15706)
    assert (section.adata.X != c2.adata.X).nnz == 0
    np.testing.assert_allclose(section.adata.obsm[keys.SPATIAL], c2.adata.obsm[keys.SPATIAL])


def test_h5ad_counts_layer_is_preferred_over_normalised_x(c2, tmp_path: Path, cache: Path):
    import scipy.sparse as sp

    adata = c2.adata.copy()
    del adata.uns[keys.PROVENANCE]
    adata.layers[keys.COUNTS] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    adata.write_h5ad(tmp_path / "n.h5ad")
    section = load_h5ad_section(tmp_path / "n.h5ad", c2.slide_path, cache_dir=cache)
    assert (section.adata.X != c2.adata.X).nnz == 0
    assert section.adata.uns[keys.PROVENANCE]["counts"] == "layers['counts']"


def test_generic_h5ad_with_plain_jpeg_and_given_mpp(cache: Path):
    folder = shared_path("visium", "squidpy_tests_data")
    section = load_h5ad_section(folder / "test_data.h5ad", folder / "test_img.jpg", mpp=1.0, cache_dir=cache)
    assert section.adata.shape == (49, 1999) and section.section_id == "test_data"
    assert section.mpp == 1.0 and keys.GENE_IDS in section.adata.var
    with section.open_slide() as slide:
        assert (slide.width, slide.height) == (950, 1717) and slide.vendor == "generic-tiff"


def test_load_site_mixes_formats(c2, tmp_path: Path, cache: Path):
    h5ad, tiff = _write_hest(c2, tmp_path / "hest")
    her2st = shared_path("her2st")
    visium = shared_path("visium", "squidpy_tests_data")
    (tmp_path / "panel.txt").write_text("ERBB2\nGAPDH\n")
    toml = tmp_path / "site" / "SITE.toml"
    toml.parent.mkdir()
    toml.write_text(
        f"""
site = "hospital-a"
panel = "../panel.txt"

[[sections]]
id = "C2-st"
format = "legacy-st"
counts = "{her2st / "counts" / "C2.tsv.gz"}"
spots = "{her2st / "spots" / "C2_selection.tsv"}"
image = "{her2st / "images" / "C2.jpg"}"
mpp = 0.7

[[sections]]
id = "C2-hest"
format = "hest"
h5ad = "../hest/C2.h5ad"
image = "{tiff}"

[[sections]]
id = "V1"
format = "visium"
path = "{visium}"
"""
    )
    site = load_site(toml, mpp=None, cache_dir=cache)
    assert site.name == "hospital-a" and site.panel_path == tmp_path / "site" / ".." / "panel.txt"
    assert [s.section_id for s in site.sections] == ["C2-st", "C2-hest", "V1"]
    assert [s.adata.n_obs for s in site.sections] == [187, 187, 100]
    assert [s.format for s in site.sections] == ["legacy-st", "hest", "visium"]
    assert all((s.adata.obs[keys.SECTION] == s.section_id).all() for s in site.sections)
    info = site.describe()
    assert info["kind"] == "site" and info["sections"][2]["width"] == 2000
    # --mpp fills in only where the TOML gives none and the image carries none (it beats the derived value)
    site2 = load_site(toml, mpp=0.5, cache_dir=cache)
    assert [s.mpp for s in site2.sections][:2] == [0.7, 0.7]  # TOML field; the TIFF's own mpp
    assert site2.sections[2].mpp == pytest.approx(0.5 / 0.150015)  # Visium: full-res mpp, per hires pixel
    assert site2.sections[2].adata.uns[keys.PROVENANCE]["mpp_source"] == "given"
