"""Per-gene framing of an ST section and a scRNA reference: pairing by name, normalisation, gene splits.

SpaDiT treats each gene as one sample: x = its (normalised) vector over all ST spots, conditioned on its
vector over all reference cells. Genes are matched by symbol (case-insensitive), never by row position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from shared import keys
from shared.arrays import dense
from shared.errors import FedstError, require

if TYPE_CHECKING:
    from anndata import AnnData


def dense_counts(adata: AnnData, what: str) -> np.ndarray:
    """X as a dense float64 (obs x var) array, validated: non-empty, finite, non-negative."""
    require(
        adata.n_obs > 0 and adata.n_vars > 0,
        f"{what}: empty input ({adata.n_obs} observations x {adata.n_vars} genes); expected both > 0",
    )
    x = adata.X
    x = dense(x, np.float64)
    require(bool(np.isfinite(x).all()), f"{what}: X holds NaN/inf values; expected finite counts")
    require(bool((x >= 0).all()), f"{what}: X holds negative values; expected non-negative counts")
    return x


def gene_index(names: list[str] | np.ndarray, what: str) -> dict[str, int]:
    """Case-insensitive symbol -> column; duplicate symbols are an error (pairing would be ambiguous)."""
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        key = str(name).strip().lower()
        if key in index:
            raise FedstError(
                f"{what}: gene symbol {name!r} occurs twice (case-insensitive); expected unique gene names"
            )
        index[key] = i
    return index


def log_normalise(counts: np.ndarray, library: np.ndarray | None = None) -> np.ndarray:
    """log1p(counts / library * TARGET_SUM) per row; rows with an empty library stay 0 (no division by 0)."""
    lib = counts.sum(axis=1) if library is None else library
    scale = np.divide(keys.TARGET_SUM, lib, out=np.zeros_like(lib, dtype=np.float64), where=lib > 0)
    return np.log1p(counts * scale[:, None])


def zscore_rows(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardise each row; a zero-variance row becomes all 0 (stated rule: no NaN, no blow-up)."""
    mean = m.mean(axis=1)
    std = m.std(axis=1)
    safe = np.where(std > 0, std, 1.0)
    z = (m - mean[:, None]) / safe[:, None]
    z[std == 0] = 0.0
    return z, mean, std


@dataclass
class PairedGenes:
    """Genes x spots / genes x cells matrices of the genes both inputs name, in one order.

    ``st_counts`` rows of genes the spatial side lacks (imputation targets without truth) are NaN.
    """

    genes: list[str]  # symbols as spelled in the reference
    st_counts: np.ndarray  # (genes, spots) raw counts, NaN where the spatial side lacks the gene
    sc_counts: np.ndarray  # (genes, cells) raw counts of the reference
    sc_library: np.ndarray  # (cells,) reference library sizes over ALL its genes
    in_spatial: np.ndarray  # (genes,) bool: measured on the spatial side

    @property
    def n_spots(self) -> int:
        return self.st_counts.shape[1]

    @property
    def n_cells(self) -> int:
        return self.sc_counts.shape[1]


def pair_genes(
    st: AnnData,
    sc: AnnData,
    targets: list[str] | None = None,
    st_name: str = "spatial input",
    sc_name: str = "reference input",
) -> PairedGenes:
    """Align ST and scRNA genes by symbol (case-insensitive).

    Rows, in the reference's gene order, are the genes both sides share plus any requested ``targets`` the
    reference has but the ST lacks.
    A requested target the reference lacks, or no shared gene at all, is a FedstError.
    """
    st_x = dense_counts(st, st_name)
    sc_x = dense_counts(sc, sc_name)
    st_idx = gene_index(list(st.var_names), st_name)
    sc_idx = gene_index(list(sc.var_names), sc_name)
    require(
        any(k in st_idx for k in sc_idx),
        f"{st_name} and {sc_name} share no gene symbol (case-insensitive); e.g. {list(st.var_names[:3])} "
        f"vs {list(sc.var_names[:3])}",
    )
    wanted = set()
    for gene in targets or []:
        key = gene.strip().lower()
        require(
            key in sc_idx,
            f"requested gene {gene!r} is absent from the {sc_name} "
            f"({sc.n_vars} genes); a gene can only be imputed from reference cells that measure it",
        )
        wanted.add(key)
    rows = [k for k in sc_idx if k in st_idx or k in wanted]  # reference order: independent of the ST's
    st_counts = np.full((len(rows), st.n_obs), np.nan)
    in_spatial = np.array([k in st_idx for k in rows])
    for r, key in enumerate(rows):
        if key in st_idx:
            st_counts[r] = st_x[:, st_idx[key]]
    sc_counts = np.stack([sc_x[:, sc_idx[k]] for k in rows])
    names = [str(sc.var_names[sc_idx[k]]) for k in rows]
    return PairedGenes(
        genes=names, st_counts=st_counts, sc_counts=sc_counts, sc_library=sc_x.sum(axis=1), in_spatial=in_spatial
    )


