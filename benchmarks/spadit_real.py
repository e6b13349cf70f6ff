"""Real check of SpaDiT imputation against the kNN baseline, in the same run, on ../shared/data/sc-spatial.

For each dataset and seed a fraction of the shared genes is held out of the spatial side; both methods
impute them from the reference; PCC (per gene across spots, mean over held-out genes), SSIM, RMSE and JS
come from shared.downstream.metrics. Prints a table (mean ± sd over seeds), the SpaDiT/kNN PCC ratio, and
writes all numbers as JSON.

    python benchmarks/spadit_real.py [--datasets merfish_hypothalamus visium_hippocampus] [--seeds 0 1 2]
        [--holdout 0.2] [--preset tiny] [--epochs N] [--device cpu] [--no-spot-prior] [--out spadit_real.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = Path(os.environ.get("FEDST_SHARED_DATA", REPO.parent / "shared" / "data")) / "sc-spatial"
METRICS = ("pcc", "ssim", "rmse", "js_divergence")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--datasets", nargs="+", default=["merfish_hypothalamus", "visium_hippocampus"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--holdout", type=float, default=0.2)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--no-spot-prior",
        action="store_true",
        help="ablation: SpaDiT without the kNN-carried spot prior channel (the paper's inputs only)",
    )
    parser.add_argument(
        "--no-residual",
        action="store_true",
        help="ablation: generate the ST z-scores from noise instead of the residual over the kNN prior",
    )
    parser.add_argument("--prior-k", type=int, default=None, help="fix the prior's k (default: chosen on val genes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("spadit_real.json"))
    parser.add_argument("--maps", type=Path, default=None, help="folder for one maps PNG per dataset (seed 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    from shared.downstream.spadit.loaders import load_sc_spatial
    from shared.downstream.spadit.pipeline import run_imputation

    if not args.data.is_dir():
        sys.exit(f"data folder {args.data} is absent (../shared/data/sc-spatial)")
    rows = []
    for name in args.datasets:
        st, sc = load_sc_spatial(args.data / name)
        for seed in args.seeds:
            t0 = time.perf_counter()
            result = run_imputation(
                st,
                sc,
                holdout_fraction=args.holdout,
                preset=args.preset,
                epochs=args.epochs,
                seed=seed,
                n_samples=args.samples,
                steps=args.steps,
                device=args.device,
                model_overrides={"spot_prior": False} if args.no_spot_prior else None,
                progress=False,
                residual=not args.no_residual,
                prior_k=args.prior_k,
            )
            wall = time.perf_counter() - t0
            t = result.timings
            rows.append(
                {
                    "dataset": name,
                    "seed": seed,
                    "n_spots": st.n_obs,
                    "n_cells": sc.n_obs,
                    "n_test_genes": len(result.genes),
                    "n_train_genes": len(result.train_genes),
                    "metrics": result.metrics,
                    "timings": t,
                    "wall_s": wall,
                    "params": result.params,
                }
            )
            print(
                f"{name} seed {seed}: "
                + "  ".join(f"{m} pcc={result.metrics[m]['pcc']:.3f}" for m in ("spadit", "knn"))
                + f"  (spadit {t['spadit_train_s'] + t['spadit_sample_s']:.1f}s, knn {t['knn_s']:.2f}s;"
                + f" prior k {result.params['prior_k']}, blend {result.params['blend']})",
                flush=True,
            )
            if args.maps is not None and seed == args.seeds[0]:
                from shared.downstream.spadit.output import write_result

                args.maps.mkdir(parents=True, exist_ok=True)
                write_result(result, st, args.maps / f"{name}.h5ad")

    print(
        f"\nheld-out fraction {args.holdout}, seeds {args.seeds}, preset {args.preset}, device {args.device}"
        f"{', no spot prior' if args.no_spot_prior else ''}{', no residual' if args.no_residual else ''}"
    )
    print("knn = the baseline (k=10); knn_val_k = SpaDiT's prior alone (kNN, k chosen on validation genes)")
    header = f"| dataset | method | {' | '.join(METRICS)} | time (s) |"
    print(header)
    print("|" + "---|" * (len(METRICS) + 3))
    summary = {}
    for name in args.datasets:
        mine = [r for r in rows if r["dataset"] == name]
        for method in ("spadit", "knn", "knn_val_k"):
            cells = []
            for metric in METRICS:
                v = np.array([r["metrics"][method][metric] for r in mine])
                cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
                summary.setdefault(name, {}).setdefault(method, {})[metric] = [float(v.mean()), float(v.std())]
            secs = np.array(
                [
                    r["timings"]["spadit_train_s"] + r["timings"]["spadit_sample_s"]
                    if method == "spadit"
                    else r["timings"]["knn_s"]
                    for r in mine
                ]
            )
            summary[name][method]["time_s"] = float(secs.mean())
            print(f"| {name} | {method} | {' | '.join(cells)} | {secs.mean():.2f} |")
        ratio = summary[name]["spadit"]["pcc"][0] / max(summary[name]["knn"]["pcc"][0], 1e-12)
        summary[name]["pcc_ratio_spadit_over_knn"] = ratio
    for name in args.datasets:
        print(f"{name}: PCC ratio SpaDiT / kNN = {summary[name]['pcc_ratio_spadit_over_knn']:.2f}")
    args.out.write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "summary": summary, "runs": rows},
            indent=2,
            default=float,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
