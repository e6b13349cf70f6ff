"""Test helpers (plain functions and constants; fixtures and hooks live in conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FEDST_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


def shared_path(*parts: str) -> Path:
    """Path under ../shared/data (or $FEDST_SHARED_DATA); skips the calling test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (../shared/data is absent)")
    return path


# -- other on-disk formats derived from a generated section (shared.synthetic writes HEST-style h5ad + TIFF) --
def legacy_st_tables(adata):
    """A section as legacy-ST tables: counts (spots x genes, index "<x>x<y>") and the spot table
    (x = array column, y = array row, pixel_x/pixel_y = obsm spatial), in the same spot order."""
    import pandas as pd

    x, y = adata.obs["array_col"].to_numpy(), adata.obs["array_row"].to_numpy()
    ids = [f"{a}x{b}" for a, b in zip(x, y)]
    counts = pd.DataFrame(np.asarray(adata.X), index=ids, columns=list(adata.var_names)).astype(int)
    xy = np.asarray(adata.obsm["spatial"])
    spots = pd.DataFrame({"x": x, "y": y, "pixel_x": xy[:, 0], "pixel_y": xy[:, 1]})
    return counts, spots


def write_plain_jpeg(rgb: np.ndarray, path: Path) -> Path:
    """A plain JPEG carrying no resolution (as a phone or a slide export writes it)."""
    from PIL import Image

    Image.fromarray(rgb).save(path, quality=90)
    return path


def write_visium_outs(adata, rgb: np.ndarray, folder: Path, mpp: float) -> Path:
    """A Space Ranger ``outs/`` folder for a section: the v3 filtered_feature_bc_matrix.h5, the headerless
    tissue_positions_list.csv, scalefactors_json.json (spot diameter from ``mpp``) and a hires PNG at scale 1."""
    import h5py
    import scipy.sparse as sp
    from PIL import Image

    spatial = folder / "spatial"
    spatial.mkdir(parents=True)
    csr = sp.csr_matrix(np.asarray(adata.X, dtype=np.int32))  # cells x genes CSR == genes x cells CSC
    with h5py.File(folder / "filtered_feature_bc_matrix.h5", "w") as handle:
        group = handle.create_group("matrix")
        group["data"], group["indices"], group["indptr"] = csr.data, csr.indices, csr.indptr
        group["shape"] = np.array([adata.n_vars, adata.n_obs])
        group["barcodes"] = np.array(list(adata.obs_names), dtype="S")
        group["features/name"] = np.array(list(adata.var_names), dtype="S")
        group["features/id"] = np.array(list(adata.var["gene_ids"]), dtype="S")
        group["features/feature_type"] = np.array(["Gene Expression"] * adata.n_vars, dtype="S")
    xy = np.asarray(adata.obsm["spatial"])
    rows = [
        f"{barcode},1,{r},{c},{py:.2f},{px:.2f}"
        for barcode, r, c, (px, py) in zip(adata.obs_names, adata.obs["array_row"], adata.obs["array_col"], xy)
    ]
    (spatial / "tissue_positions_list.csv").write_text("\n".join(rows) + "\n")
    factors = {"spot_diameter_fullres": 55.0 / mpp, "tissue_hires_scalef": 1.0, "tissue_lowres_scalef": 0.5}
    (spatial / "scalefactors_json.json").write_text(json.dumps(factors))
    Image.fromarray(rgb).save(spatial / "tissue_hires_image.png")
    return folder


# -- the federation tests' consortium of small toy stores ------------------------------------------------------
TOY_PANEL = [f"G{i}" for i in range(6)]
TOY_SIZES = [(24, 16), (30, 8), (18, 20)]  # (spots, tiles) per site: num-examples 40, 38, 38


def write_toy_consortium(root: Path, sizes=TOY_SIZES) -> list[Path]:
    """One fully measured toy patch store per site (16 px) under ``root/site-<i>``; returns their paths."""
    from shared.c2l.toy import write_toy_store

    paths = [Path(root) / f"site-{i}" for i in range(len(sizes))]
    for i, ((spots, tiles), path) in enumerate(zip(sizes, paths)):
        write_toy_store(
            path, n_spots=spots, n_tiles=tiles, panel=TOY_PANEL, patch_px=16, seed=i, missing_gene_in_section_b=False
        )
    return paths


def toy_config(out: Path, **overrides) -> dict:
    """The federation tests' run config: the toy backend at a few steps, the run directory under ``out/runs/r``.
    Written with the legacy flat keys on purpose (they are a supported interface: shared/config/legacy.py)."""
    config = {
        "backend": "toy",
        "patch-px": 16,
        "rounds-pretrain": 2,
        "local-steps": 2,
        "adapt-steps": 2,
        "synthetic-count": 8,
        "out-dir": str(Path(out) / "runs"),
        "run-name": "r",
        "lr": 1e-3,
    }
    config.update(overrides)
    return config


def write_flower_app(folder: Path, module: str, source: str, config: dict) -> Path:
    """A one-module Flower app (``<module>:server`` / ``<module>:client``) with its run ``config``, for the
    deployment tests that need a small app of their own instead of fedst's."""
    from shared.tomlio import value

    folder.mkdir(parents=True)
    (folder / f"{module}.py").write_text(source)
    settings = "\n".join(f"{key} = {value(v)}" for key, v in config.items())
    (folder / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{module}"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "fedst"

[tool.flwr.app.components]
serverapp = "{module}:server"
clientapp = "{module}:client"

[tool.flwr.app.config]
{settings}
"""
    )
    return folder