@dataclass
class GeneSplit:
    """Row indices into a PairedGenes: train (fit), val (model selection), test (imputed, never trained on)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def measured(self) -> np.ndarray:
        """Genes whose ST values the methods may read (train + val)."""
        return np.concatenate([self.train, self.val])


def split_genes(
    paired: PairedGenes,
    *,
    targets: list[str] | None = None,
    holdout_fraction: float | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> GeneSplit:
    """Test = the named targets, or a seeded random fraction of the spatially measured genes.

    Genes the ST lacks can only be test genes. At least 2 measured genes must remain for training.
    """
    rng = np.random.default_rng(seed)
    measured = np.flatnonzero(paired.in_spatial)
    if targets:
        wanted = {t.strip().lower() for t in targets}
        test = np.array([i for i, g in enumerate(paired.genes) if g.lower() in wanted], dtype=int)
    else:
        require(
            holdout_fraction is not None and 0 < holdout_fraction < 1,
            f"holdout fraction must be in (0, 1); got {holdout_fraction}",
        )
        n_test = max(1, int(round(holdout_fraction * len(measured))))
        test = np.sort(rng.choice(measured, size=n_test, replace=False))
    rest = np.setdiff1d(measured, test)
    require(
        len(rest) >= 2,
        f"only {len(rest)} measured gene(s) left for training after holding out {len(test)}; "
        "expected at least 2 shared genes outside the imputed set",
    )
    rest = rng.permutation(rest)
    n_val = int(round(val_fraction * len(rest))) if len(rest) >= 10 else 0
    return GeneSplit(train=np.sort(rest[n_val:]), val=np.sort(rest[:n_val]), test=test)


@dataclass
class GeneFrame:
    """Model-ready per-gene vectors: z-scored log-normalised ST (x0) and reference (condition) values.

    The ST library size is taken over the measured (non-test) genes only, so held-out genes leak nothing.
    """

    st_log: np.ndarray  # (genes, spots) log-normalised ST; NaN for genes the ST lacks
    st_z: np.ndarray  # (genes, spots) per-gene z-scores (NaN rows stay NaN)
    st_mean: np.ndarray
    st_std: np.ndarray
    sc_log: np.ndarray  # (genes, cells)
    sc_z: np.ndarray
    sc_mean: np.ndarray
    sc_std: np.ndarray


def frame_genes(paired: PairedGenes, split: GeneSplit) -> GeneFrame:
    """Normalise both sides; test genes' ST values are never used to normalise anything else."""
    measured = split.measured
    library = np.nansum(paired.st_counts[measured], axis=0)
    st_log = log_normalise(paired.st_counts.T, library).T
    st_z, st_mean, st_std = zscore_rows(st_log)
    sc_log = log_normalise(paired.sc_counts.T, paired.sc_library).T
    sc_z, sc_mean, sc_std = zscore_rows(sc_log)
    return GeneFrame(
        st_log=st_log,
        st_z=st_z,
        st_mean=st_mean,
        st_std=st_std,
        sc_log=sc_log,
        sc_z=sc_z,
        sc_mean=sc_mean,
        sc_std=sc_std,
    )


def fit_scale(frame: GeneFrame, genes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares maps reference (mean, std) -> ST (mean, std) over the measured genes.

    SpaDiT generates per-gene z-scores; this puts them back on the ST's log-normalised scale for output.
    """

    def line(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        a = np.stack([np.ones_like(x), x], axis=1)
        return np.linalg.lstsq(a, y, rcond=None)[0]

    return line(frame.sc_mean[genes], frame.st_mean[genes]), line(frame.sc_std[genes], frame.st_std[genes])


def unscale(z: np.ndarray, frame: GeneFrame, genes: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """(genes, spots) z-scores -> non-negative log-normalised values via ``fit_scale`` on the measured genes."""
    mean_coef, std_coef = fit_scale(frame, measured)
    mean = mean_coef[0] + mean_coef[1] * frame.sc_mean[genes]
    std = np.clip(std_coef[0] + std_coef[1] * frame.sc_std[genes], 1e-6, None)
    return np.clip(z * std[:, None] + mean[:, None], 0.0, None)
