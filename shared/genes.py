"""The consortium gene panel, expression normalisation and highly-variable-gene selection.

Every site must predict the same ordered genes, so one panel (a text file, one symbol per line) is shared by
the consortium; a section's counts are aligned to it with a per-gene "measured" mask instead of being
dropped, because sites measure different gene sets.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shared import keys
from shared.arrays import dense
from shared.errors import FedstError, require

if TYPE_CHECKING:
    import anndata

log = logging.getLogger(__name__)

_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*\d+)\.\d+$", re.IGNORECASE)
DEFAULT_EXCLUDE = ("MT-", "RPS", "RPL")
"""Prefixes of mitochondrial / ribosomal genes that `select_hvg` can leave out (abundant, rarely informative)."""


def _key(name: str) -> str:
    """Matching key: case-insensitive, Ensembl version suffix ignored (ENSG0001.12 == ensg0001)."""
    name = str(name).strip()
    match = _ENSEMBL_VERSION.match(name)
    return (match.group(1) if match else name).upper()


class GenePanel(Sequence[str]):
    """An ordered list of gene symbols (or Ensembl ids), matched case-insensitively against sources."""

    def __init__(self, symbols: Iterable[str], source: str = "list"):
        cleaned = [str(s).strip() for s in symbols]
        cleaned = [s for s in cleaned if s and not s.startswith("#")]
        require(len(cleaned) > 0, f"gene panel ({source}): no gene symbols (expected one symbol per line)")
        seen: dict[str, str] = {}
        for symbol in cleaned:
            key = _key(symbol)
            if key in seen:
                raise FedstError(
                    f"gene panel ({source}): {symbol!r} duplicates {seen[key]!r} (matching is case-insensitive)"
                )
            seen[key] = symbol
        self.symbols: list[str] = cleaned
        self.source = source

    # -- Sequence protocol ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.symbols)

    def __getitem__(self, index):  # type: ignore[override]
        return self.symbols[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.symbols)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, GenePanel):
            return self.symbols == other.symbols
        if isinstance(other, (list, tuple)):
            return self.symbols == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        head = ", ".join(self.symbols[:4])
        return f"GenePanel({len(self)} genes: {head}{', ...' if len(self) > 4 else ''})"

    # -- files --------------------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | os.PathLike) -> GenePanel:
        """Read a panel file: one symbol per line; blank lines and '#' comments ignored; .npy arrays accepted."""
        path = Path(path)
        require(path.is_file(), f"{path}: gene panel file not found (expected one gene symbol per line)")
        if path.suffix == ".npy":
            try:
                values = np.load(path, allow_pickle=False)
            except ValueError as exc:
                raise FedstError(f"{path}: not a 1-D array of gene symbols ({exc})") from None
            require(values.ndim == 1, f"{path}: expected a 1-D array of gene symbols, got shape {values.shape}")
            return cls([str(v) for v in values], source=str(path))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise FedstError(f"{path}: gene panel is not UTF-8 text (expected one gene symbol per line)") from None
        return cls(text.splitlines(), source=str(path))

    def write(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(self.symbols) + "\n", encoding="utf-8")
        return path

    # -- alignment ------------------------------------------------------------------------------------------
    def match(self, var_names: Sequence[str], gene_ids: Sequence[str] | None = None) -> list[list[int]]:
        """For each panel gene, the source columns it matches (by symbol, else by Ensembl id); [] = not measured."""
        by_key: dict[str, list[int]] = {}
        for column, name in enumerate(var_names):
            by_key.setdefault(_key(name), []).append(column)
        by_id: dict[str, list[int]] = {}
        if gene_ids is not None:
            for column, gene_id in enumerate(gene_ids):
                if gene_id is not None and str(gene_id) not in ("", "nan"):
                    by_id.setdefault(_key(gene_id), []).append(column)
        return [by_key.get(_key(s)) or by_id.get(_key(s)) or [] for s in self.symbols]

    def align(self, adata: anndata.AnnData, section: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Counts on the panel (n_spots x n_genes float32, 0 where unmeasured) and the measured mask (bool).

        Duplicate source columns of one gene (e.g. two probes) are summed, as UMIs of the same gene.
        """
        name = section or _section_name(adata)
        gene_ids = list(adata.var[keys.GENE_IDS].astype(str)) if keys.GENE_IDS in adata.var else None
        columns = self.match(list(adata.var_names), gene_ids)
        measured = np.array([len(c) > 0 for c in columns], dtype=bool)
        if not measured.any():
            raise FedstError(
                f"section {name}: no gene overlap with the panel ({len(self)} genes, e.g. "
                f"{', '.join(self.symbols[:3])}); the source has {adata.n_vars} genes, e.g. "
                f"{', '.join(map(str, adata.var_names[:3]))}"
            )
        # one sparse product: source columns -> panel genes (duplicates add up), fast for dense and CSR alike
        from scipy import sparse

        rows = [c for cols in columns for c in cols]
        targets = [j for j, cols in enumerate(columns) for _ in cols]
        selector = sparse.csr_matrix(
            (np.ones(len(rows), dtype=np.float64), (rows, targets)), shape=(adata.n_vars, len(self))
        )
        product = adata.X @ selector
        counts = dense(product, np.float32)
        return counts, measured


