"""Bad input through the real CLI (issue 13, item 8): each case exits 2 with one `error:` line naming the file
and what was expected, no traceback, and nothing written (no output, no slide cache, no temporary files).

The bad files are derived in tmp_path from a generated section (shared.synthetic: HEST-style h5ad + pyramidal
TIFF), a small store prepared from it and a ridge predictor trained on that store."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from shared.errors import FedstError
from tests.helpers import REPO, write_plain_jpeg

MPP = 1.0  # the generated consortium's


@dataclass(frozen=True)
class World:
    h5ad: Path
    tiff: Path
    panel: Path
    jpeg: Path
    store: Path
    predictor: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    import tifffile

    from shared.downstream.predictor import train_predictor
    from shared.store.prepare import prepare_store
    from shared.synthetic import generate_consortium

    root = generate_consortium(tmp_path_factory.mktemp("world"), n_sites=1, sections_per_site=1, grid=(8, 8))
    site = root / "site-0"
    jpeg = write_plain_jpeg(tifffile.imread(site / "S0A.tif"), root / "S0A.jpg")
    store = prepare_store(site / "site.toml", root / "store", patch_px=16, progress=False)
    predictor = root / "predictor"
    train_predictor([store], "ridge", "stats", progress=False).save_pretrained(predictor)
    return World(site / "S0A.h5ad", site / "S0A.tif", root / "panel.txt", jpeg, store.path, predictor)


@pytest.fixture
def fedst(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """Run `fedst ARGS` in process through the console-script entry point; (exit code, stdout, stderr).

    The slide cache points into tmp_path, so the "nothing written" check sees a conversion too."""
    from shared.cli import main as cli

    monkeypatch.setenv("FEDST_CACHE", str(tmp_path / "cache"))

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["fedst", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        out, err = capsys.readouterr()
        return exit_info.value.code, out, err

    return run


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def assert_clean_error(result: tuple[int, str, str], names: str | Path, expected: str, root: Path, before: set) -> None:
    """Exit 2, one `error:` line naming ``names`` and containing ``expected``, nothing new under ``root``."""
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert str(names) in lines[0] and expected in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert _files(root) == before, sorted(map(str, _files(root) - before))


def _site_toml(folder: Path, world: World, image: Path, mpp: float | None = MPP) -> Path:
    """A SITE.toml of one generic section: the generated h5ad with ``image``."""
    folder.mkdir(parents=True, exist_ok=True)
    toml = folder / "SITE.toml"
    extra = f"mpp = {mpp}\n" if mpp is not None else ""
    toml.write_text(
        f"panel = '{world.panel}'\n[[sections]]\nid = 'S'\nformat = 'h5ad'\nh5ad = '{world.h5ad}'\n"
        f"image = '{image}'\n{extra}"
    )
    return toml


# ---- TIFF with garbage tiles ---------------------------------------------------------------------------------
def _garble_tiles(source: Path, target: Path, pages: tuple[int, ...]) -> Path:
    """A copy of a pyramidal TIFF whose tiles (all but the first of each listed page) are random bytes: the
    file opens, and openslide fails on the first read that touches a garbled tile."""
    import tifffile

    shutil.copy(source, target)
    with tifffile.TiffFile(target) as tif:
        spans = [span for i in pages for span in list(zip(tif.pages[i].dataoffsets, tif.pages[i].databytecounts))[1:]]
    rng = np.random.default_rng(0)
    with open(target, "r+b") as handle:
        for offset, count in spans:
            handle.seek(offset)
            handle.write(rng.integers(0, 256, count, dtype=np.uint8).tobytes())
    return target


def test_tiff_with_garbage_tiles_is_one_line_naming_slide(tmp_path: Path, world: World):
    """The real process (not in-process): today's 55-line OpenSlideError traceback is one line and exit 2."""
    bad = _garble_tiles(world.tiff, tmp_path / "garbled.tif", pages=(0, 1))
    toml = _site_toml(tmp_path / "site", world, bad)
    before = _files(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "shared.cli.main", "data", "prepare", str(toml), "--out", str(tmp_path / "store")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FEDST_CACHE": str(tmp_path / "cache")},
    )
    assert_clean_error(
        (result.returncode, result.stdout, result.stderr), bad, "unreadable or corrupt slide", tmp_path, before
    )


