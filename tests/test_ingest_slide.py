"""Slide access through openslide: real SVS files, the JPEG -> pyramidal TIFF conversion, patch reads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shared.errors import FedstError
from shared.ingest.pil import open_plain_image
from shared.ingest.slide import (
    default_cache_dir,
    ensure_pyramidal,
    mpp_from_properties,
    open_slide,
    write_pyramidal_tiff,
)
from tests.helpers import shared_path

C2_SPOT = (6930.58, 3510.24)  # her2st C2 spot "25x13" (pixel_x, pixel_y)


@pytest.fixture(scope="module")
def c2_jpeg() -> np.ndarray:
    with open_plain_image(shared_path("her2st", "images", "C2.jpg")) as image:  # 92 Mpx: above PIL's warning limit
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def c2_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # one cache for the session's ingest tests: C2 is converted once, not once per test module
    return ensure_pyramidal(shared_path("her2st", "images", "C2.jpg"), 0.7, tmp_path_factory.getbasetemp() / "slides")


def test_cmu_svs_mpp_and_dimensions():
    with open_slide(shared_path("wsi", "CMU-1-Small-Region.svs")) as slide:
        assert slide.mpp == pytest.approx(0.499)
        assert (slide.width, slide.height) == (2220, 2967)
        assert slide.level_count == 1 and slide.vendor == "aperio"


def test_cmu_patch_matches_openslide_region_when_no_resize_needed():
    import openslide

    path = shared_path("wsi", "CMU-1-Small-Region.svs")
    with open_slide(path) as slide:
        patch = slide.read_patch(1000.0, 1500.0, field_um=64 * 0.499, out_px=64)
    reference = np.asarray(openslide.OpenSlide(str(path)).read_region((968, 1468), 0, (64, 64)).convert("RGB"))
    assert patch.shape == (64, 64, 3) and patch.dtype == np.uint8
    assert np.abs(patch.astype(int) - reference).mean() < 1.0


def test_tcga_two_levels_needs_mpp():
    path = shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs")
    with pytest.raises(FedstError, match=r"tcga-cr-7395.*microns-per-pixel.*--mpp"):
        open_slide(path)
    with open_slide(path, mpp=0.25) as slide:
        assert slide.level_count == 2
        assert slide.level_downsamples[1] == pytest.approx(2.0, abs=0.01)
        assert slide.mpp == 0.25
        assert slide.best_level(1.5) == 0 and slide.best_level(2.5) == 1 and slide.best_level(100) == 1


def test_tcga_level_choice_gives_same_patch_as_full_resolution():
    """A 4x-downsampled field is read from level 1; it must show what level 0 shows after the same resize."""
    from PIL import Image

    with open_slide(shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs"), mpp=0.25) as slide:
        patch = slide.read_patch(2200.0, 1800.0, field_um=256 * 0.25, out_px=64)
        full = slide.read_region_rgb(2200 - 128, 1800 - 128, 0, 256, 256)
    reference = np.asarray(Image.fromarray(full).resize((64, 64), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(patch.astype(int) - reference).mean() < 8.0
    assert patch.std() > 5  # real tissue, not a blank read


def test_out_of_bounds_reads_white():
    with open_slide(shared_path("wsi", "CMU-1-Small-Region.svs")) as slide:
        patch = slide.read_patch(0.0, 0.0, field_um=64 * 0.499, out_px=64)
    assert (patch[:31, :31] == 255).all()
    assert patch.shape == (64, 64, 3)


def test_thumbnail_scale():
    with open_slide(shared_path("wsi", "CMU-1-Small-Region.svs")) as slide:
        thumb, scale = slide.thumbnail(300)
    assert max(thumb.shape[:2]) == 300 and thumb.shape[2] == 3
    assert scale == pytest.approx(thumb.shape[1] / 2220)


def test_converted_jpeg_is_a_pyramidal_generic_tiff(c2_tiff: Path, c2_jpeg: np.ndarray):
    import openslide

    osr = openslide.OpenSlide(str(c2_tiff))
    assert osr.properties["openslide.vendor"] == "generic-tiff"
    assert osr.level_count >= 3
    assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.7)
    assert osr.dimensions == (c2_jpeg.shape[1], c2_jpeg.shape[0])
    with open_slide(c2_tiff) as slide:  # the mpp travels inside the file
        assert slide.mpp == pytest.approx(0.7)


def test_converted_patch_equals_jpeg_crop(c2_tiff: Path, c2_jpeg: np.ndarray):
    from PIL import Image

    cx, cy = (int(round(v)) for v in C2_SPOT)
    with open_slide(c2_tiff) as slide:
        native = slide.read_patch(cx, cy, field_um=160 * 0.7, out_px=160)  # level 0, no resize
        reduced = slide.read_patch(cx, cy, field_um=640 * 0.7, out_px=160)  # from a reduced level
    crop = c2_jpeg[cy - 80 : cy + 80, cx - 80 : cx + 80].astype(int)
    assert np.abs(native.astype(int) - crop).mean() < 2.0
    wide = Image.fromarray(c2_jpeg[cy - 320 : cy + 320, cx - 320 : cx + 320])
    expected = np.asarray(wide.resize((160, 160), Image.Resampling.LANCZOS)).astype(int)
    assert np.abs(reduced.astype(int) - expected).mean() < 10.0
    # a one-pixel shift is clearly worse: the comparison above is sensitive to misplacement
    shifted = c2_jpeg[cy - 80 : cy + 80, cx - 78 : cx + 82].astype(int)
    assert np.abs(native.astype(int) - shifted).mean() > 2 * np.abs(native.astype(int) - crop).mean()


def test_ensure_pyramidal_caches_by_content_and_mpp(tmp_path: Path):
    source = shared_path("visium", "squidpy_tests_data", "spatial", "tissue_hires_image.png")
    before = sorted(os.listdir(source.parent))
    first = ensure_pyramidal(source, 4.1, tmp_path)
    stamp = first.stat().st_mtime_ns
    again = ensure_pyramidal(source, 4.1, tmp_path)
    other = ensure_pyramidal(source, 2.0, tmp_path)
    assert again == first and first.stat().st_mtime_ns == stamp
    assert other != first and first.parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, other.name])  # no temp files left
    assert sorted(os.listdir(source.parent)) == before  # nothing written beside the (read-only) source
    # already a slide format: used in place, not copied
    svs = shared_path("wsi", "CMU-1-Small-Region.svs")
    assert ensure_pyramidal(svs, None, tmp_path) == svs


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FEDST_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "slides"
    path = ensure_pyramidal(shared_path("visium", "squidpy_tests_data", "spatial", "tissue_lowres_image.png"), 13.7)
    assert path.parent == tmp_path / "c" / "slides" and path.is_file()


def test_write_pyramidal_tiff_roundtrip_of_smooth_image(tmp_path: Path):
    yy, xx = np.mgrid[0:1100, 0:1300]
    rgb = np.stack([xx * 255 // 1300, yy * 255 // 1100, np.full_like(xx, 128)], axis=-1).astype(np.uint8)
    path = write_pyramidal_tiff(tmp_path / "g.tif", rgb, mpp=0.5)
    with open_slide(path) as slide:
        assert (slide.width, slide.height) == (1300, 1100)
        assert slide.level_count == 3  # 1300x1100, 650x550, 325x275 (the last still spans a 256 tile)
        assert slide.mpp == pytest.approx(0.5)
        region = slide.read_region_rgb(100, 200, 0, 300, 300)
    assert np.abs(region.astype(int) - rgb[200:500, 100:400]).mean() < 1.5


def test_write_pyramidal_tiff_rejects_bad_input(tmp_path: Path):
    with pytest.raises(FedstError, match="expected an \\(H, W, 3\\) uint8"):
        write_pyramidal_tiff(tmp_path / "x.tif", np.zeros((10, 10), np.uint8), mpp=0.5)
    with pytest.raises(FedstError, match="plausible microns-per-pixel"):
        write_pyramidal_tiff(tmp_path / "x.tif", np.zeros((10, 10, 3), np.uint8), mpp=-1)
    assert not list(tmp_path.iterdir())


def test_mpp_from_properties_precedence_and_placeholders():
    assert mpp_from_properties({"openslide.mpp-x": "0.25", "aperio.MPP": "0.5"}) == 0.25
    assert mpp_from_properties({"aperio.MPP": "0.4990"}) == pytest.approx(0.499)
    assert mpp_from_properties({"tiff.XResolution": "20000", "tiff.ResolutionUnit": "centimeter"}) == 0.5
    assert mpp_from_properties({"tiff.XResolution": "50800", "tiff.ResolutionUnit": "inch"}) == 0.5
    assert mpp_from_properties({"tiff.XResolution": "72", "tiff.ResolutionUnit": "inch"}) is None  # 352 um/px
    assert mpp_from_properties({"tiff.ResolutionUnit": "inch"}) is None


def _gradient_png(path: Path, width: int = 300, height: int = 200) -> Path:
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.stack([xx * 255 // width, yy * 255 // height, np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def test_reading_a_plain_image_leaves_pils_pixel_limit_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """fedst lifts PIL's decompression-bomb limit only inside its own reads and restores the caller's value."""
    from PIL import Image

    from shared.ingest.pyramid import read_plain_image
    from shared.ingest.slide import image_mpp, image_size
    from shared.inspect import describe_slide

    png = _gradient_png(tmp_path / "g.png")
    default = Image.MAX_IMAGE_PIXELS
    with open_slide(png, mpp=0.5, cache_dir=tmp_path / "cache") as slide:
        assert (slide.width, slide.height) == (300, 200)
    assert Image.MAX_IMAGE_PIXELS == default
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a caller that is stricter than fedst: 60000 px is a bomb
    with pytest.raises(Image.DecompressionBombError):
        Image.open(png)
    assert read_plain_image(png).shape == (200, 300, 3)
    assert image_size(png) == (300, 200)
    assert image_mpp(png) is None
    assert describe_slide(png)["width"] == 300
    assert Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(FedstError, match="g.png: not an image"):  # restored also when the read fails
        with open_plain_image(png):
            raise Image.UnidentifiedImageError("x")
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_plain_image_above_fedsts_bound_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from PIL import Image

    import shared.ingest.pil

    png = _gradient_png(tmp_path / "g.png")
    monkeypatch.setattr(shared.ingest.pil, "MAX_PLAIN_IMAGE_PIXELS", 59_999)
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(FedstError, match=r"g\.png: plain image of 300 x 200 px exceeds the 59999 px bound"):
        open_slide(png, mpp=0.5, cache_dir=tmp_path / "cache")
    assert Image.MAX_IMAGE_PIXELS == before
    assert not (tmp_path / "cache").exists()  # refused before anything is converted
