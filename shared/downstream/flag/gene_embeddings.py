"""Gene embeddings that FLAG's middle DiT block is aligned to (Geneformer in the paper; not downloadable here).

User-supplied files, keyed by gene symbol:
  - ``.csv`` / ``.tsv``: first column = symbol, remaining columns = embedding;
  - ``.npz``: arrays ``genes`` (symbols) and ``embeddings`` (n, d);
  - ``.npy``: a float (n, d) matrix plus a sibling ``<stem>.genes.txt`` listing one symbol per row.
Panel genes missing from the file are excluded from the alignment loss (mask); fewer than half present is an
error, because the alignment would then constrain too little to be what the user asked for.

Data-derived default (``correlation_embeddings``): the top principal axes of the TRAINING expression's
gene-gene correlation matrix, each gene's row scaled by sqrt(eigenvalue). Genes with similar co-expression
then get similar embeddings, which is the structure a gene foundation model's embedding is meant to carry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.errors import FedstError, require


def read_gene_embeddings(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(symbols, (n, d) float32) from a user file; FedstError naming the file when malformed."""
    path = Path(path)
    require(path.is_file(), f"{path}: gene embedding file not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            import pandas as pd

            table = pd.read_csv(path, sep="," if suffix == ".csv" else "\t", index_col=0)
            genes, emb = [str(g) for g in table.index], table.to_numpy(dtype=np.float64)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                require("genes" in data and "embeddings" in data, f"{path}: expected arrays 'genes' and 'embeddings'")
                genes, emb = [str(g) for g in data["genes"]], np.asarray(data["embeddings"], dtype=np.float64)
        elif suffix == ".npy":
            names = path.with_name(path.stem + ".genes.txt")
            require(names.is_file(), f"{path}: a .npy embedding needs its symbols in {names.name} (one per line)")
            emb = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
            genes = [line.strip() for line in names.read_text().splitlines() if line.strip()]
        else:
            raise FedstError(f"{path}: unsupported gene embedding format (expected .csv, .tsv, .npz or .npy)")
    except (ValueError, OSError) as exc:
        raise FedstError(f"{path}: cannot read gene embeddings ({exc})") from None
    require(emb.ndim == 2, f"{path}: embeddings must be a 2-D matrix, got shape {emb.shape}")
    require(len(genes) == len(emb), f"{path}: {len(genes)} gene symbols but {len(emb)} embedding rows")
    require(np.isfinite(emb).all(), f"{path}: embeddings contain NaN or Inf")
    return genes, emb.astype(np.float32)


def align_to_panel(genes: list[str], emb: np.ndarray, panel: list[str], source: str) -> tuple[np.ndarray, np.ndarray]:
    """(panel x d embedding, panel mask): rows for panel genes, zeros + mask 0 where the file lacks a gene."""
    lookup = {g.upper(): i for i, g in enumerate(genes)}
    rows = np.array([lookup.get(g.upper(), -1) for g in panel])
    present = rows >= 0
    require(
        present.mean() >= 0.5,
        f"{source}: only {int(present.sum())} of {len(panel)} panel genes have an embedding (need at least half)",
    )
    out = np.zeros((len(panel), emb.shape[1]), dtype=np.float32)
    out[present] = emb[rows[present]]
    return out, present.astype(np.float32)


def correlation_embeddings(expression: np.ndarray, dim: int = 32) -> np.ndarray:
    """(genes x min(dim, genes)) default embedding: principal axes of the gene-gene correlation matrix."""
    y = np.asarray(expression, dtype=np.float64)
    sd = y.std(0)
    z = (y - y.mean(0)) / np.where(sd == 0, 1.0, sd)
    corr = (z.T @ z) / max(1, len(z))
    np.fill_diagonal(corr, 1.0)  # constant genes: self-correlation 1, others 0 (their own axis)
    vals, vecs = np.linalg.eigh(corr)
    order = np.argsort(vals)[::-1][: min(dim, len(vals))]
    emb = vecs[:, order] * np.sqrt(np.clip(vals[order], 0.0, None))
    return emb.astype(np.float32)
