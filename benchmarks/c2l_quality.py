"""Central model sample quality against pretraining budget, for several training recipes on the same data.

Trains each recipe once on the tiles of a generated 3-site consortium and snapshots the weights (raw and EMA)
at wall-clock budgets and/or step counts; each snapshot is sampled with each sampler and scored against the
sites' held-out spot patches (never trained on): KID in the audit's colour/texture feature space
(shared.c2l.audit, floor = KID of as many real training tiles), the nuclei (haematoxylin) pixel fraction and
stain statistics. Writes results.json, curve.png, one sample grid per recipe and one per final snapshot, and
prints a table with KID ratios against the baseline recipe (`ddpm`) at the same snapshot index.

Wall time on a shared box is noisy: compare at equal steps (`--at-steps`), and read `load` beside timings.

nice -n 10 python benchmarks/c2l_quality.py --work /tmp/q --minutes 1,2,5,10
python benchmarks/c2l_quality.py --work /tmp/q --minutes "" --at-steps 100,200 --n-samples 64   # short run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.c2l.audit import image_features, kid
from shared.c2l.central import create_central
from shared.c2l.ema import create_ema
from shared.c2l.plots import image_grid
from shared.c2l.sampling import sample_central
from shared.c2l.schedule import to_uint8
from shared.c2l.train import train_central
from shared.store.format import PatchStore

# recipe -> train_central keywords; EDM models are sampled by the EDM counterparts of the samplers
RECIPES: dict[str, dict[str, Any]] = {
    "ddpm": {},
    "min_snr": {"loss_weighting": "min_snr", "min_snr_gamma": 5.0},
    "edm": {"parametrization": "edm"},
}
EDM_SAMPLER = {"dpm": "edm_dpm", "ddim": "edm_euler"}
# Ruifrok & Johnston H&E(-DAB) stain vectors (rows: haematoxylin, eosin, DAB) in optical density
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def optical_density(images: np.ndarray) -> np.ndarray:
    return -np.log10(np.maximum(images.astype(np.float64), 1.0) / 255.0).reshape(-1, 3)


def haematoxylin(images: np.ndarray) -> np.ndarray:
    """Per-pixel haematoxylin optical density (colour deconvolution), flattened."""
    return (optical_density(images) @ np.linalg.inv(RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1)[:, None]))[:, 0]


def otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def stain_stats(images: np.ndarray, h_threshold: float) -> dict[str, Any]:
    """Nuclei pixel fraction (haematoxylin OD above the real patches' Otsu threshold), RGB and OD statistics."""
    rgb = images.reshape(-1, 3).astype(np.float64)
    od = optical_density(images)
    return {
        "nuclei_fraction": float((haematoxylin(images) > h_threshold).mean()),
        "rgb_mean": rgb.mean(0).round(2).tolist(),
        "rgb_std": rgb.std(0).round(2).tolist(),
        "od_mean": od.mean(0).round(4).tolist(),
    }


def load_data(work: Path, sites: int) -> tuple[list[PatchStore], np.ndarray]:
    """The generated consortium's stores (made once under `work`) and their spot patches as held-out reals."""
    from shared.store.prepare import prepare_store
    from shared.synthetic import generate_consortium

    consortium = work / "consortium"
    if not (consortium / "panel.txt").is_file():
        generate_consortium(consortium, n_sites=sites, seed=0)
    stores = []
    for i in range(sites):
        path = work / "stores" / f"site-{i}"
        store = PatchStore(path) if (path / "manifest.json").is_file() else None
        stores.append(store or prepare_store(consortium / f"site-{i}" / "site.toml", path, patch_px=32, progress=False))
    held_out = np.concatenate([np.asarray(s.patches) for s in stores])
    return stores, held_out


def train_recipe(name: str, stores, args, minutes: list[float], at_steps: list[int], on_snapshot) -> dict:
    """Train one recipe; at each budget `on_snapshot(snapshot)` scores the raw and EMA weights right away.

    The scoring time is excluded from the snapshot's training seconds (so a snapshot's wall time is what the
    training alone took); training stops after the last budget.
    """
    torch.manual_seed(args.seed)
    model = create_central("tiny", **model_overrides(args))
    ema = create_ema(model, args.ema_decay)
    budgets = sorted(m * 60 for m in minutes)
    steps_left = sorted(at_steps)
    paused = [0.0]

    def on_step(step: int, seconds: float) -> bool:
        trained = seconds - paused[0]
        hit = []
        while budgets and trained >= budgets[0]:
            hit.append(f"{budgets.pop(0) / 60:g}min")
        while steps_left and step >= steps_left[0]:
            hit.append(f"{steps_left.pop(0)}steps")
        if hit:
            start = time.perf_counter()
            on_snapshot(
                {
                    "label": "+".join(hit),
                    "steps": step,
                    "seconds": round(trained, 1),
                    "steps_per_s": round(step / trained, 3),
                    "load": [round(v, 2) for v in os.getloadavg()],
                    "raw": copy.deepcopy(model.state_dict()),
                    "ema": _ema_state(ema, model),
                }
            )
            paused[0] += time.perf_counter() - start
        return not budgets and not steps_left

    summary = train_central(
        model,
        stores,
        steps=10**7,
        batch_size=args.batch,
        lr=args.lr,
        seed=args.seed,
        device="cpu",
        ema=ema,
        progress=False,
        use_patches=False,
        on_step=on_step,
        **RECIPES[name],
    )
    seconds = summary["seconds"] - paused[0]
    return {"steps": summary["steps"], "seconds": seconds, "steps_per_s": summary["steps"] / seconds}


def _ema_state(ema, model) -> dict[str, Any]:
    """The EMA weights as a state dict (a copy of ``model`` with the shadow parameters), for a snapshot."""
    shadow = copy.deepcopy(model)
    ema.copy_to(shadow.parameters())
    return shadow.state_dict()


def model_overrides(args) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.channels:
        channels = [int(c) for c in args.channels.split(",")]
        overrides.update(block_out_channels=channels, norm_num_groups=min(8, min(channels) // 4))
    if args.head_dim:
        overrides["attention_head_dim"] = args.head_dim
    return overrides


def evaluate(name, snap, weights, sampler_spec, args, real_f, h_threshold) -> tuple[dict, np.ndarray]:
    sampler, steps = sampler_spec.split(":")
    if RECIPES[name].get("parametrization") == "edm":
        sampler = EDM_SAMPLER[sampler]
    model = create_central("tiny", **model_overrides(args))
    model.load_state_dict(snap[weights])
    start = time.perf_counter()
    images = to_uint8(sample_central(model, args.n_samples, sampler=sampler, steps=int(steps), seed=args.seed + 1))
    seconds = time.perf_counter() - start
    value, std = kid(real_f, image_features(images, 32), seed=args.seed)
    row = {
        "recipe": name,
        "snapshot": snap["label"],
        "steps": snap["steps"],
        "train_seconds": snap["seconds"],
        "steps_per_s": snap["steps_per_s"],
        "load": snap["load"],
        "weights": weights,
        "sampler": f"{sampler}:{steps}",
        "kid": value,
        "kid_std": std,
        "sample_seconds": round(seconds, 1),
        **stain_stats(images, h_threshold),
    }
    return row, images


def curve(rows: list[dict], floor: float, path: Path, weights: str, sampler_kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in RECIPES:
        sel = [
            r for r in rows if r["recipe"] == name and r["weights"] == weights and _kind(r["sampler"]) == sampler_kind
        ]
        if not sel:
            continue
        axes[0].plot([r["train_seconds"] / 60 for r in sel], [r["kid"] for r in sel], "o-", label=name)
        axes[1].plot([r["steps"] for r in sel], [r["kid"] for r in sel], "o-", label=name)
    for ax, xlabel in zip(axes, ("pretraining wall time (min, 2 shared cores)", "optimizer steps")):
        ax.axhline(max(floor, 1e-3), color="grey", ls="--", label="real-vs-real floor")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("KID (audit features)")
        ax.legend(fontsize=8)
    fig.suptitle(f"central model sample quality ({weights} weights, {sampler_kind} sampler)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="cache for the generated consortium and stores")
    parser.add_argument("--out", type=Path, default=None, help="default: <work>/quality")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--minutes", default="1,2,5,10", help="wall-clock snapshot budgets ('' for none)")
    parser.add_argument("--at-steps", default="", help="step-count snapshots, e.g. 250,500,1000")
    parser.add_argument("--samplers", default="ddim:20,dpm:20", help="sampler:steps list (ddim = today's)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--channels", default="", help="override the tiny preset's block_out_channels, e.g. 48,96")
    parser.add_argument("--head-dim", type=int, default=0, help="override the tiny preset's attention_head_dim")
    parser.add_argument("--n-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-models", action="store_true", help="save EMA weights of DDPM-type snapshots")
    parser.add_argument(
        "--merge", nargs="+", type=Path, default=None, help="only merge these results.json (runs of one recipe each)"
    )
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out or args.work / "quality")
        return
    torch.set_num_threads(args.threads)
    out = args.out or args.work / "quality"
    out.mkdir(parents=True, exist_ok=True)
    minutes = [float(m) for m in args.minutes.split(",") if m]
    at_steps = [int(s) for s in args.at_steps.split(",") if s]
    if not minutes and not at_steps:
        parser.error("give --minutes and/or --at-steps")
    stores, held_out = load_data(args.work, 3)
    real_f = image_features(held_out, 32)
    tiles = np.concatenate([np.asarray(s.tiles) for s in stores])
    pick = np.random.default_rng(args.seed).choice(len(tiles), min(args.n_samples, len(tiles)), replace=False)
    floor, floor_std = kid(real_f, image_features(tiles[pick], 32), seed=args.seed)
    h_threshold = otsu(haematoxylin(held_out))
    real_stats = stain_stats(held_out, h_threshold)
    result: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "load_start": os.getloadavg(),
        "n_train_tiles": int(len(tiles)),
        "n_held_out": int(len(held_out)),
        "kid_floor": floor,
        "kid_floor_std": floor_std,
        "kid_floor_def": f"KID({len(pick)} real training tiles, held-out spot patches)",
        "h_threshold": h_threshold,
        "real": real_stats,
        "training": {},
        "rows": [],
    }
    print(f"floor KID {floor:.4f} +- {floor_std:.4f}; real nuclei fraction {real_stats['nuclei_fraction']:.3f}")
    real_row = ("real held-out patches", held_out[np.random.default_rng(1).choice(len(held_out), 10, replace=False)])
    for name in args.recipes.split(","):
        grid_rows = [real_row]

        def on_snapshot(snap: dict, name: str = name, grid_rows: list = grid_rows) -> None:
            if args.save_models and RECIPES[name].get("parametrization") != "edm":  # adapt needs a DDPM model
                model = create_central("tiny", **model_overrides(args))
                model.load_state_dict(snap["ema"])
                model.save_pretrained(out / "models" / f"{name}-{snap['steps']}-ema")
            for weights in ("raw", "ema"):
                for spec in args.samplers.split(","):
                    row, images = evaluate(name, snap, weights, spec, args, real_f, h_threshold)
                    result["rows"].append(row)
                    print(
                        f"  {snap['label']:>12} {snap['steps']:>5} steps {snap['seconds']:>6.0f} s "
                        f"load {snap['load'][0]:.1f} {weights:>3} {row['sampler']:>12} "
                        f"KID {row['kid']:9.4f} nuclei {row['nuclei_fraction']:.3f}"
                    )
                    if weights == "ema":
                        grid_rows.append((f"{snap['label']} ({snap['steps']} steps) EMA {row['sampler']}", images[:10]))
            image_grid(grid_rows, out / f"samples_{name}.png", f"{name}: samples by snapshot")
            (out / "results.json").write_text(json.dumps(result, indent=1))

        summary = train_recipe(name, stores, args, minutes, at_steps, on_snapshot)
        result["training"][name] = summary
        print(f"[{name}] trained {summary['steps']} steps in {summary['seconds']:.0f} s, load {os.getloadavg()}")
    curve(result["rows"], floor, out / "curve.png", "ema", "dpm")
    curve(result["rows"], floor, out / "curve_ddim.png", "ema", "ddim")
    result["load_end"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print_table(result)


def merge(paths: list[Path], out: Path) -> None:
    """One table and curve from runs that trained recipes in separate processes (same data, floor and seed)."""
    parts = [json.loads(p.read_text()) for p in paths]
    result = dict(parts[0], rows=[r for p in parts for r in p["rows"]], merged_from=[str(p) for p in paths])
    result["training"] = {k: v for p in parts for k, v in p["training"].items()}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    curve(result["rows"], result["kid_floor"], out / "curve.png", "ema", "dpm")
    curve(result["rows"], result["kid_floor"], out / "curve_ddim.png", "ema", "ddim")
    print_table(result)


def print_table(result: dict) -> None:
    rows, floor = result["rows"], result["kid_floor"]
    base = {
        (r["snapshot"], r["weights"], r["sampler"].split(":")[1], _kind(r["sampler"])): r["kid"]
        for r in rows
        if r["recipe"] == "ddpm"
    }
    print(
        f"\nKID floor {floor:.4f} +- {result['kid_floor_std']:.4f}; "
        f"real nuclei fraction {result['real']['nuclei_fraction']:.3f}, "
        f"RGB mean {result['real']['rgb_mean']}"
    )
    print(
        f"{'recipe':>8} {'snapshot':>12} {'steps':>6} {'min':>5} {'st/s':>5} {'load1':>5} {'w':>3} "
        f"{'sampler':>12} {'KID':>9} {'-floor':>8} {'/ddpm':>6} {'nuclei':>6} rgb_mean"
    )
    for r in rows:
        b = base.get((r["snapshot"], r["weights"], r["sampler"].split(":")[1], _kind(r["sampler"])))
        ratio = f"{r['kid'] / b:6.2f}" if b else "     -"
        print(
            f"{r['recipe']:>8} {r['snapshot']:>12} {r['steps']:>6} {r['train_seconds'] / 60:5.1f} "
            f"{r['steps_per_s']:5.2f} {r['load'][0]:5.2f} {r['weights']:>3} {r['sampler']:>12} {r['kid']:9.4f} "
            f"{r['kid'] - floor:8.4f} {ratio} {r['nuclei_fraction']:6.3f} {r['rgb_mean']}"
        )


def _kind(sampler: str) -> str:
    """Pair each EDM sampler with the DDPM sampler it stands in for (edm_dpm ~ dpm, edm_euler ~ ddim)."""
    name = sampler.split(":")[0]
    return {v: k for k, v in EDM_SAMPLER.items()}.get(name, name)


if __name__ == "__main__":
    main()