def test_garbage_tile_read_names_slide_and_region(tmp_path: Path, world: World):
    from shared.ingest import open_slide

    bad = _garble_tiles(world.tiff, tmp_path / "garbled.tif", pages=(0,))
    with open_slide(bad, cache_dir=tmp_path / "cache") as slide:  # opens: the coarsest level is intact
        with pytest.raises(FedstError, match=r"garbled\.tif: unreadable or corrupt slide: reading the \d+ x \d+ px "):
            slide.read_patch(slide.width / 2, slide.height / 2, field_um=64 * MPP, out_px=64)
        with pytest.raises(FedstError, match=r"region at x=\d+, y=\d+, level 0 failed"):
            slide.read_patch(slide.width / 2, slide.height / 2, field_um=64 * MPP, out_px=64)


# ---- JPEG corrupted mid-file ---------------------------------------------------------------------------------
def _corrupt_jpeg(data: bytes, how: str) -> bytes:
    rng = np.random.default_rng(1)
    mid, out = len(data) // 2, bytearray(data)
    if how == "garbage":
        out[mid : mid + 2000] = rng.integers(0, 256, 2000, dtype=np.uint8).tobytes()
    elif how == "zeros":
        out[mid : mid + 2000] = bytes(2000)
    elif how == "cut-out":
        del out[mid : mid + 5000]
    else:  # truncated
        out = out[:mid]
    return bytes(out)


@pytest.mark.parametrize(
    "how, expected",
    [
        ("garbage", "corrupt JPEG data"),
        ("zeros", "extraneous byte(s)"),
        ("cut-out", "premature end of data"),
        ("truncated", "truncated JPEG"),
    ],
)
def test_corrupt_jpeg_is_refused_before_conversion(tmp_path: Path, world: World, fedst, how: str, expected: str):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(_corrupt_jpeg(world.jpeg.read_bytes(), how))
    toml = _site_toml(tmp_path / "site", world, bad)
    before = _files(tmp_path)
    result = fedst("data", "prepare", toml, "--out", tmp_path / "store", "--no-progress")
    assert_clean_error(result, bad, expected, tmp_path, before)


@pytest.mark.parametrize("how, expected", [("garbage", "corrupt JPEG data"), ("truncated", "truncated JPEG")])
def test_inspect_of_a_corrupt_jpeg_says_so(tmp_path: Path, world: World, fedst, how: str, expected: str):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(_corrupt_jpeg(world.jpeg.read_bytes(), how))
    before = _files(tmp_path)
    assert_clean_error(fedst("data", "inspect", bad), bad, expected, tmp_path, before)
    code, out, err = fedst("data", "inspect", world.jpeg)  # the intact original still inspects
    assert code == 0 and "plain-image" in out, err


def _jpeg_variants() -> dict[str, bytes]:
    """Valid JPEGs as encoders write them: the check must pass every one."""
    import imagecodecs
    from PIL import Image

    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[0:237, 0:301]
    rgb = np.stack([(xx + yy) % 256, (3 * xx) % 256, (5 * yy) % 256], axis=-1).astype(np.uint8)
    rgb[50:120, 60:200] = rng.integers(0, 256, (70, 140, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)

    def pil(img, **kw) -> bytes:
        buffer = io.BytesIO()
        img.save(buffer, format="JPEG", **kw)
        return buffer.getvalue()

    return {
        "baseline 4:2:0": pil(image),
        "4:4:4": pil(image, subsampling=0),
        "4:2:2": pil(image, subsampling=1),
        "odd size": pil(Image.fromarray(rgb[:233, :297])),
        "grayscale": pil(image.convert("L")),
        "cmyk": pil(image.convert("CMYK")),
        "optimised tables": pil(image, optimize=True),
        "quality 100": pil(image, quality=100),
        "progressive": pil(image, progressive=True),
        "restart markers": pil(image, restart_marker_blocks=3),
        "1 x 1": pil(Image.fromarray(rgb[:1, :1])),
        "libjpeg-turbo": imagecodecs.jpeg8_encode(rgb, level=85),
        "12-bit": imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb[..., 0].astype(np.uint16) * 16), bitspersample=12),
    }


def test_valid_jpegs_pass_the_check():
    from shared.ingest.jpeg import check_jpeg

    for name, data in _jpeg_variants().items():
        check_jpeg(name, data)