def _section_name(adata: anndata.AnnData) -> str:
    provenance = adata.uns.get(keys.PROVENANCE, {}) if hasattr(adata, "uns") else {}
    if isinstance(provenance, dict):
        for field in ("section", "section_id", "id"):
            if field in provenance:
                return str(provenance[field])
    return "<unnamed>"


def library_size(adata: anndata.AnnData) -> np.ndarray:
    """Total counts per spot over ALL genes of the source (not only the panel), float64."""
    total = adata.X.sum(axis=1)
    return np.asarray(total, dtype=np.float64).reshape(-1)


def normalise(counts: np.ndarray, library_size: np.ndarray) -> np.ndarray:
    """log1p(counts / library_size * TARGET_SUM), float32.

    Equals scanpy's ``normalize_total(target_sum=TARGET_SUM)`` + ``log1p`` on the source's full gene set,
    then restricted to the panel: the library size must come from all genes, or a panel of a few markers
    would erase exactly the abundance differences we want to predict.
    """
    counts = np.asarray(counts, dtype=np.float64)
    size = np.asarray(library_size, dtype=np.float64).reshape(-1)
    require(
        counts.ndim == 2 and len(size) == counts.shape[0],
        f"normalise: {counts.shape} counts need one library size per row, got {size.shape}",
    )
    require(bool(np.all(size > 0)), "normalise: library sizes must be > 0 (drop spots without counts first)")
    return np.log1p(counts / size[:, None] * keys.TARGET_SUM).astype(np.float32)


def select_hvg(
    adatas: Sequence[anndata.AnnData],
    n_top: int = 200,
    *,
    flavor: str = "seurat",
    exclude_prefixes: Sequence[str] | None = DEFAULT_EXCLUDE,
) -> GenePanel:
    """Highly variable genes shared by all sources, as a panel (scanpy ``highly_variable_genes``).

    Genes are matched case-insensitively across sources and only genes present in every source are
    candidates. Flavour ``seurat`` (dispersion on log-normalised data, the scanpy default; ``seurat_v3`` would
    need scikit-misc) with ``batch_key`` = source when there are several, so one section cannot dominate, and
    one mean bin per 20 candidate genes (at most 20, scanpy's default) so that small panels bin sensibly.
    The panel keeps the first source's symbol spelling, ordered by normalised dispersion (most variable first).
    """
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    require(len(adatas) > 0, "select_hvg: no sections given")
    require(n_top > 0, f"select_hvg: n_top must be > 0, got {n_top}")
    spelling: dict[str, str] = {}
    common: set[str] | None = None
    for adata in adatas:
        names = {_key(n): str(n) for n in adata.var_names}
        for k, v in names.items():
            spelling.setdefault(k, v)
        common = set(names) if common is None else common & set(names)
    assert common is not None
    if exclude_prefixes:
        prefixes = tuple(p.upper() for p in exclude_prefixes)
        common = {k for k in common if not spelling[k].upper().startswith(prefixes)}
    require(len(common) > 0, "select_hvg: the sections share no genes (after exclusions)")
    ordered = sorted(common)
    parts = []
    for i, adata in enumerate(adatas):
        keyed = {_key(n): j for j, n in reversed(list(enumerate(adata.var_names)))}
        cols = [keyed[k] for k in ordered]
        matrix = adata.X[:, cols]
        matrix = dense(matrix)
        part = ad.AnnData(
            np.asarray(matrix, dtype=np.float32), obs=pd.DataFrame(index=[f"{i}:{j}" for j in range(adata.n_obs)])
        )
        part.var_names = ordered
        part.obs["batch"] = str(i)
        size = library_size(adata)
        keep = size > 0
        part = part[keep].copy()
        part.X = part.X / size[keep, None] * keys.TARGET_SUM
        parts.append(part)
    pooled = ad.concat(parts) if len(parts) > 1 else parts[0]
    sc.pp.log1p(pooled)
    batch_key = "batch" if len(parts) > 1 else None
    # dispersions are z-scored within mean bins; with few genes, 20 bins leave single-gene bins (z = 1)
    n_bins = max(1, min(20, pooled.n_vars // 20))
    sc.pp.highly_variable_genes(
        pooled, flavor=flavor, n_top_genes=min(n_top, pooled.n_vars), batch_key=batch_key, n_bins=n_bins
    )
    table = pooled.var.copy()
    score_col = "dispersions_norm"
    table[score_col] = table[score_col].fillna(-np.inf)
    chosen = table[table["highly_variable"]].sort_values(score_col, ascending=False, kind="stable")
    return GenePanel([spelling[k] for k in chosen.index], source=f"hvg:{flavor}:top{n_top}")
