"""uns['spatial'] on predictions: the tissue image under the spots, in the layout scanpy/squidpy read."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import anndata
import numpy as np
import pytest

from shared import keys
from shared.downstream.predictor import prediction_adata, train_predictor
from shared.downstream.spatial_images import FIDUCIAL_PER_SPOT, section_spatial, spot_diameter_um
from shared.ingest.slide import write_pyramidal_tiff
from shared.store.prepare import prepare_store
from tests.helpers import shared_path, write_plain_jpeg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH, HEIGHT, MPP, PITCH_PX = 3000, 2400, 0.5, 200  # pitch 200 px = 100 um: Visium-like, 55 um spots
RED, BLUE = 7, 30  # spot rows marked by a drawn red / blue disk
GENES = [f"G{i}" for i in range(5)]


def _site(tmp_path: Path, kind: str) -> Path:
    """A generated section: a grid of spots (x != y everywhere) on a W != H image with two coloured disks
    drawn at known spots, as a pyramidal TIFF (``tif``) or a plain JPEG (``jpg``), listed by a SITE.toml."""
    xs, ys = np.meshgrid(np.arange(300, 2800, PITCH_PX), np.arange(400, 2100, PITCH_PX))
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.float64)
    rgb = np.full((HEIGHT, WIDTH, 3), 235, np.uint8)
    rr, cc = np.mgrid[:HEIGHT, :WIDTH]
    for row, colour in ((RED, (220, 20, 20)), (BLUE, (20, 20, 220))):
        x, y = coords[row]
        rgb[(cc - x) ** 2 + (rr - y) ** 2 <= 40**2] = colour
    rng = np.random.default_rng(0)
    adata = anndata.AnnData(X=rng.poisson(5.0, (len(coords), len(GENES))).astype(np.float32))
    adata.var_names = GENES
    adata.obs_names = [f"s{i}" for i in range(len(coords))]
    adata.obsm["spatial"] = coords
    adata.write_h5ad(tmp_path / "S1.h5ad")
    if kind == "tif":
        image = write_pyramidal_tiff(tmp_path / "S1.tif", rgb, MPP)
    else:
        image = write_plain_jpeg(rgb, tmp_path / "S1.jpg")
    toml = tmp_path / "site.toml"
    toml.write_text(
        f'site = "gen"\n[[sections]]\nid = "S1"\nformat = "h5ad"\nh5ad = "S1.h5ad"\nimage = "{image.name}"\n'
        f"mpp = {MPP}\n"
    )
    return toml


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """(store, predictor) of the generated TIFF section."""
    tmp = tmp_path_factory.mktemp("spatial")
    store = prepare_store(
        _site(tmp, "tif"), tmp / "store", patch_px=16, max_tiles_per_section=0, progress=False, cache_dir=tmp / "c"
    )
    return store, train_predictor([store], "ridge", "stats", progress=False)


def _centroid(image: np.ndarray, channel: int) -> np.ndarray:
    """(x, y) centroid of the pixels where ``channel`` dominates the other two (the drawn disk)."""
    img = image.astype(int)
    others = [c for c in range(3) if c != channel]
    mask = (img[..., channel] > 150) & (img[..., others[0]] < 90) & (img[..., others[1]] < 90)
    assert mask.sum() > 20, "the drawn disk is visible in the image"
    rows, cols = np.nonzero(mask)
    return np.array([cols.mean(), rows.mean()])


def _check_entry(entry: dict, coords: np.ndarray) -> None:
    images, factors = entry["images"], entry["scalefactors"]
    hires_s, lowres_s = 2000 / WIDTH, 600 / WIDTH
    assert images["hires"].shape == (round(HEIGHT * hires_s), 2000, 3) and images["hires"].dtype == np.uint8
    assert images["lowres"].shape == (round(HEIGHT * lowres_s), 600, 3) and images["lowres"].dtype == np.uint8
    assert factors["tissue_hires_scalef"] == pytest.approx(hires_s)
    assert factors["tissue_lowres_scalef"] == pytest.approx(lowres_s)
    assert factors["spot_diameter_fullres"] == pytest.approx(55.0 / MPP)  # 100 um pitch -> Visium's 55 um
    assert factors["fiducial_diameter_fullres"] == pytest.approx(55.0 / MPP * FIDUCIAL_PER_SPOT)
    # known answer: the full-res spot centre times the scale factor is the centre of the mark drawn there
    for row, channel in ((RED, 0), (BLUE, 2)):
        np.testing.assert_allclose(_centroid(images["hires"], channel), coords[row] * hires_s, atol=1.0)
        np.testing.assert_allclose(_centroid(images["lowres"], channel), coords[row] * lowres_s, atol=1.0)


def test_prediction_carries_the_slide_with_scalefactors_that_put_spots_on_their_marks(generated, tmp_path) -> None:
    store, predictor = generated
    adata = prediction_adata(predictor, store)
    entry = adata.uns["spatial"]["S1"]
    _check_entry(entry, adata.obsm[keys.SPATIAL])
    assert entry["metadata"]["fullres_width"] == WIDTH and entry["metadata"]["fullres_height"] == HEIGHT
    # the h5ad stays writable and reads back the same arrays
    adata.write_h5ad(tmp_path / "pred.h5ad")
    back = anndata.read_h5ad(tmp_path / "pred.h5ad").uns["spatial"]["S1"]
    np.testing.assert_array_equal(back["images"]["hires"], entry["images"]["hires"])
    assert back["scalefactors"] == pytest.approx(entry["scalefactors"])
    assert "spatial" not in prediction_adata(predictor, store, images=False).uns


def test_scanpy_draws_the_spots_on_the_hires_image(generated) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    store, predictor = generated
    adata = prediction_adata(predictor, store)
    with warnings.catch_warnings():  # scanpy >= 1.10 points at squidpy; the call itself is what users run
        warnings.simplefilter("ignore", FutureWarning)
        axes = sc.pl.spatial(adata, color="G0", library_id="S1", show=False)
    ax = axes[0]
    hires = adata.uns["spatial"]["S1"]["images"]["hires"]
    assert ax.images[0].get_extent() == [-0.5, hires.shape[1] - 0.5, hires.shape[0] - 0.5, -0.5]
    boxes = [path.get_extents() for path in ax.collections[0].get_paths()]  # one circle per spot
    centres = np.array([[(b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2] for b in boxes])
    scale = adata.uns["spatial"]["S1"]["scalefactors"]["tissue_hires_scalef"]
    np.testing.assert_allclose(np.sort(centres, 0), np.sort(adata.obsm[keys.SPATIAL] * scale, 0), atol=0.5)
    plt.close("all")


def test_a_plain_jpeg_is_read_when_the_converted_slide_is_gone_and_a_lost_slide_is_one_line(tmp_path, caplog):
    site = _site(tmp_path, "jpg")
    store = prepare_store(
        site, tmp_path / "store", patch_px=16, max_tiles_per_section=0, progress=False, cache_dir=tmp_path / "c"
    )
    predictor = train_predictor([store], "ridge", "stats", progress=False)
    shutil.rmtree(tmp_path / "c")  # the cached pyramid: the original JPEG the SITE.toml named is read instead
    adata = prediction_adata(predictor, store)
    entry = adata.uns["spatial"]["S1"]
    assert entry["metadata"]["source_image_path"] == str((tmp_path / "S1.jpg").resolve())
    _check_entry(entry, adata.obsm[keys.SPATIAL])
    (tmp_path / "S1.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="fedst.spatial"):
        adata = prediction_adata(predictor, store)
    assert "spatial" not in adata.uns
    lines = [r.getMessage() for r in caplog.records if r.name == "fedst.spatial"]
    assert len(lines) == 1 and lines[0].startswith("section S1: no tissue image") and "S1.jpg" in lines[0]


def test_cli_predict_reports_the_sections_with_images(generated, tmp_path) -> None:
    store, predictor = generated
    predictor.save_pretrained(tmp_path / "model")
    out = tmp_path / "pred.h5ad"
    cli = [sys.executable, "-m", "shared.cli.main", "predict", "--model", str(tmp_path / "model")]
    run = subprocess.run(
        [*cli, "--section", str(store.path), "--out", str(out), "--top", "1", "--no-progress"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "uns['spatial']: tissue images for 1 section(s): S1" in run.stdout
    assert anndata.read_h5ad(out).uns["spatial"]["S1"]["images"]["hires"].shape[1] == 2000


def test_spot_diameter_by_format_and_by_pitch() -> None:
    grid = np.stack(np.meshgrid(np.arange(5) * 290.0, np.arange(4) * 290.0), -1).reshape(-1, 2)
    assert spot_diameter_um("legacy-st", grid, 0.69)[0] == 100.0
    assert spot_diameter_um("visium", grid, 0.69)[0] == 55.0
    assert spot_diameter_um("hest", grid, 0.69)[0] == 100.0  # 290 px * 0.69 = 200 um: ST's grid
    assert spot_diameter_um("hest", grid, 0.345)[0] == pytest.approx(0.55 * 100.05)  # 100 um: Visium's


def test_a_bad_mpp_is_refused_naming_the_image(tmp_path) -> None:
    from shared.errors import FedstError

    image = write_plain_jpeg(np.full((64, 80, 3), 200, np.uint8), tmp_path / "x.jpg")
    with pytest.raises(FedstError, match="x.jpg: microns per pixel"):
        section_spatial(image, 0.0, 55.0)


@pytest.mark.needs_shared_data
def test_her2st_c2_prediction_plots_with_scanpy_on_the_tissue(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    data = shared_path("her2st")
    toml = tmp_path / "site.toml"
    toml.write_text(
        f'site = "her2st-C"\n[[sections]]\nid = "C2"\nformat = "legacy-st"\n'
        f'counts = "{data}/counts/C2.tsv.gz"\nspots = "{data}/spots/C2_selection.tsv"\nimage = "{data}/images/C2.jpg"\n'
    )
    panel = ["ERBB2", "GAPDH", "KRT19", "MGP"]
    store = prepare_store(
        toml, tmp_path / "store", panel=panel, patch_px=16, max_tiles_per_section=0, progress=False, cache_dir=tmp_path
    )
    adata = prediction_adata(train_predictor([store], "ridge", "stats", progress=False), store)
    entry = adata.uns["spatial"]["C2"]
    factors = entry["scalefactors"]
    assert factors["tissue_hires_scalef"] == pytest.approx(2000 / 9911)  # C2.jpg is 9274 x 9911 px
    assert 130 < factors["spot_diameter_fullres"] < 160  # 100 um at ~0.69 um/px
    # the tissue is under the spots: H&E at the spot centres is far darker than the slide's glass border
    hires = entry["images"]["hires"].astype(float).mean(-1)
    cols, rows = np.rint(adata.obsm[keys.SPATIAL] * factors["tissue_hires_scalef"]).astype(int).T
    glass = np.median(np.concatenate([hires[:40].ravel(), hires[-40:].ravel()]))
    assert np.median(hires[rows, cols]) < glass - 40
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        sc.pl.spatial(adata, color="ERBB2", library_id="C2", show=False)
    png = tmp_path / "C2_ERBB2.png"
    plt.gcf().savefig(png, dpi=80)
    plt.close("all")
    assert png.stat().st_size > 10_000
