"""Real check of DRIFT: clustering ARI/NMI vs pathologist labels on her2st, with and without DRIFT.

For each labelled her2st section (A1, C1, D1, E1, F1, G2, H1): counts/<S>.tsv.gz joined to
labels/<S>_labeled_coordinates.tsv on "<round(x)>x<round(y)>" (array coordinates), spots labelled
"undetermined" dropped. Pipeline per seed (the same seeds in every arm):
normalise_total(1e4) + log1p -> [DRIFT on the log expression, all genes] -> top-2000 HVG (seurat) ->
PCA(30, random_state=seed) -> KMeans(k = number of labels, n_init=10, random_state=seed).
Arms: no DRIFT; DRIFT threshold graph (the reference, k=3); DRIFT 6-NN graph (recommended); t = 2.

    python benchmarks/drift_her2st_ari.py [--data ../shared/data/her2st] [--seeds 5] [--t 2] [--sections A1,C1]
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np

SECTIONS = ("A1", "C1", "D1", "E1", "F1", "G2", "H1")


def load_section(root: Path, section: str):
    import anndata as ad
    import pandas as pd

    from shared import keys

    counts = pd.read_csv(root / "counts" / f"{section}.tsv.gz", sep="\t", index_col=0)
    labels = pd.read_csv(root / "labels" / f"{section}_labeled_coordinates.tsv", sep="\t")
    labels = labels.dropna(subset=["x", "y", "label"])
    labels.index = [f"{int(round(x))}x{int(round(y))}" for x, y in zip(labels["x"], labels["y"])]
    labels = labels[~labels.index.duplicated()]
    labels = labels[labels["label"] != "undetermined"]
    common = counts.index.intersection(labels.index)
    adata = ad.AnnData(counts.loc[common].to_numpy(dtype=np.float32))
    adata.obs_names = list(common)
    adata.var_names = [str(g) for g in counts.columns]
    adata.var_names_make_unique()
    adata.obs["label"] = labels.loc[common, "label"].to_numpy()
    xy = np.array([[float(v) for v in s.split("x")] for s in common])
    adata.obsm[keys.SPATIAL] = xy
    return adata


def cluster(adata, seed: int, n_clusters: int) -> np.ndarray:
    import scanpy as sc
    from sklearn.cluster import KMeans

    a = adata.copy()
    sc.pp.highly_variable_genes(a, n_top_genes=min(2000, a.n_vars), flavor="seurat")
    a = a[:, a.var["highly_variable"]].copy()
    sc.pp.pca(a, n_comps=30, random_state=seed)
    return KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(a.obsm["X_pca"])


def main() -> None:
    import scanpy as sc

    from shared.downstream.drift import drift_adata
    from shared.downstream.metrics import ari, nmi

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "her2st")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--t", type=float, default=2.0)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    arms = ("none", "drift-threshold(k=3)", "drift-knn(k=6)")
    print(f"her2st clustering vs pathologist labels, KMeans, {args.seeds} seeds, t={args.t}; mean ± sd")
    print(
        f"{'section':<8}{'spots':>6}{'k':>3}  "
        + "  ".join(f"{a + ' ARI':>26}" for a in arms)
        + "   NMI (none / thr / knn)"
    )
    summary = {a: [] for a in arms}
    for section in args.sections.split(","):
        adata = load_section(args.data, section)
        sc.pp.normalize_total(adata, target_sum=1e4)
        sc.pp.log1p(adata)
        variants = {
            "none": adata,
            "drift-threshold(k=3)": drift_adata(adata, t=args.t, k=3, graph="threshold"),
            "drift-knn(k=6)": drift_adata(adata, t=args.t, k=6, graph="knn"),
        }
        truth = adata.obs["label"].to_numpy()
        n_clusters = len(set(truth))
        aris, nmis = {}, {}
        for arm, data in variants.items():
            labels = [cluster(data, seed, n_clusters) for seed in range(args.seeds)]
            aris[arm] = [ari(truth, lab) for lab in labels]
            nmis[arm] = [nmi(truth, lab) for lab in labels]
            summary[arm].append(np.mean(aris[arm]))
        cells = "  ".join(f"{np.mean(aris[a]):>17.3f} ± {np.std(aris[a]):.3f}" for a in arms)
        nm = " / ".join(f"{np.mean(nmis[a]):.3f}" for a in arms)
        print(f"{section:<8}{adata.n_obs:>6}{n_clusters:>3}  {cells}   {nm}", flush=True)
    print("mean over sections: " + ", ".join(f"{a} {np.mean(v):.3f}" for a, v in summary.items()))


if __name__ == "__main__":
    main()