def test_corruption_in_a_jpeg_with_restart_markers_is_found():
    from shared.ingest.jpeg import check_jpeg

    data = _jpeg_variants()["restart markers"]
    for how in ("garbage", "cut-out", "truncated"):
        with pytest.raises(FedstError, match=r"restart: unreadable or corrupt image \("):
            check_jpeg("restart", _corrupt_jpeg(data, how))


# ---- an image claiming 60000 x 60000 px ----------------------------------------------------------------------
def _huge_jpeg(template: bytes) -> bytes:
    """The template JPEG with its frame header claiming 60000 x 60000 px (the data stays small)."""
    data, at = bytearray(template), 2
    while data[at + 1] not in (0xC0, 0xC1, 0xC2):
        at += 2 + struct.unpack(">H", data[at + 2 : at + 4])[0]
    data[at + 5 : at + 9] = struct.pack(">HH", 60000, 60000)
    return bytes(data)


def _huge_png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(100))) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_image_claiming_60000_px_is_refused_from_its_header(tmp_path: Path, world: World, fedst, suffix: str):
    bad = tmp_path / f"huge{suffix}"
    bad.write_bytes(_huge_jpeg(world.jpeg.read_bytes()) if suffix == ".jpg" else _huge_png())
    toml = _site_toml(tmp_path / "site", world, bad)
    before = _files(tmp_path)
    result = fedst("data", "prepare", toml, "--out", tmp_path / "store", "--no-progress")
    assert_clean_error(result, bad, "60000 x 60000 px exceeds the 2147483648 px bound", tmp_path, before)


def test_size_bound_is_configurable(tmp_path: Path, world: World, fedst, monkeypatch: pytest.MonkeyPatch):
    bad = tmp_path / "huge.png"
    bad.write_bytes(_huge_png())
    monkeypatch.setenv("FEDST_MAX_IMAGE_PIXELS", "4_000_000_000")
    code, out, _ = fedst("data", "inspect", bad, "--json")  # header only: nothing is decoded
    assert code == 0 and json.loads(out)["width"] == 60000
    monkeypatch.setenv("FEDST_MAX_IMAGE_PIXELS", "10000")  # the generated JPEG is larger
    toml = _site_toml(tmp_path / "site", world, world.jpeg)
    before = _files(tmp_path)
    result = fedst("data", "prepare", toml, "--out", tmp_path / "store", "--no-progress")
    assert_clean_error(result, world.jpeg, "exceeds the 10000 px bound", tmp_path, before)
    monkeypatch.setenv("FEDST_MAX_IMAGE_PIXELS", "lots")
    assert_clean_error(
        fedst("data", "inspect", bad), "$FEDST_MAX_IMAGE_PIXELS", "expected a positive pixel count", tmp_path, before
    )


# ---- drift ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", ["-1", "nan"])
def test_drift_negative_or_nan_time(tmp_path: Path, world: World, fedst, t: str):
    before = _files(tmp_path)
    result = fedst("drift", world.h5ad, "--out", tmp_path / "out.h5ad", "--t", t)
    assert_clean_error(result, "--t", "expected a finite diffusion time >= 0", tmp_path, before)


def test_drift_of_zero_spots_writes_nothing(tmp_path: Path, world: World, fedst):
    import anndata

    empty = tmp_path / "empty.h5ad"
    anndata.read_h5ad(world.h5ad)[:0].copy().write_h5ad(empty)
    before = _files(tmp_path)
    result = fedst("drift", empty, "--out", tmp_path / "out.h5ad")
    assert_clean_error(result, empty, "no spots", tmp_path, before)


def test_drift_library_errors_name_the_input(tmp_path: Path, world: World, fedst):
    before = _files(tmp_path)
    result = fedst("drift", world.h5ad, "--out", tmp_path / "out.h5ad", "--embedding", "X_nope")
    assert_clean_error(result, world.h5ad, "obsm['X_nope'] not found", tmp_path, before)


# ---- a truncated store array, a corrupt manifest -------------------------------------------------------------
def _copy_store(world: World, tmp_path: Path) -> Path:
    return Path(shutil.copytree(world.store, tmp_path / "store"))


