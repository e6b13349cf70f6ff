"""Synthesis of image-gene pairs from an adapted site model, written as a (synthetic) patch store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from shared import keys
from shared.c2l import checkpoint
from shared.c2l.central import CentralDiffusion
from shared.c2l.data import expression_and_mask
from shared.c2l.modulation import ConditionedDiffusion, load_adapter
from shared.c2l.progress import StepBar
from shared.c2l.sampling import sample_conditioned
from shared.c2l.schedule import DEFAULT_STEPS, to_uint8
from shared.c2l.train import default_device
from shared.diffusion import SAMPLERS
from shared.errors import FedstError
from shared.store.format import PatchStore, StoreWriter

PERTURBATIONS = ("none", "mixup", "noise")


def draw_conditions(
    store: PatchStore, n: int, *, perturb: str = "none", seed: int = 0, noise_scale: float = 0.1
) -> dict[str, Any]:
    """n conditioning vectors from the store's real spots, optionally perturbed.

    mixup: convex combination of two spots of the same section (mask = both measured; position interpolated);
    noise: Gaussian noise scaled per gene by `noise_scale` * the gene's std, clipped at 0, mask kept.
    """
    if perturb not in PERTURBATIONS:
        raise FedstError(f"unknown perturbation {perturb!r}; expected one of {', '.join(PERTURBATIONS)}")
    if store.n_spots == 0:
        raise FedstError(f"{store.path}: store has no paired spots to draw conditions from")
    rng = np.random.default_rng(seed)
    expression, mask = expression_and_mask(store)
    spots = store.spots
    sections = spots.obs[keys.SECTION].astype(str).to_numpy()
    coords = (
        np.asarray(spots.obsm[keys.SPATIAL], dtype=np.float64)
        if keys.SPATIAL in spots.obsm
        else np.zeros((store.n_spots, 2))
    )
    src = rng.integers(0, store.n_spots, n)
    e, m, xy = expression[src].copy(), mask[src].copy(), coords[src].copy()
    partner = src.copy()
    lam = np.ones(n)
    if perturb == "mixup":
        by_section = {s: np.flatnonzero(sections == s) for s in np.unique(sections)}
        partner = np.array([rng.choice(by_section[sections[i]]) for i in src])
        lam = rng.uniform(size=n)
        e = lam[:, None] * e + (1 - lam[:, None]) * expression[partner]
        m = m * mask[partner]
        e *= m
        xy = lam[:, None] * xy + (1 - lam[:, None]) * coords[partner]
    elif perturb == "noise":
        std = expression.std(0, keepdims=True)
        e = np.clip(e + rng.normal(size=e.shape) * noise_scale * std, 0, None) * m
    return {
        "expression": e.astype(np.float32),
        "mask": m.astype(np.float32),
        "source": src,
        "partner": partner,
        "lambda": lam,
        "section": sections[src],
        "spatial": xy,
    }


def synthesize(
    central: CentralDiffusion,
    adapter: ConditionedDiffusion | str | Path,
    store: PatchStore,
    n: int,
    out: str | Path,
    *,
    sampler: str = "dpm",
    steps: int | None = None,
    guidance: float = 1.5,
    seed: int = 0,
    perturb: str = "none",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    on_advance: Callable[[int, int], None] | None = None,
) -> PatchStore:
    """Generate n (image, expression) pairs conditioned on `store`'s spots and write them as a synthetic store.

    `on_advance(done, n)` runs after each batch, with the progress bar on or off (a federated site's progress
    record, shared.progress)."""
    import anndata
    import pandas as pd

    if n < 1:
        raise FedstError(f"synthesize: n must be >= 1, got {n}")
    if sampler not in SAMPLERS:
        raise FedstError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    model = adapter if isinstance(adapter, ConditionedDiffusion) else load_adapter(central, adapter)
    if model.central is not central and model.central.weights_hash() != central.weights_hash():
        raise FedstError("synthesize: the adapter was trained on different central weights than the one given")
    if model.panel != store.panel:
        raise FedstError(
            f"{store.path}: gene panel ({len(store.panel)} genes) differs from the adapter's panel "
            f"({len(model.panel)} genes)"
        )
    steps = int(steps or DEFAULT_STEPS[sampler])
    dev = default_device(device)
    model.to(dev).eval()
    cond = draw_conditions(store, n, perturb=perturb, seed=seed)
    px = central.sample_size
    images = np.empty((n, px, px, 3), dtype=np.uint8)
    with StepBar(n, f"synthesize ({sampler}, {steps} steps)", progress, on_advance) as bar:
        for b, lo in enumerate(range(0, n, batch_size)):
            hi = min(n, lo + batch_size)
            x = sample_conditioned(
                model,
                torch.from_numpy(cond["expression"][lo:hi]),
                torch.from_numpy(cond["mask"][lo:hi]),
                sampler=sampler,
                steps=steps,
                guidance=guidance,
                seed=seed * 100003 + b,
                device=dev,
            )
            images[lo:hi] = to_uint8(x)
            bar.advance(hi)
    model.to("cpu")

    source_ids = store.spots.obs_names.to_numpy()
    obs = pd.DataFrame(
        {
            keys.SECTION: [f"{s}-synthetic" for s in cond["section"]],
            keys.PATCH_INDEX: np.arange(n),
            keys.SYNTHETIC: True,
            "source_section": cond["section"],
            "source_spot": source_ids[cond["source"]],
            "partner_spot": source_ids[cond["partner"]],
            "mix_lambda": cond["lambda"],
        },
        index=[f"syn{i}" for i in range(n)],
    )
    pseudo_counts = np.expm1(cond["expression"]).astype(np.float32)
    spots = anndata.AnnData(
        X=cond["expression"],
        obs=obs,
        var=pd.DataFrame(index=store.panel),
        layers={keys.COUNTS: pseudo_counts, keys.MEASURED: cond["mask"]},
        obsm={keys.SPATIAL: cond["spatial"]},
    )
    if keys.MPP in store.spots.uns:
        mpp = store.spots.uns[keys.MPP]
        spots.uns[keys.MPP] = {f"{k}-synthetic": v for k, v in mpp.items()} if isinstance(mpp, dict) else mpp
    provenance = {
        "generator": "fedst c2l synthesize",
        "central_hash": central.weights_hash(),
        "adapter_hash": checkpoint.weights_hash(model.modulation.state_dict()),
        "source_store": str(store.path),
        "seed": seed,
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "perturb": perturb,
        "dp_epsilon": model.info.get("epsilon"),
        "dp_delta": model.info.get("delta"),
        "counts_layer": "expm1 of the conditioning expression (pseudo-counts per 10k), not measured counts",
    }
    with StoreWriter(out, patch_px=px) as writer:
        writer.allocate_patches(n)[:] = images
        writer.set_spots(spots)
        writer.manifest.update(
            synthetic=True, provenance=provenance, params={"source_patch_px": store.patch_px, "n": n}
        )
    return PatchStore(out)
