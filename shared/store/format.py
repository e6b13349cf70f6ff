"""On-disk format of a patch store, its atomic writer and its memory-mapped reader.

Layout of a store directory::

    manifest.json   written last; a directory without a valid manifest is not a store
    patches.npy     uint8 (n_spots, P, P, 3): row i is the patch of spots.obs[PATCH_INDEX] == i
    tiles.npy       uint8 (n_tiles, P, P, 3): unlabeled tissue tiles for generative pretraining
    tiles.csv       one row per tile: section, x, y (tile centre, full-resolution pixels)
    spots.h5ad      spots x panel genes: X = normalised, layers[COUNTS], layers[MEASURED];
                    obs[SECTION], obs[PATCH_INDEX], obs[SYNTHETIC]; obsm[SPATIAL]; uns[MPP] per section

The writer fills a hidden temporary directory beside the target and renames it into place only after every
file and the manifest (with SHA-256 checksums) are on disk, so an interrupted write never leaves something
that opens as a valid store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shared import keys
from shared.errors import FedstError
from shared.io import json_default

if TYPE_CHECKING:
    import anndata
    import pandas as pd

FORMAT_NAME = "fedst-patch-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PATCHES = "patches.npy"
TILES = "tiles.npy"
TILE_TABLE = "tiles.csv"
SPOTS = "spots.h5ad"
DATA_FILES = (PATCHES, TILES, TILE_TABLE, SPOTS)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def has_manifest(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a manifest file, readable or not: callers that then open it
    as a store report a corrupt manifest as such, not as "not a store"."""
    return (Path(path) / MANIFEST).is_file()