@pytest.mark.parametrize("name", ["patches.npy", "tiles.npy"])
def test_truncated_store_array(tmp_path: Path, world: World, fedst, name: str):
    store = _copy_store(world, tmp_path)
    with open(store / name, "r+b") as handle:
        handle.truncate((store / name).stat().st_size // 2)
    before = _files(tmp_path)
    for args in (("data", "inspect", store), ("predict", "--model", world.predictor, "--section", store)):
        result = fedst(*args, *(("--out", tmp_path / "p.h5ad", "--no-progress") if args[0] == "predict" else ()))
        assert_clean_error(result, store / name, "truncated array", tmp_path, before)


@pytest.mark.parametrize(
    "content, expected",
    [
        (b'{"format": "fedst-patch-st', "corrupt manifest (Unterminated string"),
        (bytes(range(128, 256)), "corrupt manifest (not UTF-8"),
        (b"[1, 2]", "corrupt manifest (a JSON list"),
        (b'{"format": "fedst-patch-store", "format_version": 1}', "corrupt manifest (field 'panel' is missing"),
    ],
)
def test_corrupt_manifest_is_not_called_not_a_store(tmp_path: Path, world: World, fedst, content, expected):
    store = _copy_store(world, tmp_path)
    (store / "manifest.json").write_bytes(content)
    before = _files(tmp_path)
    for args in (
        ("data", "inspect", store),
        ("predict", "--model", world.predictor, "--section", store, "--out", tmp_path / "p.h5ad", "--no-progress"),
    ):
        result = fedst(*args)
        assert_clean_error(result, store / "manifest.json", expected, tmp_path, before)
        assert "not a" not in result[2]


def test_missing_manifest_is_not_a_store(tmp_path: Path, world: World):
    from shared.store import PatchStore

    store = _copy_store(world, tmp_path)
    (store / "manifest.json").unlink()
    with pytest.raises(FedstError, match=r"store: not a fedst patch store \(no manifest\.json"):
        PatchStore(store)


def test_prepare_refuses_to_replace_a_store_with_a_corrupt_manifest(tmp_path: Path, world: World, fedst):
    store = _copy_store(world, tmp_path)
    (store / "manifest.json").write_text("{")
    toml = _site_toml(tmp_path / "site", world, world.tiff, mpp=None)
    before = _files(tmp_path)
    result = fedst("data", "prepare", toml, "--out", store, "--no-progress")
    assert_clean_error(result, store / "manifest.json", "corrupt manifest", tmp_path, before)
    assert "refusing to replace" in result[2]


# ---- a corrupt predictor -------------------------------------------------------------------------------------
def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, file, expected",
    [
        (lambda p: (p / "predictor.json").write_text('{"format": "fedst-pre'), "predictor.json", "corrupt config JSON"),
        (lambda p: _edit_meta(p / "predictor.json", genes=5), "predictor.json", "field 'genes' is 5, expected list"),
        (lambda p: _edit_meta(p / "predictor.json", genes=[]), "predictor.json", "non-empty list of gene names"),
        (lambda p: _edit_meta(p / "predictor.json", kind="svm"), "predictor.json", "field 'kind' is 'svm'"),
        (
            lambda p: _edit_meta(
                p / "predictor.json", genes=json.loads((p / "predictor.json").read_text())["genes"][:-1]
            ),
            "predictor.json",
            "genes, but the model in",
        ),
        (
            lambda p: _edit_meta(p / "predictor.json", encoder_weights="encoder.safetensors"),
            "predictor.json",
            "encoder 'stats' has no weights",
        ),
        (lambda p: (p / "model" / "config.json").write_text("{"), "model/config.json", "corrupt config JSON"),
        (
            lambda p: (p / "model" / "weights.safetensors").write_bytes(b"\x00" * 5),
            "model/weights.safetensors",
            "unreadable safetensors weights",
        ),
    ],
)
def test_corrupt_predictor(tmp_path: Path, world: World, fedst, damage, file: str, expected: str):
    model = Path(shutil.copytree(world.predictor, tmp_path / "predictor"))
    damage(model)
    before = _files(tmp_path)
    result = fedst("predict", "--model", model, "--section", world.store, "--out", tmp_path / "p.h5ad", "--no-progress")
    assert_clean_error(result, model / file, expected, tmp_path, before)


def test_flag_options_on_a_ridge_model_are_refused(tmp_path: Path, world: World, fedst):
    before = _files(tmp_path)
    out = ("--section", world.store, "--out", tmp_path / "p.h5ad", "--no-progress")
    result = fedst("predict", "--model", world.predictor, "--flag-mode", "mean", *out)
    assert_clean_error(result, "--flag-mode", "apply only to FLAG models", tmp_path, before)
