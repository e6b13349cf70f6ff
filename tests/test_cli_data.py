"""`fedst data inspect | prepare | synthetic` through the real typer app (in process, CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from shared import keys
from shared.cli.main import app
from shared.errors import FedstError
from tests.helpers import shared_path, write_plain_jpeg, write_visium_outs

runner = CliRunner()


def _run(*args: str, cache: Path | None = None):
    env = {"FEDST_CACHE": str(cache)} if cache is not None else None
    return runner.invoke(app, ["data", *args], env=env)


def _json(*args: str, cache: Path | None = None) -> dict:
    result = _run(*args, "--json", cache=cache)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.output)


def test_inspect_svs_json():
    info = _json("inspect", str(shared_path("wsi", "CMU-1-Small-Region.svs")))
    assert info == {
        "kind": "slide",
        "path": str(shared_path("wsi", "CMU-1-Small-Region.svs")),
        "width": 2220,
        "height": 2967,
        "levels": 1,
        "level_downsamples": [1.0],
        "mpp": 0.499,
        "vendor": "aperio",
    }
    # --mpp is a fallback for images without one: it does not replace the scanner's value
    assert _json("inspect", str(shared_path("wsi", "CMU-1-Small-Region.svs")), "--mpp", "0.3")["mpp"] == 0.499


def test_inspect_slide_without_mpp_still_describes_it():
    path = str(shared_path("wsi", "tcga-cr-7395-01a-01-ts1.svs"))
    info = _json("inspect", path)
    assert info["levels"] == 2 and info["mpp"] is None and (info["width"], info["height"]) == (4443, 3567)
    assert _json("inspect", path, "--mpp", "0.25")["mpp"] == 0.25
    text = _run("inspect", path).output
    assert "levels: 2" in text and "width: 4443" in text and not text.lstrip().startswith("{")


def test_inspect_plain_jpeg_reads_only_the_header(tmp_path: Path):
    info = _json("inspect", str(shared_path("her2st", "images", "C2.jpg")), cache=tmp_path)
    assert (info["width"], info["height"], info["levels"], info["vendor"]) == (9274, 9911, 1, "plain-image")
    assert info["mpp"] is None  # 72 dpi is not a scan resolution
    assert list(tmp_path.iterdir()) == []  # nothing converted


@pytest.fixture(scope="module")
def plain_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated section whose image is a plain JPEG (what `prepare` converts into the slide cache), as a
    SITE.toml, its h5ad and a Space Ranger folder (hires PNG, also a plain image)."""
    import anndata
    import tifffile

    from shared.synthetic import generate_consortium

    root = generate_consortium(tmp_path_factory.mktemp("plain"), n_sites=1, sections_per_site=1, grid=(8, 8))
    rgb = tifffile.imread(root / "site-0" / "S0A.tif")
    write_plain_jpeg(rgb, root / "S0A.jpg")
    write_visium_outs(anndata.read_h5ad(root / "site-0" / "S0A.h5ad"), rgb, root / "visium" / "outs", 1.0)
    (root / "SITE.toml").write_text(
        "site = 'plain'\n[[sections]]\nid = 'S0A'\nformat = 'h5ad'\nh5ad = 'site-0/S0A.h5ad'\nimage = 'S0A.jpg'\n"
        "mpp = 1.0\n"
    )
    return root


