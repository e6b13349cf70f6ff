"""Writing an imputation run: AnnData of the imputed genes on the ST spots, metrics JSON, PNG figures."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared import keys
from shared.io import write_json_atomic

if TYPE_CHECKING:
    from anndata import AnnData

    from shared.downstream.spadit.pipeline import ImputationResult


def _jsonable(obj):
    """Plain JSON/h5ad-safe values: numpy scalars to Python, None dropped from dicts."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def result_adata(result: ImputationResult, st: AnnData) -> AnnData:
    """Imputed genes as AnnData: X = layers[PREDICTED] = SpaDiT, layers[keys.PREDICTED_BASELINE] = kNN,
    layers[NORMALISED] = measured truth (0 where not measured) with layers[MEASURED] as its mask."""
    import anndata as ad
    import pandas as pd

    spadit = result.predictions["spadit"].astype(np.float32)
    mask = np.broadcast_to(result.has_truth[None, :], spadit.shape).astype(np.float32)
    out = ad.AnnData(
        X=spadit.copy(),
        obs=st.obs.copy(),
        var=pd.DataFrame({"measured_on_spatial": result.has_truth}, index=result.genes),
    )
    out.layers[keys.PREDICTED] = spadit
    out.layers[keys.PREDICTED_BASELINE] = result.predictions["knn"].astype(np.float32)
    out.layers[keys.NORMALISED] = np.nan_to_num(result.truth, nan=0.0).astype(np.float32)
    out.layers[keys.MEASURED] = mask
    for key, value in st.obsm.items():
        out.obsm[key] = np.asarray(value)
    for key in (keys.MPP, keys.PROVENANCE):
        if key in st.uns:
            out.uns[key] = st.uns[key]
    out.uns[keys.SPADIT] = _jsonable(
        {
            "params": result.params,
            "metrics": result.metrics,
            "timings": result.timings,
            "train_genes": result.train_genes,
        }
    )
    return out


def write_result(result: ImputationResult, st: AnnData, out: str | Path) -> dict[str, Path]:
    """OUT.h5ad plus OUT.metrics.json, OUT.maps.png (truth | SpaDiT | kNN) and OUT.loss.png beside it."""
    from shared.downstream.spadit.plots import spatial_maps, training_curve

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    adata = result_adata(result, st)
    adata.write_h5ad(path)
    stem = path.with_suffix("")
    written = {"h5ad": path}
    report = {
        "genes": result.genes,
        "measured_on_spatial": [bool(v) for v in result.has_truth],
        "metrics": result.metrics,
        "per_gene": result.per_gene,
        "timings": result.timings,
        "params": result.params,
    }
    written["metrics"] = Path(f"{stem}.metrics.json")
    write_json_atomic(written["metrics"], _jsonable(report))
    if keys.SPATIAL in st.obsm:
        order = np.argsort(~result.has_truth, kind="stable")  # genes with truth first
        panels = {
            "truth": result.truth[:, order],
            "SpaDiT": result.predictions["spadit"][:, order],
            "kNN baseline": result.predictions["knn"][:, order],
        }
        written["maps"] = spatial_maps(
            f"{stem}.maps.png",
            st.obsm[keys.SPATIAL],
            [result.genes[i] for i in order],
            panels,
            title="held-out genes: measured vs imputed (each panel on its own colour range)",
        )
    written["loss"] = training_curve(f"{stem}.loss.png", result.history.train_loss, result.history.val_loss)
    return written