def is_store(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory holding a store manifest (JSON naming the store format)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        content = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(content, dict) and content.get("format") == FORMAT_NAME


MANIFEST_FIELDS = {"panel": list, "sections": list, "params": dict, "counts": dict, "files": dict}


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the store at ``path``, or a FedstError saying why it is not a store: no manifest at all
    (not a store, or an interrupted write) differs from a manifest that is there but unreadable or incomplete."""
    root = Path(path)
    if not root.exists():
        raise FedstError(f"{root}: no such store (expected a directory written by `fedst data prepare`)")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FedstError(f"{root}: not a fedst patch store (no {MANIFEST}; an interrupted write leaves none)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise FedstError(f"{manifest_path}: corrupt manifest ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise FedstError(f"{manifest_path}: corrupt manifest (not UTF-8 JSON text)") from None
    except OSError as exc:
        raise FedstError(f"{manifest_path}: unreadable manifest ({exc.strerror or exc})") from None
    if not isinstance(manifest, dict):
        raise FedstError(f"{manifest_path}: corrupt manifest (a JSON {type(manifest).__name__}, expected an object)")
    if manifest.get("format") != FORMAT_NAME:
        raise FedstError(f"{manifest_path}: field 'format' is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FedstError(
            f"{manifest_path}: format_version {version!r} is not supported (this fedst reads {FORMAT_VERSION})"
        )
    _check_manifest_fields(manifest_path, manifest)
    missing = [name for name in DATA_FILES if not (root / name).is_file()]
    if missing:
        raise FedstError(f"{root}: store is incomplete, missing {', '.join(missing)}")
    return manifest


def _check_manifest_fields(manifest_path: Path, manifest: dict[str, Any]) -> None:
    """The fields every reader relies on, with their types: a hand-edited or damaged manifest fails here, in
    one line, instead of as a KeyError deep inside training."""
    for field, kind in MANIFEST_FIELDS.items():
        if not isinstance(manifest.get(field), kind):
            found = "missing" if field not in manifest else f"a {type(manifest[field]).__name__}"
            raise FedstError(
                f"{manifest_path}: corrupt manifest (field {field!r} is {found}, expected a {kind.__name__})"
            )
    numbers = {
        "params.patch_px": manifest["params"].get("patch_px"),
        "counts.spots": manifest["counts"].get("spots"),
        "counts.tiles": manifest["counts"].get("tiles"),
    }
    for field, value in numbers.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FedstError(
                f"{manifest_path}: corrupt manifest (field {field!r} is {value!r}, expected an integer >= 0)"
            )


def check_array_file(path: Path, n_rows: int, patch_px: int) -> None:
    """FedstError naming ``path`` unless it is a .npy of uint8 (n_rows, P, P, 3) whose data is all on disk.

    Only the header is read, so opening a store stays free; a truncated file would otherwise surface as
    numpy's "mmap length is greater than file size" when training first touches it."""
    expected = (int(n_rows), int(patch_px), int(patch_px), 3)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            if version not in readers:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran, dtype = readers[version](handle)
            offset = handle.tell()
    except (OSError, ValueError, SyntaxError) as exc:
        raise FedstError(f"{path}: unreadable or corrupt array (expected a .npy file: {exc})") from None
    if tuple(shape) != expected or dtype != np.uint8 or fortran:
        raise FedstError(
            f"{path}: array of shape {tuple(shape)} {dtype} does not match the manifest (expected {expected} uint8)"
        )
    size, needed = path.stat().st_size, offset + int(np.prod(expected))
    if size < needed:
        raise FedstError(f"{path}: truncated array ({size} of {needed} bytes on disk; store modified or corrupt)")


class PatchStore:
    """Read-only view of a store. Arrays are memory-mapped: opening costs nothing, reads touch only used rows."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        check_array_file(self.path / PATCHES, self.n_spots, self.patch_px)
        check_array_file(self.path / TILES, self.n_tiles, self.patch_px)

    @classmethod
    def open(cls, path: str | os.PathLike) -> PatchStore:
        return cls(path)

    @cached_property
    def patches(self) -> np.ndarray:
        return np.load(self.path / PATCHES, mmap_mode="r")

    @cached_property
    def tiles(self) -> np.ndarray:
        return np.load(self.path / TILES, mmap_mode="r")

    @cached_property
    def tile_table(self) -> pd.DataFrame:
        import pandas as pd

        try:
            return pd.read_csv(self.path / TILE_TABLE, dtype={keys.SECTION: str})
        except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
            raise FedstError(f"{self.path / TILE_TABLE}: unreadable tile table ({type(exc).__name__}: {exc})") from None

    @cached_property
    def spots(self) -> anndata.AnnData:
        import anndata

        try:
            return anndata.read_h5ad(self.path / SPOTS)
        except Exception as exc:  # h5py/anndata raise OSError, KeyError, ValueError on a broken file
            raise FedstError(
                f"{self.path / SPOTS}: unreadable or corrupt .h5ad ({type(exc).__name__}: {exc})"
            ) from None

    @property
    def panel(self) -> list[str]:
        return list(self.manifest["panel"])

    @property
    def patch_px(self) -> int:
        return int(self.manifest["params"]["patch_px"])

    @property
    def n_spots(self) -> int:
        return int(self.manifest["counts"]["spots"])

    @property
    def n_tiles(self) -> int:
        return int(self.manifest["counts"]["tiles"])

    @property
    def sections(self) -> list[str]:
        return list(self.manifest["sections"])

    @property
    def synthetic(self) -> bool:
        return bool(self.manifest.get("synthetic", False))

    def verify(self) -> None:
        """Recompute every checksum; FedstError names the first file that differs from the manifest."""
        for name, expected in self.manifest["files"].items():
            actual = sha256_file(self.path / name)
            if actual != expected:
                raise FedstError(f"{self.path / name}: checksum mismatch (store modified or corrupt)")

    def describe(self) -> dict[str, Any]:
        """The JSON that `fedst data inspect STORE --json` prints."""
        return {
            "kind": "store",
            "path": str(self.path),
            "spots": self.n_spots,
            "genes": len(self.panel),
            "tiles": self.n_tiles,
            "patch_px": self.patch_px,
            "sections": self.sections,
            "synthetic": self.synthetic,
            "format_version": self.manifest["format_version"],
            "params": self.manifest["params"],
            "provenance": self.manifest.get("provenance", {}),
        }

    def __repr__(self) -> str:
        return f"PatchStore({str(self.path)!r}, spots={self.n_spots}, tiles={self.n_tiles}, px={self.patch_px})"


class StoreWriter:
    """Context manager that builds a store in a hidden temporary directory and renames it into place.

    Usage::

        with StoreWriter(out, patch_px=64) as writer:
            patches = writer.allocate_patches(n_spots)   # memory-mapped, fill in place
            tiles = writer.allocate_tiles(n_tiles)
            writer.set_tile_table(table)                 # DataFrame: section, x, y
            writer.set_spots(adata)                      # X normalised, layers counts/measured, obs section
            writer.manifest.update(params=..., provenance=..., synthetic=False)
        # here the store exists at `out`, complete, or not at all (on exception)
    """

    def __init__(self, out: str | os.PathLike, patch_px: int, overwrite: bool = True):
        self.out = Path(out).absolute()
        self.patch_px = int(patch_px)
        self.overwrite = overwrite
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.manifest: dict[str, Any] = {"params": {}, "provenance": {}, "synthetic": False}
        self._patches: np.ndarray | None = None
        self._tiles: np.ndarray | None = None
        self._tile_table: pd.DataFrame | None = None
        self._spots: anndata.AnnData | None = None

    def __enter__(self) -> StoreWriter:
        if self.out.exists() and not self.overwrite:
            raise FedstError(f"{self.out}: already exists (pass overwrite to replace it)")
        if self.out.exists() and not is_store(self.out) and any(self.out.iterdir()):
            if has_manifest(self.out):  # a store whose manifest is damaged: say so, rather than "not a store"
                try:
                    read_manifest(self.out)
                except FedstError as exc:
                    raise FedstError(f"{exc}; refusing to replace {self.out} (remove it to rebuild)") from None
            raise FedstError(f"{self.out}: exists and is not a fedst store; refusing to replace it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self

    def _allocate(self, name: str, n: int) -> np.ndarray:
        return np.lib.format.open_memmap(
            self.tmp / name, mode="w+", dtype=np.uint8, shape=(int(n), self.patch_px, self.patch_px, 3)
        )

    def allocate_patches(self, n_spots: int) -> np.ndarray:
        self._patches = self._allocate(PATCHES, n_spots)
        return self._patches

    def allocate_tiles(self, n_tiles: int) -> np.ndarray:
        self._tiles = self._allocate(TILES, n_tiles)
        return self._tiles

    def set_tile_table(self, table: pd.DataFrame) -> None:
        self._tile_table = table

    def set_spots(self, spots: anndata.AnnData) -> None:
        self._spots = spots

    def _finish(self) -> None:
        import pandas as pd

        if self._patches is None:
            self.allocate_patches(0)
        if self._tiles is None:
            self.allocate_tiles(0)
        assert self._patches is not None and self._tiles is not None
        if self._spots is None:
            raise FedstError("store writer: no spot table was set")
        spots = self._spots
        if spots.n_obs != len(self._patches):
            raise FedstError(f"store writer: {spots.n_obs} spots but {len(self._patches)} patches")
        if keys.SECTION not in spots.obs:
            raise FedstError(f"store writer: spot table lacks obs[{keys.SECTION!r}]")
        table = self._tile_table
        if table is None:
            table = pd.DataFrame({keys.SECTION: pd.Series(dtype=str), "x": [], "y": []})
        if len(table) != len(self._tiles):
            raise FedstError(f"store writer: {len(table)} tile rows but {len(self._tiles)} tiles")
        self._patches.flush()
        self._tiles.flush()
        del self._patches, self._tiles
        table.to_csv(self.tmp / TILE_TABLE, index=False)
        spots.write_h5ad(self.tmp / SPOTS)
        sections = list(dict.fromkeys([*spots.obs[keys.SECTION].astype(str), *table[keys.SECTION].astype(str)]))
        self.manifest.update(
            format=FORMAT_NAME,
            format_version=FORMAT_VERSION,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            panel=[str(g) for g in spots.var_names],
            sections=sections,
            counts={"spots": int(spots.n_obs), "tiles": int(len(table))},
            files={name: sha256_file(self.tmp / name) for name in DATA_FILES},
        )
        self.manifest["params"]["patch_px"] = self.patch_px
        (self.tmp / MANIFEST).write_text(json.dumps(self.manifest, indent=2, default=json_default))

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            trash = None
            if self.out.exists():
                trash = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(self.out, trash)
            os.rename(self.tmp, self.out)
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