def _tree(root: Path) -> dict[Path, tuple[int, int]]:
    return {p.relative_to(root): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_inspect_has_no_side_effects(plain_site: Path, tmp_path: Path):
    """Inspecting a plain JPEG, a SITE.toml naming one, an h5ad or a Space Ranger folder writes nothing: no
    slide-cache conversion (that is `prepare`'s), nothing beside the data. The sizes come from the headers."""
    from PIL import Image

    cache = tmp_path / "cache"
    before = _tree(plain_site)
    jpeg = plain_site / "S0A.jpg"
    for target in (jpeg, plain_site / "site-0" / "S0A.h5ad", plain_site / "visium" / "outs"):
        _json("inspect", str(target), cache=cache)
    site = _json("inspect", str(plain_site / "SITE.toml"), cache=cache)
    assert not cache.exists() and _tree(plain_site) == before
    with Image.open(jpeg) as image:
        size = image.size
    (section,) = site["sections"]
    assert (section["width"], section["height"], section["mpp"], section["slide"]) == (*size, 1.0, str(jpeg))

    bad = tmp_path / "site"  # the SITE.toml path still runs the JPEG check prepare runs before converting
    bad.mkdir()
    (bad / "S0A.jpg").write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    (bad / "SITE.toml").write_text(
        (plain_site / "SITE.toml").read_text().replace("site-0/S0A.h5ad", str(plain_site / "site-0" / "S0A.h5ad"))
    )
    result = _run("inspect", str(bad / "SITE.toml"), cache=cache)
    assert isinstance(result.exception, FedstError) and "truncated JPEG" in str(result.exception)
    assert not cache.exists()

    options = ["--out", str(tmp_path / "store"), "--patch-px", "16", "--max-tiles", "4", "--no-progress"]
    result = _run("prepare", str(plain_site / "SITE.toml"), *options, cache=cache)
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(list((cache / "slides").glob("*.tif"))) == 1  # prepare converts it, once


def test_inspect_section_h5ad():
    info = _json("inspect", str(shared_path("visium", "squidpy_tests_data", "test_data.h5ad")))
    assert info["kind"] == "section" and (info["spots"], info["genes"]) == (49, 1999)
    assert info["spatial"] is True and info["spatial_extent"]["y"] == [200.0, 1517.0]


def test_inspect_spaceranger_folder(tmp_path: Path):
    info = _json("inspect", str(shared_path("visium", "squidpy_tests_data")), cache=tmp_path)
    assert info["kind"] == "section" and info["format"] == "visium"
    assert (info["spots"], info["genes"], info["width"], info["height"]) == (100, 100, 2000, 2000)


def test_inspect_site_toml(tmp_path: Path):
    folder = shared_path("visium", "squidpy_tests_data")
    toml = tmp_path / "SITE.toml"
    toml.write_text(
        f"site = 'lab'\n[[sections]]\nid = 'V1'\nformat = 'visium'\npath = '{folder}'\n"
        f"[[sections]]\nid = 'G1'\nformat = 'h5ad'\nh5ad = '{folder / 'test_data.h5ad'}'\n"
        f"image = '{folder / 'test_img.jpg'}'\nmpp = 1.0\n"
    )
    info = _json("inspect", str(toml), cache=tmp_path / "cache")
    assert info["kind"] == "site" and info["site"] == "lab"
    rows = [{k: s[k] for k in ("id", "format", "spots", "genes", "mpp", "width", "height")} for s in info["sections"]]
    assert rows[1] == {
        "id": "G1",
        "format": "h5ad",
        "spots": 49,
        "genes": 1999,
        "mpp": 1.0,
        "width": 950,
        "height": 1717,
    }
    assert rows[0]["id"] == "V1" and rows[0]["spots"] == 100 and rows[0]["mpp"] == pytest.approx(4.0997, abs=1e-3)
    text = _run("inspect", str(toml), cache=tmp_path / "cache").output
    assert text.startswith("site lab:") and "G1" in text and "visium" in text


def test_inspect_store(tmp_path: Path):
    import anndata

    from shared.store.format import StoreWriter

    spots = anndata.AnnData(X=np.zeros((3, 2), np.float32))
    spots.var_names = ["ERBB2", "GAPDH"]
    spots.obs[keys.SECTION] = ["S1", "S1", "S2"]
    with StoreWriter(tmp_path / "store", patch_px=16) as writer:
        writer.allocate_patches(3)[:] = 7
        writer.set_spots(spots)
    info = _json("inspect", str(tmp_path / "store"))
    assert info["kind"] == "store"
    assert (info["spots"], info["genes"], info["tiles"], info["patch_px"], info["sections"]) == (
        3,
        2,
        0,
        16,
        ["S1", "S2"],
    )


def test_inspect_errors_are_fedst_errors(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    for target, needle in [(tmp_path / "absent.tif", "no such file"), (tmp_path / "empty", "neither a fedst store")]:
        result = _run("inspect", str(target))
        assert result.exit_code != 0 and isinstance(result.exception, FedstError)
        assert needle in str(result.exception)


def test_synthetic_then_prepare_then_inspect(tmp_path: Path):
    """The three commands chained on a tiny generated site: the store holds every spot of the site."""
    pytest.importorskip("shared.synthetic")
    pytest.importorskip("shared.store.prepare")
    result = _run("synthetic", "--sites", "1", "--out", str(tmp_path / "consortium"), "--seed", "3")
    assert result.exit_code == 0, (result.output, result.exception)
    toml = tmp_path / "consortium" / "site-0" / "site.toml"
    site = _json("inspect", str(toml), cache=tmp_path / "cache")
    assert site["kind"] == "site" and len(site["sections"]) >= 1
    result = _run(
        "prepare",
        str(toml),
        "--out",
        str(tmp_path / "store"),
        "--patch-px",
        "32",
        "--max-tiles",
        "8",
        "--no-progress",
        cache=tmp_path / "cache",
    )
    assert result.exit_code == 0, (result.output, result.exception)
    store = _json("inspect", str(tmp_path / "store"))
    assert store["kind"] == "store" and store["patch_px"] == 32
    assert store["spots"] == sum(s["spots"] for s in site["sections"])
    assert store["sections"] == [s["id"] for s in site["sections"]]
