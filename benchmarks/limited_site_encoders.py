"""Real-only vs real+synthetic held-out PCC per site, for several downstream encoders, on finished demo runs.

    python benchmarks/limited_site_encoders.py fedst-demo [fedst-demo-seed1 ...] [--encoders stats,stats_colour]

Re-trains the downstream phase's predictor (the product's `train_predictor` on each site's labelled rows, plus its
synthetic store for the augmented arm) from each site's work dir of a finished `fedst demo --out DIR`, with every
encoder named, and scores it on the site's held-out section exactly as the federation's downstream phase does. The
generator's work (pretraining, adaptation, synthesis) is not redone: the comparison isolates the encoder, i.e. the
feature space in which the predictor learns from the synthetic pairs. Prints one row per run, site and encoder and
the mean gain at the data-limited site; `--out FILE.json` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from shared import keys
from shared.downstream.predictor import evaluate_predictor, train_predictor
from shared.splits import downstream_held_out
from shared.store.format import PatchStore, is_store

SCORES = ("pcc_per_slide_mean", "ssc", "gsc")


def site_dirs(demo: Path) -> list[Path]:
    return sorted(p for p in demo.glob("sites/*/site-*") if is_store(p / "store") and is_store(p / "synthetic-store"))


def labelled_rows(site: Path, store: PatchStore) -> np.ndarray:
    """The rows the site's downstream phase trained on: its paired store's spots (the labelled ones) outside the
    held-out section (client/site.py, SiteTask.labelled_rows)."""
    sections = store.spots.obs[keys.SECTION].astype(str).to_numpy()
    held_out = downstream_held_out(sections)
    paired = PatchStore(site / "paired-store") if is_store(site / "paired-store") else store
    names = store.spots.obs_names.to_numpy()
    return np.flatnonzero(np.isin(names, paired.spots.obs_names.to_numpy()) & (sections != held_out))


def score_site(site: Path, encoder: str, seed: int = 0) -> dict[str, dict[str, float]]:
    store, synthetic = PatchStore(site / "store"), PatchStore(site / "synthetic-store")
    rows = labelled_rows(site, store)
    held_out = downstream_held_out(store.spots.obs[keys.SECTION].astype(str).to_numpy())
    out = {}
    for arm, extra in (("real", []), ("augmented", [synthetic])):
        model = train_predictor(
            [store], "ridge", encoder, extra_stores=extra, seed=seed, progress=False, spot_indices={store: rows}
        )
        metrics = evaluate_predictor(model, store, sections=[held_out])
        out[arm] = {k: float(metrics[k]) for k in SCORES if metrics.get(k) is not None}
    out["labelled_spots"] = {"n": float(len(rows))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demos", nargs="+", type=Path, help="folders of finished `fedst demo --out` runs")
    parser.add_argument("--encoders", default="stats,stats_colour", help="comma-separated encoder names")
    parser.add_argument("--limited-site", default="site-0", help="the data-limited site's name")
    parser.add_argument("--out", type=Path, help="write the numbers as JSON")
    args = parser.parse_args()
    encoders = [e for e in args.encoders.split(",") if e]
    table: dict[str, dict[str, dict[str, dict]]] = {}
    print(f"{'run':28s} {'site':7s} {'spots':>5s} " + " ".join(f"{e + ' real -> +syn (gain)':>34s}" for e in encoders))
    for demo in args.demos:
        for site in site_dirs(demo):
            scores = {e: score_site(site, e) for e in encoders}
            table.setdefault(str(demo), {})[site.name] = scores
            cells = []
            for e in encoders:
                real, aug = scores[e]["real"]["pcc_per_slide_mean"], scores[e]["augmented"]["pcc_per_slide_mean"]
                cells.append(f"{real:.3f} -> {aug:.3f} ({aug - real:+.3f})".rjust(34))
            n = int(scores[encoders[0]]["labelled_spots"]["n"])
            print(f"{demo.name[:28]:28s} {site.name:7s} {n:5d} " + " ".join(cells), flush=True)
    for e in encoders:
        limited = [sites[args.limited_site][e] for sites in table.values() if args.limited_site in sites]
        if limited:
            real = np.array([s["real"]["pcc_per_slide_mean"] for s in limited])
            aug = np.array([s["augmented"]["pcc_per_slide_mean"] for s in limited])
            print(
                f"{e}: {args.limited_site} over {len(limited)} run(s): real-only {real.mean():.3f}, "
                f"real+synthetic {aug.mean():.3f}, gain {np.mean(aug - real):+.3f} (min {np.min(aug - real):+.3f})"
            )
    if args.out:
        args.out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
