"""Bad input: each case is one FedstError naming the file/field and what was expected, and nothing is written
(the slide cache stays empty). Bad inputs are derived in tmp_path from a generated section (shared.synthetic:
HEST-style h5ad + pyramidal TIFF), rewritten into the other formats, so these run without ../shared/data."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from shared.errors import FedstError
from shared.ingest import load_h5ad_section, load_legacy_st_section, load_site, load_visium_section, open_slide
from shared.ingest.validate import check_gene_overlap
from tests.helpers import REPO, legacy_st_tables, write_plain_jpeg, write_visium_outs

MPP = 1.0  # the generated consortium's


@dataclass(frozen=True)
class Generated:
    """One generated section and the files derived from it (all read-only for the tests)."""

    adata: object
    h5ad: Path
    tiff: Path
    jpeg: Path  # a plain JPEG of the section's image carrying no resolution
    visium: Path  # the section as a Space Ranger outs/ folder
    width: int
    height: int


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    import anndata
    import tifffile

    from shared.synthetic import generate_consortium

    root = generate_consortium(tmp_path_factory.mktemp("generated"), n_sites=1, sections_per_site=1, grid=(8, 8))
    h5ad, tiff = root / "site-0" / "S0A.h5ad", root / "site-0" / "S0A.tif"
    adata = anndata.read_h5ad(h5ad)
    rgb = tifffile.imread(tiff)
    jpeg = write_plain_jpeg(rgb, root / "S0A.jpg")
    visium = write_visium_outs(adata, rgb, root / "visium" / "outs", MPP)
    return Generated(adata, h5ad, tiff, jpeg, visium, width=rgb.shape[1], height=rgb.shape[0])


@pytest.fixture(scope="module")
def st_tables(generated: Generated):
    """The generated section as legacy-ST counts and spot tables (DataFrames)."""
    return legacy_st_tables(generated.adata)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


def _legacy(tmp_path: Path, counts, spots, cache: Path, image: Path, mpp: float | None = MPP):
    counts.to_csv(tmp_path / "c.tsv", sep="\t")
    spots.to_csv(tmp_path / "s.tsv", sep="\t", index=False)
    return load_legacy_st_section(tmp_path / "c.tsv", tmp_path / "s.tsv", image, mpp=mpp, cache_dir=cache)


def _nothing_written(cache: Path) -> None:
    assert list(cache.iterdir()) == []


def test_missing_files(tmp_path: Path, cache: Path, st_tables, generated: Generated):
    counts, spots = st_tables
    with pytest.raises(FedstError, match=r"nope\.jpg: no such file \(expected an image"):
        _legacy(tmp_path, counts, spots, cache, image=tmp_path / "nope.jpg")
    with pytest.raises(FedstError, match=r"missing\.tsv\.gz: no such file \(expected a legacy-ST counts"):
        load_legacy_st_section(tmp_path / "missing.tsv.gz", tmp_path / "s.tsv", tmp_path / "i.jpg", cache_dir=cache)
    with pytest.raises(FedstError, match=r"SITE\.toml: no such file"):
        load_site(tmp_path / "SITE.toml", cache_dir=cache)
    folder = tmp_path / "outs"
    shutil.copytree(generated.visium / "spatial", folder / "spatial")
    with pytest.raises(FedstError, match=r"filtered_feature_bc_matrix\.h5: no such file"):
        load_visium_section(folder, cache_dir=cache)
    _nothing_written(cache)


def test_truncated_jpeg_is_reported_and_nothing_cached(tmp_path: Path, cache: Path, st_tables, generated: Generated):
    counts, spots = st_tables
    broken = tmp_path / "S0A.jpg"
    data = generated.jpeg.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(FedstError, match=r"S0A\.jpg: unreadable or corrupt image \(truncated JPEG"):
        _legacy(tmp_path, counts, spots, cache, image=broken)
    _nothing_written(cache)


def test_not_an_image(tmp_path: Path, cache: Path):
    fake = tmp_path / "slide.svs"
    fake.write_bytes(b"this is not a slide" * 100)
    with pytest.raises(FedstError, match=r"slide\.svs: unreadable or corrupt slide \(openslide does not recognise"):
        open_slide(fake, mpp=0.5, cache_dir=cache)
    fake = tmp_path / "photo.jpg"
    fake.write_bytes(b"this is not a photo" * 100)
    with pytest.raises(FedstError, match=r"photo\.jpg: not an image PIL or openslide can read"):
        open_slide(fake, mpp=0.5, cache_dir=cache)
    _nothing_written(cache)


def test_truncated_pyramidal_tiff(tmp_path: Path, cache: Path, generated: Generated):
    broken = tmp_path / "cut.tif"
    data = generated.tiff.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(FedstError, match=r"cut\.tif: unreadable or corrupt image \("):  # PIL's decoder error
        open_slide(broken, cache_dir=cache)
    _nothing_written(cache)


def test_image_without_mpp(tmp_path: Path, cache: Path, generated: Generated):
    import tifffile

    with pytest.raises(FedstError, match=r"S0A\.jpg: image carries no microns-per-pixel; give it with --mpp"):
        load_h5ad_section(generated.h5ad, generated.jpeg, cache_dir=cache)
    bare = tmp_path / "bare.tif"  # a tiled TIFF openslide reads, with no resolution tags
    tifffile.imwrite(bare, tifffile.imread(generated.tiff), tile=(256, 256), photometric="rgb", compression="jpeg")
    with pytest.raises(FedstError, match=r"bare\.tif: image carries no microns-per-pixel \(no openslide\.mpp-x"):
        open_slide(bare, cache_dir=cache)
    with pytest.raises(FedstError, match=r"mpp -3 is not a plausible"):
        open_slide(bare, mpp=-3, cache_dir=cache)
    _nothing_written(cache)


def test_spot_coordinates_outside_image(tmp_path: Path, cache: Path, st_tables, generated: Generated):
    counts, spots = st_tables
    moved = spots.copy()
    moved.loc[5, "pixel_x"] += 20000
    size = rf"S0A\.jpg \({generated.width} x {generated.height} px\)"
    with pytest.raises(FedstError, match=r"1 spot coordinate\(s\) lie outside the image .*" + size):
        _legacy(tmp_path, counts, moved, cache, image=generated.jpeg)
    _nothing_written(cache)


def test_duplicate_spot_ids(tmp_path: Path, cache: Path, st_tables, generated: Generated):
    import pandas as pd

    counts, spots = st_tables
    first = counts.index[0]
    with pytest.raises(FedstError, match=rf"c\.tsv: duplicate spot ids in the first column \(spot id\): '{first}'"):
        _legacy(tmp_path, pd.concat([counts, counts.iloc[:1]]), spots, cache, image=generated.jpeg)
    with pytest.raises(FedstError, match=r"s\.tsv: duplicate spot ids in columns x, y"):
        _legacy(tmp_path, counts, pd.concat([spots, spots.iloc[:1]]), cache, image=generated.jpeg)
    folder = tmp_path / "outs"
    shutil.copytree(generated.visium, folder)
    positions = folder / "spatial" / "tissue_positions_list.csv"
    lines = positions.read_text().splitlines()
    positions.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(FedstError, match=r"tissue_positions_list\.csv: duplicate spot ids in column barcode"):
        load_visium_section(folder, cache_dir=cache)
    _nothing_written(cache)


def test_duplicate_obs_names_in_h5ad(tmp_path: Path, cache: Path, generated: Generated):
    adata = generated.adata.copy()
    names = list(adata.obs_names)
    names[1] = names[0]
    adata.obs_names = names
    adata.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.raises(FedstError, match=r"dup\.h5ad: duplicate spot ids in obs_names"):
        load_h5ad_section(tmp_path / "dup.h5ad", generated.jpeg, mpp=MPP, cache_dir=cache)
    _nothing_written(cache)


def test_negative_and_nan_counts(tmp_path: Path, cache: Path, st_tables, generated: Generated):
    counts, spots = st_tables
    negative = counts.copy()
    negative.iloc[3, 7] = -2
    with pytest.raises(FedstError, match=r"c\.tsv: counts contain 1 negative value\(s\), min -2"):
        _legacy(tmp_path, negative, spots, cache, image=generated.jpeg)
    adata = generated.adata.copy()
    adata.X = np.asarray(adata.X, dtype=np.float32)
    adata.X[0, 0] = np.nan
    adata.write_h5ad(tmp_path / "nan.h5ad")
    with pytest.raises(FedstError, match=r"nan\.h5ad: counts contain 1 NaN/infinite value"):
        load_h5ad_section(tmp_path / "nan.h5ad", generated.jpeg, mpp=MPP, cache_dir=cache)
    _nothing_written(cache)


def test_counts_and_spots_share_no_ids(tmp_path: Path, cache: Path, st_tables, generated: Generated):
    counts, spots = st_tables
    shifted = spots.copy()
    shifted["x"] += 100
    first_shifted = f"{shifted['x'].iloc[0]}x{shifted['y'].iloc[0]}"
    with pytest.raises(
        FedstError, match=rf"c\.tsv and .*s\.tsv share no spot ids .*'{counts.index[0]}'.*'{first_shifted}'"
    ):
        _legacy(tmp_path, counts, shifted, cache, image=generated.jpeg)
    _nothing_written(cache)


def test_gene_panel_overlap():
    names, ids = ["ERBB2", "Gapdh", "ACTB"], ["ENSG00000141736", "ENSG00000111640", "ENSG00000075624"]
    assert check_gene_overlap(names, ["gapdh", "ENSG00000075624", "XIST"], "s.h5ad", gene_ids=ids) == [1, 2, -1]
    with pytest.raises(FedstError, match=r"s\.h5ad: no gene overlaps the panel \(2 genes, e\.g\. 'FOO', 'BAR'"):
        check_gene_overlap(names, ["FOO", "BAR"], "s.h5ad", gene_ids=ids)


def test_missing_spatial_and_corrupt_h5ad(tmp_path: Path, cache: Path, generated: Generated):
    adata = generated.adata.copy()
    del adata.obsm["spatial"]
    adata.write_h5ad(tmp_path / "flat.h5ad")
    found = re.escape("found obsm keys ['synthetic_type_mixture']")  # the generator's ground truth is left
    with pytest.raises(FedstError, match=r"flat\.h5ad: no obsm\['spatial'\] .*" + found):
        load_h5ad_section(tmp_path / "flat.h5ad", generated.jpeg, mpp=MPP, cache_dir=cache)
    (tmp_path / "bad.h5ad").write_bytes(b"\x89HDF\r\n" + b"0" * 100)
    with pytest.raises(FedstError, match=r"bad\.h5ad: unreadable or corrupt \.h5ad"):
        load_h5ad_section(tmp_path / "bad.h5ad", generated.jpeg, mpp=MPP, cache_dir=cache)
    bad_h5 = tmp_path / "outs"
    shutil.copytree(generated.visium, bad_h5)
    (bad_h5 / "filtered_feature_bc_matrix.h5").write_bytes(b"garbage")
    with pytest.raises(FedstError, match=r"filtered_feature_bc_matrix\.h5: unreadable 10x feature-barcode matrix"):
        load_visium_section(bad_h5, cache_dir=cache)
    _nothing_written(cache)


@pytest.mark.parametrize(
    "body, message",
    [
        ("site = 'a'\n[[sections]]\nid = 'x'\nformat = 'xenium'\n", r"sections\[0\]: field 'format' is 'xenium'"),
        ("[[sections]]\nid = 'x'\nformat = 'hest'\nh5ad = 'a.h5ad'\n", r"format 'hest' needs field 'image'"),
        ("[[sections]]\nformat = 'hest'\nh5ad = 'a'\nimage = 'b'\nmmp = 0.5\n", r"unknown field\(s\) mmp"),
        ("[[sections]]\nformat = 'hest'\nh5ad = 'a'\nimage = 'b'\nmpp = 'big'\n", r"mpp 'big' is not a number"),
        ("site = 'a'\n", r"no \[\[sections\]\]"),
        ("site = \n", r"not valid TOML"),
        ("panel = 'none.txt'\n[[sections]]\nformat = 'hest'\nh5ad = 'a'\nimage = 'b'\n", r"field 'panel' names"),
        (
            "[[sections]]\nid='a'\nformat='hest'\nh5ad='a'\nimage='b'\n[[sections]]\nid='a'\nformat='hest'\nh5ad='c'\nimage='d'\n",
            r"duplicate section id\(s\) a",
        ),
    ],
)
def test_site_toml_errors(tmp_path: Path, body: str, message: str):
    toml = tmp_path / "SITE.toml"
    toml.write_text(body)
    with pytest.raises(FedstError, match=r"SITE\.toml.*" + message):
        load_site(toml)


def _cli(*args: str, env_cache: Path) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "FEDST_CACHE": str(env_cache)}
    return subprocess.run(
        [sys.executable, "-m", "shared.cli.main", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_bad_input_is_one_error_line(tmp_path: Path, generated: Generated):
    toml = tmp_path / "SITE.toml"
    toml.write_text(f"[[sections]]\nformat = 'h5ad'\nh5ad = '{generated.h5ad}'\nimage = '{generated.jpeg}'\n")
    for args, message in [
        (("data", "inspect", str(tmp_path / "absent.svs")), f"{tmp_path / 'absent.svs'}: no such file"),
        (("data", "inspect", str(toml)), f"{generated.jpeg}: image carries no microns-per-pixel"),
    ]:
        result = _cli(*args, env_cache=tmp_path / "cache")
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "cache").exists()
